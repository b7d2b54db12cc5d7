"""Streaming output statistics of every block: ``n``, ``sum y``, ``sum y y^T`` in float64.

"Prepare, run the caller's forward loop, convert" (as torchao's calibration): the
:class:`StatsCollector` installs forward hooks, the caller runs its own loop, and
:meth:`StatsCollector.result` returns mergeable :class:`Statistics`.

Where tables are observed: at the output of the module that owns the collection (TorchRec's
``SparseArch``), i.e. where the dense part consumes the pooled features. Under
``DistributedModelParallel`` the collection itself returns a lazy awaitable, but
``SparseArch`` returns a plain (B, F, D) tensor on every rank, so one hook serves both.
Empty bags are not counted: their output is exactly 0 before and after compression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from .blocks import Block
from .errors import InputError


@dataclass
class Moments:
    """Sufficient statistics of one block's outputs ``y`` (m-dimensional), float64.

    Attributes:
        n: number of observed rows.
        s: ``sum y``, shape (m,).
        g: ``sum y y^T``, shape (m, m).
    """

    n: torch.Tensor
    s: torch.Tensor
    g: torch.Tensor

    @classmethod
    def zeros(cls, m: int, device: torch.device | None = None) -> "Moments":
        z = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros((), **z), torch.zeros(m, **z), torch.zeros(m, m, **z))

    def update_(self, y: torch.Tensor, exact: bool = False) -> None:
        """Adds rows ``y`` of shape (R, m) (see :func:`batch_moments`)."""
        n, s, g = batch_moments(y.detach().unsqueeze(0), None, exact)
        self.n += n[0]
        self.s += s[0]
        self.g += g[0]

    def merge(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.s + other.s, self.g + other.g)

    @property
    def mean(self) -> torch.Tensor:
        return self.s / self.n

    @property
    def covariance(self) -> torch.Tensor:
        """Population covariance ``G / n - mu mu^T``, shape (m, m)."""
        mu = self.mean
        c = self.g / self.n - torch.outer(mu, mu)
        return (c + c.T) / 2

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.s, self.g]


def batch_moments(
    y: torch.Tensor, mask: torch.Tensor | None = None, exact: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n``, ``sum y`` and ``sum y y^T`` of G groups of rows at once, in float64.

    ``exact``: every product in float64. Otherwise (the default: a float64 GEMM costs
    more than the layer's own forward pass for wide blocks) each group is centred at its rounded mean ``c`` and the Gram matrix of the centred rows
    is one batched GEMM in ``y``'s precision; then, in float64, ``s = n c + t`` and
    ``G = Gc + c t^T + t c^T + n c c^T`` with ``t`` the centred rows' sum, which is exact
    algebra. The only roundings are the sums over the batch's R rows of centred values:
    each entry of ``Gc`` (and of ``t``) is within ``gamma_R * sum_r |yc_ri| |yc_rj|``
    (``gamma_R = R u / (1 - R u)``, ``u = 2^-24`` in float32) of the true value, i.e.
    relative to the batch's spread, not to its mean (tested). Sums over batches, ranks
    and jobs are float64.

    Masked rows must be zero in ``y`` (an empty bag pools to 0); they are left out of
    ``n`` and of the centring.

    Args:
        y: (G, R, m) rows.
        mask: (G, R) bool, the rows to count, or None for all.
        exact: float64 products.
    Returns:
        ``n`` (G,), ``s`` (G, m), ``g`` (G, m, m), float64.
    """
    y = y.contiguous()
    if mask is not None and bool(mask.all()):
        mask = None  # one-hot data: nothing to leave out
    if mask is None:
        n = torch.full((y.shape[0],), float(y.shape[1]), dtype=torch.float64, device=y.device)
    else:
        n = mask.sum(1).to(torch.float64)
    if exact:
        y64 = y.to(torch.float64)
        return n, y64.sum(1), torch.bmm(y64.transpose(1, 2), y64)
    # Masked rows are zero, so the plain sum over all rows is the sum of the kept ones.
    c = y.sum(1) / n.clamp_min(1).to(y.dtype).unsqueeze(1)
    yc = y - c.unsqueeze(1)
    if mask is not None:
        yc = yc * mask.unsqueeze(2)
    gc = torch.bmm(yc.transpose(1, 2), yc).to(torch.float64)
    t = yc.sum(1).to(torch.float64).unsqueeze(2)
    c64 = c.to(torch.float64).unsqueeze(2)
    s = (n.unsqueeze(1) * c64.squeeze(2) + t.squeeze(2))
    cross = c64 * t.transpose(1, 2)
    return n, s, gc + cross + cross.transpose(1, 2) + n[:, None, None] * c64 * c64.transpose(1, 2)


