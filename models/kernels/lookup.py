"""Pooled lookups of FBGEMM's packed inference rows by one Triton kernel, with the id check
inline (:class:`afmrec.models.serving.FlatLookup` serves with it in the AOTInductor
artifact on CUDA). Needs only torch (and Triton for the kernel).

The rows are those of FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``, unchanged: one
buffer, table ``t``'s row ``i`` at byte ``row0_t + i * stride_t``, a row holding ``dim_t``
values of one :data:`ROW_KINDS` format (``int8``: a float16 scale and bias in its first 4
bytes, then ``dim_t`` unsigned bytes, value = scale * q + bias). A bag's pooled value is the
sum of its rows; an id outside its table reads row 0 (FBGEMM's bounds check in its
``WARNING`` mode, without the count).

Why a kernel of our own: at the MLPerf shape on an H200 (``bench/lookup_sweep.py``),
FBGEMM's kernels pool 32-wide rows more slowly than 128-wide ones per byte (its INT8 one
even more slowly than its FP32 one, though it reads half the bytes), and its bounds check,
which export cannot hold, costs a separate pass.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .cross import padded

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

ROW_KINDS: dict[str, int] = {"fp32": 0, "fp16": 1, "int8": 2}
"""The row formats the kernel reads, by FBGEMM's ``SparseType`` name."""

ELEMENT: dict[int, torch.dtype] = {0: torch.float32, 1: torch.float16, 2: torch.uint8}
"""The element the kernel reads each format in (an int8 row: bytes, its scale and bias read
as one 32-bit word)."""

MAX_ROW_BYTES = 512
"""The widest rows our kernel reads: 128 fp32 values (the original's rows at the MLPerf
shape). Whether it or FBGEMM's kernel serves a model's rows is measured per artifact
(``afmrec bench speed``): one tiling does not suit every width."""


@dataclass(frozen=True)
class Tiling:
    """One tiling of the kernel: a program pools ``block_b`` bags of one table, ``block_j``
    ids of each a step (a row's values at once), with ``num_warps`` warps and its id loop
    pipelined ``num_stages`` deep. Every tiling sums a bag's rows in id order: the result
    does not depend on the tiling."""

    block_b: int
    block_j: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict[str, int]:
        """The kernel's meta-parameters of this tiling."""
        return {"BLOCK_B": self.block_b, "BLOCK_J": self.block_j, "NUM_STAGES": self.num_stages,
                "num_warps": self.num_warps}


TILINGS: tuple[Tiling, ...] = (
    Tiling(32, 2, 4, 1),  # the fastest for 32-wide rows of every format on an H200
    Tiling(16, 4, 4, 1),
    Tiling(64, 1, 4, 1),
    Tiling(64, 2, 8, 1),
    Tiling(32, 4, 8, 1),
    Tiling(128, 1, 8, 1),
    Tiling(16, 2, 4, 3),
    Tiling(8, 4, 2, 1),
)
"""The tilings ``triton.autotune`` measures, once per row width and format (its key: the
padded width ``BLOCK_D`` and ``KIND``), on the first eager call (the speed benchmark warms
every module up before it times it). Picked from ``bench/lookup_sweep.py``'s sweep: narrow
rows want many bags a program, wide rows fewer bags with more ids in flight."""

TUNED: dict[tuple[int, int], Tiling] = {}
"""The tiling autotune chose on this device for each (``BLOCK_D``, ``KIND``), on the last
eager call. ``torch.export`` pins it into the graph: AOTInductor would otherwise tune
again on the export's example batch (64 rows), which is not the batch served."""


@dataclass
class KernelRows:
    """Packed rows as the kernel reads them.

    Attributes:
        weights: (W,) the buffer, viewed as :data:`ELEMENT` of ``kind`` (shared, not copied).
        tables: (5, F) int64, per feature: its table's first row and row stride in elements,
            its rows, its dim (values) and its first output column.
        kind: a :data:`ROW_KINDS` value.
        align: elements by which every row start is aligned (the loads' width, <= 16 bytes).
        full: every table has the widest dim, a power of two (no column masks).
        total_dim: the output's width.
        max_dim: the widest table's dim.
    """

    weights: torch.Tensor
    tables: torch.Tensor
    kind: int
    align: int
    full: bool
    total_dim: int
    max_dim: int


