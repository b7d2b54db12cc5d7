"""Streaming output statistics of every block: ``n``, ``sum y``, ``sum y y^T`` in float64.

"Prepare, run the caller's forward loop, convert" (as torchao's calibration): the
:class:`StatsCollector` installs forward hooks, the caller runs its own loop, and
:meth:`StatsCollector.result` returns mergeable :class:`Statistics`.

Where tables are observed: at the output of the module that owns the collection (TorchRec's
``SparseArch``), i.e. where the dense part consumes the pooled features. Under
``DistributedModelParallel`` the collection itself returns a lazy awaitable, but
``SparseArch`` returns a plain (B, F, D) tensor on every rank, so one hook serves both.
A collection no ``SparseArch`` owns (a user's own model) is observed at its own output,
an unsharded ``KeyedTensor`` (:func:`~afmrec.pipeline.blocks.table_hooks`).
Empty bags are not counted: their output is exactly 0 before and after compression.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from afmrec.sharding.env import barrier, min_over_ranks

from .artifacts import STATISTICS_SAVE_FORMAT, atomic_file, load_checked, save_checked
from .blocks import Block, table_hooks
from .centring import RowGroups, SharedAddresses, add_recombined_, centre_round_sum, reads_in_place
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

    def update_(self, y: torch.Tensor, precision: str = "float32") -> None:
        """Adds rows ``y`` of shape (R, m) (see :func:`batch_moments`)."""
        add_batch_moments_([t.unsqueeze(0) for t in self.tensors()], y.detach().unsqueeze(0), None,
                           precision)

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


PRECISIONS = ("float64", "float32", "bfloat16")
"""How :func:`batch_moments` forms a batch's products: every product in float64; or the
GEMM of centred rows in float32 (TF32 on CUDA where ``allow_tf32`` is on); or in
bfloat16 (half the bytes, twice the GEMM rate) with float32 accumulation. A pass may
also be asked for ``"auto"`` (:func:`resolve_precision`)."""


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_precision(precision: str, device: torch.device | None) -> str:
    """``precision``, with ``"auto"`` resolved for a pass on ``device``: bfloat16 on CUDA
    (within its proven bound, :func:`batch_moments`, and the fastest there: the GEMM of
    bfloat16 rows is about 4x the TF32 one), float32 elsewhere (a CPU has no fast
    bfloat16 GEMM, and rounding costs a pass)."""
    if precision == "auto":
        return "bfloat16" if device is not None and torch.device(device).type == "cuda" else "float32"
    check_precision(precision)
    return precision


def batch_moments(
    y: torch.Tensor, mask: torch.Tensor | None = None, precision: str = "float32"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n``, ``sum y`` and ``sum y y^T`` of G groups of rows at once, in float64.

    ``precision="float64"``: every product in float64 (a float64 GEMM costs more than the
    layer's own forward pass for wide blocks). Otherwise each group is centred at ``c``,
    the mean of its first :data:`~afmrec.pipeline.centring.PILOT_ROWS` kept rows (0 if
    none is; any ``c`` gives the same algebra, a ``c`` near the mean gives small centred
    values), and the centred rows ``yc`` go through one batched GEMM and one sum; then,
    in float64, ``s = n c + t`` and ``G = Gc + c t^T + t c^T + n c c^T`` with ``t`` the
    sum of ``yc``, which is exact algebra
    (:func:`~afmrec.pipeline.centring.centre_round_sum` centres, rounds and sums in one
    pass on CUDA, reading the rows where they lie). The roundings:

    - ``"float32"``: ``yc`` in float32 (TF32 inputs to the GEMM where CUDA's
      ``allow_tf32`` is on). Each entry of ``Gc`` is within ``gamma_R * sum_r |yc_ri|
      |yc_rj|`` and of ``t`` within ``gamma_R * sum_r |yc_ri|`` (``gamma_R = R u / (1 - R
      u)``, ``u = 2^-24``) of the true value, i.e. relative to the batch's spread, not to
      its mean.
    - ``"bfloat16"``: ``yc`` is rounded to bfloat16 (one pass that centres and rounds),
      which moves each entry by at most ``e |y - c|``, ``e = 2^-8 + 2^-24 + 2^-32``; the
      products of bfloat16 values are exact in float32 and are summed in float32, within
      ``gamma_R`` of the rounded rows' sums. So ``Gc`` is within ``(2e + e^2 + gamma_R
      (1 + e)^2) sum_r |yc_ri| |yc_rj|`` and ``t`` within ``(e + gamma_R (1 + e)) sum_r
      |yc_ri|``: the moments of rows each within ``e |y - c|`` of the true ones.

    In both, ``G`` carries ``t``'s error times ``c`` besides, which cancels in the
    covariance (tested). Sums over batches, ranks and jobs are float64.

    Masked rows must be zero in ``y`` (an empty bag pools to 0); they are left out of
    ``n``, of the centre and of the sums.

    Args:
        y: (G, R, m) rows (float64 ones go the float64 way whatever ``precision``), or
            :class:`~afmrec.pipeline.centring.RowGroups` of float32 rows read in place.
        mask: (G, R) bool, the rows to count, or None for all.
        precision: one of :data:`PRECISIONS`.
    Returns:
        ``n`` (G,), ``s`` (G, m), ``g`` (G, m, m), float64.
    """
    return _recombined(*_batch_parts(y, mask, precision))


