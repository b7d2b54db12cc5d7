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

    def update_(self, y: torch.Tensor) -> None:
        """Adds rows ``y`` of shape (R, m)."""
        y = y.detach().to(torch.float64)
        self.n += y.shape[0]
        self.s += y.sum(0)
        self.g.addmm_(y.T, y)

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
        self, model: nn.Module, blocks: Iterable[Block], device: torch.device | None = None
    ) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.device = device
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
            moments.update_(output.reshape(-1, output.shape[-1]))

        return hook

    def _table_hook(self, blocks: list[Block], feature_names: list[str]):
        plan = [
            (self.moments[b.name], [feature_names.index(f) for f in b.features]) for b in blocks
        ]

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            kjt: KeyedJaggedTensor = args[0] if args else next(iter(kwargs.values()))
            fields = _fields(output)
            lengths = kjt.lengths().view(len(kjt.keys()), -1)
            order = [kjt.keys().index(f) for f in feature_names]
            nonempty = lengths[order] > 0  # (F, B)
            for moments, index in plan:
                for i in index:
                    moments.update_(fields[:, i][nonempty[i]])

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
) -> Statistics:
    """One forward pass over ``batches`` (TorchRec ``Batch``es) with observers.

    Args:
        model: the module whose submodules are observed (block names are its paths).
        blocks: the blocks to observe.
        batches: the calibration batches.
        progress: show a progress bar.
        forward: the module to run, if not ``model`` itself (a
            ``DistributedModelParallel`` wrapping ``model``).

    Returns:
        The local (this process's) statistics; call :meth:`Statistics.all_reduce_` to
        combine ranks.
    """
    from tqdm import tqdm

    from .evaluate import eval_mode, forward_logits, model_device

    runner = forward if forward is not None else model
    collector = StatsCollector(model, blocks, model_device(model))
    with eval_mode(runner), collector, torch.no_grad():
        for batch in tqdm(batches, desc="stats", disable=not progress, unit="batch"):
            forward_logits(runner, batch)
    return collector.result()