def kernel_rows(weights: torch.Tensor, tables: list[list[int]], row_format: str) -> KernelRows | None:
    """The kernel's view of packed rows, or None where the kernel cannot read them (another
    format, rows wider than :data:`MAX_ROW_BYTES`, rows not aligned to the format's element,
    for int8 rows to a 32-bit word).

    Args:
        weights: (W,) uint8, the packed rows.
        tables: per feature, [first row's byte, row stride in bytes, rows, dim, output
            column].
        row_format: FBGEMM's ``SparseType`` name of every row.
    """
    kind = ROW_KINDS.get(row_format)
    if kind is None or not tables:
        return None
    size = ELEMENT[kind].itemsize
    int8 = kind == ROW_KINDS["int8"]
    dims = [t[3] for t in tables]
    row_bytes = max(d + 4 if int8 else d * size for d in dims)
    starts = [v for t in tables for v in t[:2]] + [weights.numel(), weights.data_ptr()]
    if row_bytes > MAX_ROW_BYTES or any(v % (4 if int8 else size) for v in starts):  # int8: word-aligned
        return None
    align = math.gcd(16, *starts) // size
    in_elements = [[row0 // size, stride // size, rows, dim, col] for row0, stride, rows, dim, col in tables]
    max_dim = max(dims)
    return KernelRows(weights.view(ELEMENT[kind]), torch.tensor(in_elements, dtype=torch.int64,
                                                                  device=weights.device).t().contiguous(),
                      kind, align, all(d == max_dim for d in dims) and padded(max_dim) == max_dim,
                      max(t[4] + t[3] for t in tables), max_dim)


def decode_rows(rows: torch.Tensor, kind: int, dim: int) -> torch.Tensor:
    """Values of packed rows. Args: rows (n, stride) of the kind's element. Returns: (n, dim)
    float32."""
    if kind == ROW_KINDS["int8"]:
        raw = rows.view(torch.uint8)
        qparams = raw[:, :4].contiguous().view(torch.float16).float()  # (n, 2): scale, bias
        return raw[:, 4:4 + dim].float() * qparams[:, :1] + qparams[:, 1:]
    return rows[:, :dim].float()


def pooled_lookup_reference(weights: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor,
                            offsets: torch.Tensor, kind: int, total_dim: int) -> torch.Tensor:
    """The lookup in PyTorch's ops, table by table.

    Args:
        weights, tables, kind, total_dim: a :class:`KernelRows`' fields.
        indices: (L,) ids, feature by feature, bag by bag.
        offsets: (F * B + 1,) each bag's first id in ``indices`` (bags feature-major).

    Returns: (B, total_dim) float32, feature f's pooled rows in its columns.
    """
    num_tables = tables.shape[1]
    batch = (offsets.numel() - 1) // num_tables
    out = torch.zeros(batch, total_dim, device=weights.device)
    offsets = offsets.long()
    for t, (row0, stride, rows, dim, col) in enumerate(tables.t().tolist()):
        bounds = offsets[t * batch:(t + 1) * batch + 1]
        ids = indices[bounds[0]:bounds[-1]].long()
        ids = torch.where((ids >= 0) & (ids < rows), ids, torch.zeros_like(ids))
        picked = weights[row0:row0 + rows * stride].view(rows, stride)[ids]
        bag = torch.repeat_interleave(torch.arange(batch, device=weights.device), bounds.diff())
        out[:, col:col + dim].index_add_(0, bag, decode_rows(picked, kind, dim))
    return out


if triton is not None:

    def _interpreted_bench(kernel_call, quantiles):
        """Under Triton's interpreter (tests on a CPU) every tiling runs once and none is
        timed: the first one is kept."""
        kernel_call()
        return [1.0, 1.0, 1.0]

    def _configs() -> list:
        return [triton.Config({"BLOCK_B": t.block_b, "BLOCK_J": t.block_j, "NUM_STAGES": t.num_stages},
                              num_warps=t.num_warps) for t in TILINGS]

    @triton.jit
    def _pooled_lookup_body(w_ptr, ids_ptr, offsets_ptr, tables_ptr, out_ptr, B, T, out_stride,
                            KIND: tl.constexpr, ALIGN: tl.constexpr, FULL: tl.constexpr, BLOCK_B: tl.constexpr,
                            BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr):
        t = tl.program_id(1)
        bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        bag_ok = bags < B
        first = tl.load(offsets_ptr + t * B + bags, mask=bag_ok, other=0)
        count = tl.load(offsets_ptr + t * B + bags + 1, mask=bag_ok, other=0) - first
        row0 = tl.load(tables_ptr + t)  # elements, as the stride
        stride = tl.load(tables_ptr + T + t)
        rows = tl.load(tables_ptr + 2 * T + t)
        dim = tl.load(tables_ptr + 3 * T + t)
        col = tl.load(tables_ptr + 4 * T + t)
        steps = tl.max(count, axis=0)
        cols = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for j in tl.range(0, steps, BLOCK_J, num_stages=NUM_STAGES):
            # BLOCK_J ids of each bag a step, their loads issued together, added in id order
            for u in tl.static_range(BLOCK_J):
                live = bag_ok & (j + u < count)
                idx = tl.load(ids_ptr + first + j + u, mask=live, other=0).to(tl.int64)
                idx = tl.where((idx >= 0) & (idx < rows), idx, 0)  # outside its table: row 0
                row = tl.multiple_of(row0 + idx * stride, ALIGN)
                if FULL:
                    m = live[:, None]
                else:
                    m = live[:, None] & (cols < dim)[None, :]
                if KIND == 2:  # bytes: a row's scale and bias (one word), then its values
                    qparams = tl.load((w_ptr + row).to(tl.pointer_type(tl.int32), bitcast=True), mask=live,
                                      other=0)
                    scale = (qparams & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)[:, None]
                    bias = (qparams >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)[:, None]
                    q = tl.load(w_ptr + row[:, None] + 4 + cols[None, :], mask=m, other=0)
                    acc += q.to(tl.float32) * scale + bias
                else:
                    acc += tl.load(w_ptr + row[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if FULL:
            keep = bag_ok[:, None]
        else:
            keep = bag_ok[:, None] & (cols < dim)[None, :]
        tl.store(out_ptr + bags[:, None] * out_stride + col + cols[None, :], acc, mask=keep)

    _pooled_lookup_kernel = triton.autotune(
        configs=_configs(), key=["BLOCK_D", "KIND"],
        do_bench=_interpreted_bench if os.environ.get("TRITON_INTERPRET") == "1" else None,
    )(_pooled_lookup_body)

    def launch(rows: KernelRows, indices: torch.Tensor, offsets: torch.Tensor,
               tiling: Tiling | None = None) -> torch.Tensor:
        """Runs the kernel on :func:`pooled_lookup`'s arguments (on CUDA, or on the CPU under
        Triton's interpreter, ``TRITON_INTERPRET=1``): autotuned over :data:`TILINGS` (its
        choice kept in :data:`TUNED`; while tracing, :data:`TUNED`'s tiling where there is
        one), or in ``tiling``."""
        num_tables = rows.tables.shape[1]
        batch = (offsets.shape[0] - 1) // num_tables
        out = torch.empty(batch, rows.total_dim, dtype=torch.float32, device=rows.weights.device)
        args = (rows.weights, indices, offsets, rows.tables, out, batch, num_tables, out.stride(0))
        meta = dict(KIND=rows.kind, ALIGN=rows.align, FULL=rows.full, BLOCK_D=padded(rows.max_dim))
        key = (meta["BLOCK_D"], rows.kind)
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if tiling is None and tracing:
            tiling = TUNED.get(key)
        if tiling is not None:
            torch.library.wrap_triton(_pooled_lookup_body)[(triton.cdiv(batch, tiling.block_b), num_tables)](
                *args, **meta, **tiling.meta())
            return out
        grid = lambda m: (triton.cdiv(batch, m["BLOCK_B"]), num_tables)  # noqa: E731
        torch.library.wrap_triton(_pooled_lookup_kernel)[grid](*args, **meta)
        best = getattr(_pooled_lookup_kernel, "best_config", None)
        if not tracing and best is not None:
            TUNED[key] = Tiling(best.kwargs["BLOCK_B"], best.kwargs["BLOCK_J"], best.num_warps,
                                best.kwargs["NUM_STAGES"])
        return out

    @torch.library.triton_op("afmrec::pooled_lookup", mutates_args=())
    def _pooled_lookup_op(weights: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor,
                          offsets: torch.Tensor, kind: int, align: int, full: bool, total_dim: int,
                          max_dim: int) -> torch.Tensor:
        return launch(KernelRows(weights, tables, kind, align, full, total_dim, max_dim), indices, offsets)


def pooled_lookup(rows: KernelRows, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`pooled_lookup_reference`'s function, as one Triton kernel on CUDA (elsewhere
    the reference): a program pools a block of bags of one table, a few ids of each a step,
    a row's values at once (in loads as wide as the rows' alignment), its tiling autotuned
    (:data:`TILINGS`). Reads each id and its row once; writes (B, total_dim).

    Args: rows: the packed rows; indices (L,), offsets (F * B + 1,): as FBGEMM takes them.
    Returns: (B, total_dim) float32."""
    if triton is None or not rows.weights.is_cuda:
        return pooled_lookup_reference(rows.weights, rows.tables, indices, offsets, rows.kind, rows.total_dim)
    return torch.ops.afmrec.pooled_lookup(rows.weights, rows.tables, indices, offsets, rows.kind, rows.align,
                                          rows.full, rows.total_dim, rows.max_dim)