def _recombined(n: torch.Tensor, c: torch.Tensor, t: torch.Tensor,
                gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, s, g)`` in float64 from the centred parts (see :func:`batch_moments`; ``t``
    holds the sums of S splits of the rows, (G, S, m))."""
    t64, c64 = t.to(torch.float64).sum(1), c.to(torch.float64)
    s = torch.addcmul(t64, n.unsqueeze(1), c64)
    # G = Gc + c t^T + t c^T + n c c^T = Gc + c w^T + w c^T with w = t + n c / 2
    w = torch.addcmul(t64, n.unsqueeze(1), c64, value=0.5).unsqueeze(2)
    c64 = c64.unsqueeze(2)
    g = torch.baddbmm(gc.to(torch.float64), c64, w.transpose(1, 2))
    return n, s, g.baddbmm_(w, c64.transpose(1, 2))


def add_batch_moments_(totals: Sequence[torch.Tensor], y: torch.Tensor,
                       mask: torch.Tensor | None = None, precision: str = "float32") -> None:
    """Adds :func:`batch_moments` of ``y`` to ``totals`` in place: ``n`` (G,), ``s`` (G, m)
    and ``g`` (G, m, m), float64.

    On CUDA with Triton the float64 part (``s = n c + t``, ``G = Gc + c w^T + w c^T``, the
    adds) is one kernel (:func:`~afmrec.pipeline.centring.add_recombined_`) instead of a
    dozen small ones; elsewhere it is :func:`batch_moments` and three adds.
    """
    parts = _batch_parts(y, mask, precision)
    if not add_recombined_(totals, *parts):
        for total, part in zip(totals, _recombined(*parts)):
            total += part


def _batch_parts(y: torch.Tensor | RowGroups, mask: torch.Tensor | None,
                 precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(n, c, t, Gc)``: the count (G,) float64, the centre (G, m), the centred rows' sums
    over S splits of them (G, S, m) and their Gram matrix (G, m, m) (see
    :func:`batch_moments`); float32, or float64 with ``c = 0`` for float64 rows or
    products (the recombination then adds exact zeros). ``y`` is (G, R, m): a tensor, or
    :class:`RowGroups` (float32 rows; not for float64 products)."""
    check_precision(precision)
    groups, rows, _ = y.shape
    # (No shortcut for an all-true mask: testing for one would stall the GPU every batch.)
    if mask is None:
        n = torch.full((groups,), float(rows), dtype=torch.float64, device=y.device)
    else:
        n = mask.sum(1).to(torch.float64)
    if precision == "float64" or y.dtype == torch.float64:  # float64 rows stay float64
        y64 = y.to(torch.float64)
        return n, y64.new_zeros(y64.shape[::2]), y64.sum(1, keepdim=True), torch.bmm(y64.transpose(1, 2), y64)
    c, yc, t = centre_round_sum(y, mask, getattr(torch, precision))
    return n, c, t, _gram(yc)