@dataclass
class Statistics:
    """Moments by block name, plus a metadata record (model, data, versions)."""

    moments: dict[str, Moments]
    meta: dict[str, Any] = field(default_factory=dict)

    def merge(self, other: "Statistics") -> "Statistics":
        """Adds statistics computed over disjoint data (other ranks, jobs or shards)."""
        if set(self.moments) != set(other.moments):
            diff = sorted(set(self.moments) ^ set(other.moments))
            raise InputError(f"statistics cover different blocks: {diff}")
        merged = {k: self.moments[k].merge(other.moments[k]) for k in sorted(self.moments)}
        return Statistics(merged, dict(self.meta))

    def all_reduce_(self, group: Any = None) -> None:
        """Sums the moments over all ranks: one all-reduce per block, in sorted name order,
        so every rank (also one that saw no data) issues the same collectives."""
        import torch.distributed as dist

        for name in sorted(self.moments):
            m = self.moments[name]
            flat = torch.cat([t.reshape(-1) for t in m.tensors()])
            dist.all_reduce(flat, group=group)
            k = m.s.numel()
            m.n.copy_(flat[0])
            m.s.copy_(flat[1 : 1 + k])
            m.g.copy_(flat[1 + k :].view(k, k))

    def check_finite(self) -> None:
        for name, m in self.moments.items():
            if int(m.n) == 0:
                raise InputError(f"block {name}: no samples were observed")
            if not all(torch.isfinite(t).all() for t in m.tensors()):
                raise InputError(f"block {name}: statistics hold NaN or Inf")

    def to_state(self) -> dict[str, Any]:
        return {
            "moments": {
                k: {"n": v.n.cpu(), "s": v.s.cpu(), "g": v.g.cpu()} for k, v in self.moments.items()
            },
            "meta": self.meta,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Statistics":
        return cls({k: Moments(**v) for k, v in state["moments"].items()}, state.get("meta", {}))


def _fields(output: Any) -> torch.Tensor:
    """The (B, F, D) pooled fields from a sparse arch's output (DeepFM's also returns the
    deep tower's input beside them)."""
    return output[0] if isinstance(output, tuple) else output


class StatsCollector:
    """Observes the outputs of ``blocks`` while the caller runs forward passes.

    Example::

        with StatsCollector(model, find_blocks(model)) as collector:
            for batch in batches:
                model(batch.dense_features, batch.sparse_features)
        stats = collector.result()
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Iterable[Block],
        device: torch.device | None = None,
        exact: bool = False,
    ) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.device = device
        self.exact = exact
        self.moments: dict[str, Moments] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "StatsCollector":
        modules = dict(self.model.named_modules())
        tables_by_owner: dict[str, list[Block]] = {}
        for b in self.blocks:
            self.moments[b.name] = Moments.zeros(b.out_features, self.device)
            if b.kind == "linear":
                self._handles.append(modules[b.module].register_forward_hook(self._linear_hook(b)))
            else:
                owner = b.module.rpartition(".")[0]
                tables_by_owner.setdefault(owner, []).append(b)
        for owner, blocks in tables_by_owner.items():
            arch = modules[owner]
            names = getattr(arch, "sparse_feature_names", None)
            if names is None:
                raise InputError(
                    f"{owner or 'the model'} owns embedding tables but has no "
                    "`sparse_feature_names` (observe tables through a TorchRec SparseArch)"
                )
            hook = self._table_hook(blocks, list(names))
            self._handles.append(arch.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _linear_hook(self, block: Block):
        moments = self.moments[block.name]

        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            moments.update_(output.reshape(-1, output.shape[-1]), self.exact)

        return hook

    def _table_hook(self, blocks: list[Block], feature_names: list[str]):
        plan = [
            (self.moments[b.name], [feature_names.index(f) for f in b.features]) for b in blocks
        ]
        observed = sorted({i for _, index in plan for i in index})

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            kjt: KeyedJaggedTensor = args[0] if args else next(iter(kwargs.values()))
            fields = _fields(output)  # (B, F, D)
            if len(observed) != fields.shape[1]:
                fields = fields[:, observed]
            lengths = kjt.lengths().view(len(kjt.keys()), -1)
            order = [kjt.keys().index(feature_names[i]) for i in observed]
            nonempty = lengths[order] > 0  # (F', B)
            # One batched GEMM serves every table; empty bags (exactly 0 before and after
            # compression) are left out.
            n, s, g = batch_moments(fields.transpose(0, 1), nonempty, self.exact)  # (F', ...)
            for moments, index in plan:
                for i in index:
                    j = observed.index(i)
                    moments.n += n[j]
                    moments.s += s[j]
                    moments.g += g[j]

        return hook

    def result(self, meta: dict[str, Any] | None = None) -> Statistics:
        return Statistics(dict(self.moments), dict(meta or {}))


def collect_statistics(
    model: nn.Module,
    blocks: Iterable[Block],
    batches: Iterable[Any],
    *,
    progress: bool = False,
    forward: nn.Module | None = None,
    exact: bool = False,
) -> Statistics:
    """One forward pass over ``batches`` (TorchRec ``Batch``es) with observers.

    Args:
        model: the module whose submodules are observed (block names are its paths).
        blocks: the blocks to observe.
        batches: the calibration batches.
        progress: show a progress bar.
        forward: the module to run, if not ``model`` itself (a
            ``DistributedModelParallel`` wrapping ``model``).
        exact: float64 Gram products; False: float32 GEMMs of centred rows with float64
            accumulation (see :func:`batch_moments`).

    Returns:
        The local (this process's) statistics; call :meth:`Statistics.all_reduce_` to
        combine ranks.
    """
    from tqdm import tqdm

    from .evaluate import eval_mode, forward_logits, model_device

    runner = forward if forward is not None else model
    collector = StatsCollector(model, blocks, model_device(model), exact)
    with eval_mode(runner), collector, torch.no_grad():
        for batch in tqdm(batches, desc="stats", disable=not progress, unit="batch"):
            forward_logits(runner, batch)
    return collector.result()