def _gram(yc: torch.Tensor) -> torch.Tensor:
    """(G, m, m) float32 ``yc^T yc`` of (G, R, m) rows, float32 or bfloat16 ones (the latter
    with float32 products and sums: CUDA's bf16 GEMM with a float32 output; elsewhere the
    rows widened to float32 first, which is exact)."""
    if yc.dtype == torch.bfloat16:
        if yc.is_cuda:
            return torch.bmm(yc.transpose(1, 2), yc, out_dtype=torch.float32)
        yc = yc.to(torch.float32)
    return torch.bmm(yc.transpose(1, 2), yc)


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
        return {"moments": moments_state(self.moments), "meta": self.meta}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Statistics":
        return cls(moments_from_state(state["moments"]), state.get("meta", {}))


def moments_state(moments: Mapping[str, Moments]) -> dict[str, dict[str, torch.Tensor]]:
    """Moments by name as plain CPU tensors (what ``torch.save`` writes). Each is a copy of
    its own: moments may be views of a stack, which ``torch.save`` would write whole."""
    return {k: {"n": m.n.cpu().clone(), "s": m.s.cpu().clone(), "g": m.g.cpu().clone()}
            for k, m in moments.items()}


def moments_from_state(state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Moments]:
    """The inverse of :func:`moments_state`."""
    return {k: Moments(**v) for k, v in state.items()}


def _stacked_moments(blocks: list[Block], device: torch.device | None) -> dict[str, Moments]:
    """Zero moments of blocks of one width (a sparse arch's tables, or the Linears of one
    output width), as views of stacked (T,), (T, m), (T, m, m) sums (row j: ``blocks[j]``),
    so that one in-place add updates all of them. Blocks of mixed widths get moments of
    their own."""
    widths = {b.out_features for b in blocks}
    if len(widths) != 1:
        return {b.name: Moments.zeros(b.out_features, device) for b in blocks}
    z = dict(dtype=torch.float64, device=device)
    t, m = len(blocks), widths.pop()
    n, s, g = torch.zeros(t, **z), torch.zeros(t, m, **z), torch.zeros(t, m, m, **z)
    return {b.name: Moments(n[j], s[j], g[j]) for j, b in enumerate(blocks)}


def pooled_fields(output: Any, features: Sequence[str]) -> torch.Tensor:
    """The (B, F, D) pooled fields of ``features`` from where tables are observed
    (:class:`~afmrec.pipeline.blocks.TableHook`): a sparse arch's (B, F, D) output (DeepFM's
    also returns the deep tower's input beside them), or a collection's ``KeyedTensor``
    (its ``features``, all D wide, stacked: a copy)."""
    if isinstance(output, KeyedTensor):
        by_key = output.to_dict()
        return torch.stack([by_key[f] for f in features], dim=1)
    fields = output[0] if isinstance(output, tuple) else output
    if not isinstance(fields, torch.Tensor):
        raise InputError(f"cannot observe tables in a {type(fields).__name__} (a sharded collection's "
                         "output): observe them through a TorchRec SparseArch")
    return fields


def _check_unmodified(name: str, y: torch.Tensor, version: int) -> None:
    if y._version != version:
        raise InputError(
            f"the output of {name} was modified in place before the forward pass ended; its "
            "statistics cannot be read (use out-of-place activations)")


# What an observer saw in one forward pass: a hashable key (structure, shapes, dtypes) and
# the tensors themselves.
Seen = tuple[Hashable, list[torch.Tensor]]


class _Observer:
    """Outputs held during one forward pass, and how their moments are added to the sums.

    Per batch, :meth:`take` hands over what the hooks saw, :meth:`buffers` allocates the
    update's inputs, :meth:`fill` copies what was seen into them and :meth:`update` adds
    their moments to the sums. The update reads nothing but its inputs and the sums, so
    :class:`StatsCollector` can capture it once as a CUDA graph and replay it on buffers
    it refills every batch.
    """

    def take(self) -> Seen | None:
        raise NotImplementedError

    def buffers(self, key: Hashable, seen: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def fill(self, key: Hashable, buffers: list[torch.Tensor], seen: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def update(self, key: Hashable, inputs: list[torch.Tensor]) -> None:
        raise NotImplementedError


@dataclass
class _WidthGroup(_Observer):
    """The Linear blocks of one output width: their moments are views of stacked sums, and
    the outputs of one forward pass go through one :func:`batch_moments` call."""

    names: list[str]
    stack: list[torch.Tensor]  # n (G,), s (G, m), g (G, m, m): the views' bases
    precision: str = "float32"
    pending: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (j, y, version)

    def observe(self, j: int, y: torch.Tensor) -> None:
        self.pending.append((j, y, y._version))

    def take(self) -> Seen | None:
        items, self.pending = self.pending, []
        if not items:
            return None
        for j, y, version in items:
            _check_unmodified(self.names[j], y, version)
        layout = tuple((j, tuple(y.shape), y.stride(), y.dtype) for j, y, _ in items)
        everyone_once = [j for j, *_ in layout] == list(range(len(self.names)))
        # stacked: every block once, same rows; else (a block skipped or run twice) each alone
        stacked = everyone_once and len({(shape, stride) for _, shape, stride, _ in layout}) == 1
        seen = [y for _, y, _ in items]
        in_place = _in_place(self.precision, seen)
        return (stacked, in_place, layout), seen

    @staticmethod
    def _groups(key: Hashable, seen: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The outputs of each Gram product: all at once (stacked), or each alone."""
        return [seen] if key[0] else [[y] for y in seen]

    def buffers(self, key: Hashable, seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        return [_rows_input((len(ys), *ys[0].shape), ys[0].stride(0), ys[0], key[1])
                for ys in self._groups(key, seen)]

    def fill(self, key: Hashable, buffers: list[torch.Tensor | RowGroups],
             seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        for rows, ys in zip(buffers, self._groups(key, seen)):
            if isinstance(rows, RowGroups):
                rows.point_at([y.data_ptr() for y in ys])
            else:
                torch.stack(ys, out=rows)
        return buffers

    def update(self, key: Hashable, inputs: list[torch.Tensor | RowGroups]) -> None:
        stacked, _, layout = key
        if stacked:
            add_batch_moments_(self.stack, inputs[0], None, self.precision)
            return
        for (j, *_), y in zip(layout, inputs):
            add_batch_moments_([total[j : j + 1] for total in self.stack], y, None, self.precision)


def _in_place(precision: str, outputs: Sequence[torch.Tensor]) -> bool:
    """Whether an update reads ``outputs`` where they lie (:class:`RowGroups`): where the
    Triton pass reads them all, and not for float64 products (which take tensors)."""
    return precision != "float64" and all(reads_in_place(y) for y in outputs)


def _rows_input(shape: tuple[int, ...], row_stride: int, like: torch.Tensor,
                in_place: bool) -> torch.Tensor | RowGroups:
    """An update's (G, R, m) input: the addresses of rows read where they lie (see
    :class:`~afmrec.pipeline.centring.RowGroups`), or a tensor of ``like``'s type and
    device that the rows are copied into."""
    if in_place:
        return RowGroups(*shape, row_stride, like.device)
    return like.new_empty(shape)


class _TableObserver(_Observer):
    """The tables of one sparse arch, observed where it returns its (B, F, D) fields: one
    batched Gram product serves every table, and (when each table serves one feature, as
    ours do) three in-place adds into the stacked sums that the tables' :class:`Moments`
    are views of, whatever the number of tables. Empty bags (exactly 0 before and after
    compression) are left out."""

    def __init__(self, blocks: list[Block], feature_names: list[str], moments: Mapping[str, Moments],
                 precision: str) -> None:
        self.precision = precision
        self.plan = [(moments[b.name], [feature_names.index(f) for f in b.features]) for b in blocks]
        self.feature_names = feature_names
        self.observed = sorted({i for _, index in self.plan for i in index})
        first = self.plan[0][0]
        self.stacked = all(len(index) == 1 for _, index in self.plan) and first.n._base is not None
        self.rows: list[int] = []
        if self.stacked:  # the views of block j sit at row j of the stack, in `blocks` order
            self.stack = [t._base for t in first.tensors()]
            self.rows = [self.observed.index(index[0]) for _, index in self.plan]
        self.in_order = self.rows == list(range(len(self.observed)))  # no reordering needed
        self._index: dict[tuple[torch.device, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pending: list[tuple[torch.Tensor, torch.Tensor, tuple[str, ...], int]] = []

    def hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        kjt: KeyedJaggedTensor = args[0] if args else next(iter(kwargs.values()))
        fields = pooled_fields(output, self.feature_names)
        self.pending.append((fields, kjt.lengths(), tuple(kjt.keys()), fields._version))

    def _index_tensors(self, device: torch.device, keys: tuple[str, ...]):
        """(observed fields, their rows in the lengths, stack rows), built once per device
        and key order (a Python list index would copy to the device every batch)."""
        if (device, keys) not in self._index:
            order = [keys.index(self.feature_names[i]) for i in self.observed]
            as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
            self._index[device, keys] = (as_tensor(self.observed), as_tensor(order), as_tensor(self.rows))
        return self._index[device, keys]

    def take(self) -> Seen | None:
        items, self.pending = self.pending, []
        if not items:
            return None
        for fields, _, _, version in items:
            _check_unmodified("the sparse arch", fields, version)
        in_place = _in_place(self.precision, [f for f, *_ in items])
        layout = tuple((tuple(f.shape), f.stride(), f.dtype, f.device, tuple(n.shape), n.dtype, keys)
                       for f, n, keys, _ in items)
        return (in_place, layout), [t for f, n, _, _ in items for t in (f, n)]

    def buffers(self, key: Hashable, seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        in_place, layout = key
        out = []
        for i, (shape, stride, _, _, _, _, _) in enumerate(layout):
            fields, lengths = seen[2 * i], seen[2 * i + 1]
            out.append(_rows_input((len(self.observed), shape[0], shape[2]), stride[0], fields, in_place))
            out.append(torch.empty_like(lengths))
        return out

    def fill(self, key: Hashable, buffers: list[torch.Tensor | RowGroups],
             seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        for i, (_, _, _, device, _, _, keys) in enumerate(key[1]):
            fields, lengths, rows = seen[2 * i], seen[2 * i + 1], buffers[2 * i]
            if isinstance(rows, RowGroups):  # field f's rows: a column of (B, F, D)
                step = fields.stride(1) * fields.element_size()
                rows.point_at([fields.data_ptr() + f * step for f in self.observed])
            else:
                if len(self.observed) != fields.shape[1]:
                    fields = fields.index_select(1, self._index_tensors(device, keys)[0])
                rows.copy_(fields.transpose(0, 1))  # (F', B, D)
            buffers[2 * i + 1].copy_(lengths)
        return buffers

    def update(self, key: Hashable, inputs: list[torch.Tensor | RowGroups]) -> None:
        for i, (_, _, _, device, _, _, keys) in enumerate(key[1]):
            fields, lengths = inputs[2 * i], inputs[2 * i + 1]
            _, order, rows = self._index_tensors(device, keys)
            nonempty = lengths.view(len(keys), -1).index_select(0, order) > 0  # (F', B)
            if self.stacked and self.in_order:
                add_batch_moments_(self.stack, fields, nonempty, self.precision)
                continue
            n, s, g = batch_moments(fields, nonempty, self.precision)
            if self.stacked:
                for total, part in zip(self.stack, (n, s, g)):
                    total += part.index_select(0, rows)
                continue
            for moments, index in self.plan:
                for f in index:
                    j = self.observed.index(f)
                    moments.n += n[j]
                    moments.s += s[j]
                    moments.g += g[j]


@dataclass
class _CapturedUpdate:
    """A CUDA graph of one batch's update, the input buffers it reads, and the one address
    table of the buffers that read rows in place."""

    buffers: list[list[torch.Tensor | RowGroups]]
    addresses: SharedAddresses
    graph: Any  # torch.cuda.CUDAGraph


def _capture(work: list[tuple[_Observer, Seen]], sums: list[torch.Tensor]) -> _CapturedUpdate:
    """Captures the update of ``work`` as a CUDA graph over fresh input buffers. The sums
    are left as they were: the warm-up run that capture needs (on a side stream, as
    ``torch.cuda.graphs`` asks) is undone, and capture itself runs nothing."""
    buffers = [o.buffers(key, seen) for o, (key, seen) in work]
    addresses = SharedAddresses([b for bs in buffers for b in bs if isinstance(b, RowGroups)])
    for (o, (key, seen)), bs in zip(work, buffers):
        o.fill(key, bs, seen)
    addresses.upload()

    def run() -> None:
        for (o, (key, _)), inputs in zip(work, buffers):
            o.update(key, inputs)

    saved = [t.clone() for t in sums]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(sums, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        run()
    return _CapturedUpdate(buffers, addresses, graph)


class StatsCollector:
    """Observes the outputs of ``blocks`` while the caller runs forward passes.

    Outputs are held until the observed model's forward pass returns; then one update adds
    them all: the tables of a sparse arch through one batched Gram product, the Linears of
    each width through another (a DLRM-DCNv2 has 11 Linear blocks in 5 widths).

    On CUDA the update is a few dozen small kernels a batch, which the host launches more
    slowly than the GPU runs them. So from the second batch of a shape on, the update is
    a CUDA graph: the held outputs are copied into its input buffers and the graph is
    replayed (one launch) on a side stream, where it runs beside the next batch's forward
    pass; its counts equal the eager update's and its sums match them (tested). At most
    :attr:`max_graphs` shapes are captured; others run eagerly. While the collector is
    open, the caller's work on that device runs on a high-priority stream: the GPU's
    scheduler then gives the forward pass's kernels the SMs first and the update fills
    what they leave, so the forward pass's host syncs (which gate a pass) wait only for
    its own kernels.

    Example::

        with StatsCollector(model, find_blocks(model)) as collector:
            for batch in batches:
                model(batch.dense_features, batch.sparse_features)
        stats = collector.result()
    """

    max_graphs = 4

    def __init__(
        self,
        model: nn.Module,
        blocks: Iterable[Block],
        device: torch.device | None = None,
        precision: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.cuda_graphs = cuda_graphs
        self.replays = 0  # batches whose update ran as a CUDA graph
        self._moments: dict[str, Moments] = {}
        self._observers: list[_Observer] = []
        self._handles: list[Any] = []
        self._seen: dict[Hashable, int] = {}
        self._graphs: dict[Hashable, _CapturedUpdate] = {}
        self._stream: Any = None  # torch.cuda.Stream of the replays
        self._held: list[list[torch.Tensor]] = []  # the outputs the last replay reads
        self._streams: tuple[Any, Any] | None = None  # (the caller's stream, the high-priority one)

    @property
    def moments(self) -> dict[str, Moments]:
        """The sums so far, by block name (outputs still held are added first)."""
        self.flush()
        self._join()
        return self._moments

    def flush(self) -> None:
        """Adds the held outputs (called when the observed model returns)."""
        work = [(o, seen) for o in self._observers if (seen := o.take()) is not None]
        if not work:
            return
        captured = self._graph(work)
        if captured is None:
            self._join()
            for o, (key, seen) in work:
                o.update(key, o.fill(key, o.buffers(key, seen), seen))
            return
        # The graph runs on a side stream, beside the next batch's forward pass: a forward
        # pass waits for the host (launches, TorchRec's input syncs) and leaves the GPU
        # idle enough to hide most of the update. The buffers are refilled only once the
        # previous replay has read them.
        current = torch.cuda.current_stream()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._join()
        for (o, (key, seen)), buffers in zip(work, captured.buffers):
            o.fill(key, buffers, seen)
        captured.addresses.upload()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            captured.graph.replay()
        # The replay may read the outputs where they lie (RowGroups): they stay allocated
        # until the current stream has waited for it (the next _join).
        self._held = [seen for _, (_, seen) in work]
        self.replays += 1

    def _join(self) -> None:
        """Makes the current stream wait for the replayed updates (before the sums are read,
        or the outputs they read are freed)."""
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        self._held = []

    def _graph(self, work: list[tuple[_Observer, Seen]]) -> _CapturedUpdate | None:
        """The CUDA graph of this batch's update: captured the second time a signature
        (which observers saw what shapes) comes; None to run it eagerly."""
        if not self.cuda_graphs or not all(t.is_cuda for _, (_, seen) in work for t in seen):
            return None
        signature = tuple((self._observers.index(o), key) for o, (key, _) in work)
        if signature not in self._graphs:
            self._seen[signature] = self._seen.get(signature, 0) + 1
            if self._seen[signature] < 2 or len(self._graphs) >= self.max_graphs:
                return None
            self._join()  # capture reads and restores the sums
            bases = {id(b): b for m in self._moments.values() for t in m.tensors()
                     for b in [t if t._base is None else t._base]}
            self._graphs[signature] = _capture(work, list(bases.values()))
        return self._graphs[signature]

    def __enter__(self) -> "StatsCollector":
        modules = dict(self.model.named_modules())
        linear_by_width: dict[int, list[Block]] = {}
        for b in self.blocks:
            if b.kind == "linear":
                linear_by_width.setdefault(b.out_features, []).append(b)
        for blocks in linear_by_width.values():
            stacked = _stacked_moments(blocks, self.device)
            self._moments.update(stacked)
            first = stacked[blocks[0].name]
            group = _WidthGroup([b.name for b in blocks], [t._base for t in first.tensors()], self.precision)
            self._observers.append(group)
            for j, b in enumerate(blocks):
                self._handles.append(modules[b.module].register_forward_hook(self._linear_hook(group, j)))
        for point in table_hooks(self.model, self.blocks):
            blocks = list(point.blocks)
            self._moments.update(_stacked_moments(blocks, self.device))
            observer = _TableObserver(blocks, list(point.features), self._moments, self.precision)
            self._observers.append(observer)
            self._handles.append(modules[point.module].register_forward_hook(observer.hook, with_kwargs=True))
        if self._observers:
            self._handles.append(self.model.register_forward_hook(lambda *_: self.flush()))
        device = torch.device(self.device) if self.device is not None else None
        if self.cuda_graphs and device is not None and device.type == "cuda":
            outer = torch.cuda.current_stream(device)
            fast = torch.cuda.Stream(device, priority=-1)  # lower is sooner
            fast.wait_stream(outer)
            torch.cuda.set_stream(fast)
            self._streams = (outer, fast)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()
        self._join()
        if self._streams is not None:
            outer, fast = self._streams
            outer.wait_stream(fast)
            torch.cuda.set_stream(outer)
            self._streams = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._graphs.clear()

    @staticmethod
    def _linear_hook(group: _WidthGroup, j: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # (B, m) as it comes: no reshape or detach where none is needed (each is a
            # dispatched op, and the host is what limits a pass on a GPU)
            y = output if output.dim() == 2 else output.reshape(-1, output.shape[-1])
            group.observe(j, y.detach() if y.requires_grad else y)

        return hook

    def load_(self, moments: Mapping[str, Moments]) -> None:
        """Starts from saved sums (a resumed pass): copied into the observed moments,
        which the hooks hold, so the accumulation continues exactly where it stopped."""
        if set(moments) != set(self._moments):
            diff = sorted(set(moments) ^ set(self._moments))
            raise InputError(f"saved statistics cover other blocks: {diff}")
        for name, saved in moments.items():
            for mine, value in zip(self._moments[name].tensors(), saved.tensors()):
                mine.copy_(value)

    def result(self, meta: dict[str, Any] | None = None) -> Statistics:
        return Statistics(dict(self.moments), dict(meta or {}))


@dataclass(frozen=True)
class StatsCheckpoint:
    """Periodic saves of a rank's moments, so that a killed statistics pass resumes.

    The moments are sums: resuming is loading them and skipping the batches they already
    count, and with a deterministic reader (no shuffling) the result is bitwise the
    uninterrupted pass's. Each rank saves ``folder/rank{r}-{batches}.pt`` atomically every
    ``every`` batches and keeps its last two. A barrier precedes every save, so a job
    killed while saving leaves its ranks at most one save apart; they resume from the
    latest save that all of them hold (or from the start).

    Attributes:
        folder: where the saves go (shared by the ranks of a job).
        every: batches between saves.
        key: identifies the pass (model, data, batching, world size, blocks); saves made
            with another key are ignored.
        rank: this process's rank.
    """

    folder: Path
    every: int
    key: str
    rank: int = 0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise InputError(f"checkpoint_every must be >= 1, got {self.every}")

    def _saves(self) -> dict[int, Path]:
        """This rank's saves by number of batches counted."""
        found = self.folder.glob(f"rank{self.rank}-*.pt") if self.folder.is_dir() else []
        return {int(p.stem.rpartition("-")[2]): p for p in found}

    def _load(self, path: Path) -> dict[str, Moments] | None:
        try:  # verified against the checksum it was saved with
            state = load_checked(path, STATISTICS_SAVE_FORMAT, "statistics pass save")
        except Exception:  # a save cut short by a crash, or damaged, counts as absent, never as data
            return None
        if state.get("key") != self.key:
            return None
        return moments_from_state(state["moments"])

    def save(self, moments: Mapping[str, Moments], batches: int) -> None:
        """Saves the sums over the first ``batches`` batches (collective in a job)."""
        barrier()
        state = {
            "key": self.key,
            "batches": batches,
            "moments": moments_state(moments),
        }
        with atomic_file(self.folder / f"rank{self.rank}-{batches:012d}.pt", overwrite=True) as tmp:
            save_checked(state, tmp, STATISTICS_SAVE_FORMAT)
        saves = self._saves()
        for old in sorted(saves)[:-2]:
            saves[old].unlink(missing_ok=True)

    def resume(self) -> tuple[int, dict[str, Moments]]:
        """``(batches already counted, their moments)``; ``(0, {})`` to start afresh.

        Collective in a job: every rank returns the same number of batches.
        """
        valid = {}
        for batches, path in self._saves().items():
            moments = self._load(path)
            if moments is not None:
                valid[batches] = moments
        batches = min_over_ranks(max(valid, default=0))
        if batches and min_over_ranks(int(batches in valid)) == 0:
            batches = 0  # some rank lacks that save: only a fresh pass is consistent
        # Other saves (later ones, or of another pass) would outrank this pass's next saves.
        for other, path in self._saves().items():
            if other != batches:
                path.unlink(missing_ok=True)
        return batches, valid.get(batches, {}) if batches else {}

    def clear(self) -> None:
        """Removes the saves once the pass's result is written (rank 0 only)."""
        if self.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)


def _batches_from(batches: Iterable[Any], first: int) -> Iterable[Any]:
    """``batches`` from batch ``first`` (0-based) on.

    A reader that can start there (``set_first_batch``, as
    :class:`~afmrec.pipeline.data.ParquetBatches` has) reads none of the batches before,
    and starts at 0 again once iterated; any other iterable is read through them.
    """
    if not hasattr(batches, "set_first_batch"):
        yield from itertools.islice(batches, first, None)
        return
    batches.set_first_batch(first)
    try:
        yield from batches
    finally:
        batches.set_first_batch(0)


def collect_statistics(
    model: nn.Module,
    blocks: Iterable[Block],
    batches: Iterable[Any],
    *,
    progress: bool = False,
    forward: nn.Module | None = None,
    precision: str = "auto",
    checkpoint: StatsCheckpoint | None = None,
    cuda_graphs: bool = True,
    feed: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> Statistics:
    """One forward pass over ``batches`` (TorchRec ``Batch``es) with observers.

    Args:
        model: the module whose submodules are observed (block names are its paths).
        blocks: the blocks to observe.
        batches: the calibration batches.
        progress: show a progress bar.
        forward: the module to run, if not ``model`` itself (a
            ``DistributedModelParallel`` wrapping ``model``).
        precision: the batch products' precision, one of :data:`PRECISIONS` (see
            :func:`batch_moments`) or ``"auto"`` (:func:`resolve_precision` for the
            model's device); the sums over batches are float64 in all.
        checkpoint: save the moments every ``checkpoint.every`` batches and resume from
            the last save; ``batches`` must then come in the same order on every run. A
            resumed pass starts a reader that can (``set_first_batch``) at the first batch
            not saved: the batches before are not read.
        cuda_graphs: on CUDA, replay each batch's update as a CUDA graph (see
            :class:`StatsCollector`); False runs it eagerly.
        feed: how one batch is run, ``feed(module, batch)`` (batches of any type, on
            the model's device); default :func:`~afmrec.pipeline.evaluate.forward_logits`
            (``module(batch.dense_features, batch.sparse_features)``).

    Returns:
        The local (this process's) statistics, with ``meta["resumed_from_batch"]`` (0 for
        a pass from the start); call :meth:`Statistics.all_reduce_` to combine ranks.
    """
    from tqdm import tqdm

    from .evaluate import eval_mode, forward_logits, model_device

    runner = forward if forward is not None else model
    run = feed if feed is not None else forward_logits
    collector = StatsCollector(model, blocks, model_device(model), precision, cuda_graphs)
    done, saved = checkpoint.resume() if checkpoint is not None else (0, {})
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(runner), collector, torch.no_grad():
        if saved:
            collector.load_(saved)
        # The saved sums already count the batches before ``done``.
        todo = _batches_from(batches, done)
        bar = tqdm(todo, desc="stats", disable=not progress, unit="batch", total=total, initial=done)
        for i, batch in enumerate(bar, start=done + 1):
            run(runner, batch)
            if checkpoint is not None and i % checkpoint.every == 0:
                checkpoint.save(collector.moments, i)
    return collector.result({"resumed_from_batch": done})
