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
from dataclasses import dataclass

import torch

from .cross_kernel import padded

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

MAX_ROW_BYTES = 128
"""The widest rows served by our kernel; wider ones stay with FBGEMM's. On an H200 at the
MLPerf shape, our kernel pools 128-byte rows (32 fp32) 4.3x as fast as FBGEMM's kernel
(``bench/lookup_sweep.py``), but 512-byte rows (128 fp32, the original's) took 1.51 ms
inside the original's artifact at the tiling below, against FBGEMM's 1.28 ms."""

# Tiling: a program pools BLOCK_B bags of one table, BLOCK_J ids of each a step, all of a
# row's values at once. Swept on an H200 at the MLPerf shape (bench/lookup_sweep_h200.txt):
# the fastest over 32-wide fp32, fp16 and int8 rows (0.250, 0.212 and 0.271 ms a batch of
# 65,536, against FBGEMM's 1.071, 0.823 and 1.241 ms).
BLOCK_B = 32
BLOCK_J = 2
NUM_WARPS = 4
NUM_STAGES = 1


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

    @triton.jit
    def _step(ids_ptr, first, count, bag_ok, j, jj, row0, stride, rows, ALIGN: tl.constexpr):
        """Step j's ids of each bag: (BLOCK_B, BLOCK_J) whether live, and each row's first
        element (an id outside its table reads row 0)."""
        live = bag_ok[:, None] & (j + jj < count[:, None])
        idx = tl.load(ids_ptr + first[:, None] + j + jj, mask=live, other=0).to(tl.int64)
        idx = tl.where((idx >= 0) & (idx < rows), idx, 0)
        return live, tl.multiple_of(row0 + idx * stride, [ALIGN, ALIGN])

    @triton.jit
    def _pooled_lookup_kernel(w_ptr, ids_ptr, offsets_ptr, tables_ptr, out_ptr, B, T, out_stride,
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
        jj = tl.arange(0, BLOCK_J)[None, :]
        steps = tl.max(count, axis=0)
        cols = tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for j in tl.range(0, steps, BLOCK_J, num_stages=NUM_STAGES):
            live, row = _step(ids_ptr, first, count, bag_ok, j, jj, row0, stride, rows, ALIGN)
            if FULL:
                m = live[:, :, None]
            else:
                m = live[:, :, None] & (cols < dim)[None, None, :]
            if KIND == 2:  # bytes: a row's scale and bias (one word), then its values
                qparams = tl.load((w_ptr + row).to(tl.pointer_type(tl.int32), bitcast=True), mask=live, other=0)
                scale = (qparams & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)[:, :, None]
                bias = (qparams >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)[:, :, None]
                q = tl.load(w_ptr + row[:, :, None] + 4 + cols[None, None, :], mask=m, other=0)
                vals = q.to(tl.float32) * scale + bias
            else:
                vals = tl.load(w_ptr + row[:, :, None] + cols[None, None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(vals, axis=1)
        if FULL:
            keep = bag_ok[:, None]
        else:
            keep = bag_ok[:, None] & (cols < dim)[None, :]
        tl.store(out_ptr + bags[:, None] * out_stride + col + cols[None, :], acc, mask=keep)

    def launch(rows: KernelRows, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Runs :func:`_pooled_lookup_kernel` on :func:`pooled_lookup`'s arguments (on CUDA,
        or on the CPU under Triton's interpreter, ``TRITON_INTERPRET=1``)."""
        num_tables = rows.tables.shape[1]
        batch = (offsets.shape[0] - 1) // num_tables
        out = torch.empty(batch, rows.total_dim, dtype=torch.float32, device=rows.weights.device)
        grid = (triton.cdiv(batch, BLOCK_B), num_tables)
        torch.library.wrap_triton(_pooled_lookup_kernel)[grid](
            rows.weights, indices, offsets, rows.tables, out, batch, num_tables, out.stride(0),
            KIND=rows.kind, ALIGN=rows.align, FULL=rows.full, BLOCK_B=BLOCK_B, BLOCK_J=BLOCK_J,
            BLOCK_D=padded(rows.max_dim), NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
        return out

    @torch.library.triton_op("afmrec::pooled_lookup", mutates_args=())
    def _pooled_lookup_op(weights: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor,
                          offsets: torch.Tensor, kind: int, align: int, full: bool, total_dim: int,
                          max_dim: int) -> torch.Tensor:
        return launch(KernelRows(weights, tables, kind, align, full, total_dim, max_dim), indices, offsets)


def pooled_lookup(rows: KernelRows, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`pooled_lookup_reference`'s function, as one Triton kernel on CUDA (elsewhere
    the reference): a program pools :data:`BLOCK_B` bags of one table, :data:`BLOCK_J` ids
    of each a step, a row's values at once (in loads as wide as the rows' alignment).
    Reads each id and its row once; writes (B, total_dim).

    Args: rows: the packed rows; indices (L,), offsets (F * B + 1,): as FBGEMM takes them.
    Returns: (B, total_dim) float32."""
    if triton is None or not rows.weights.is_cuda:
        return pooled_lookup_reference(rows.weights, rows.tables, indices, offsets, rows.kind, rows.total_dim)
    return torch.ops.afmrec.pooled_lookup(rows.weights, rows.tables, indices, offsets, rows.kind, rows.align,
                                          rows.full, rows.total_dim, rows.max_dim)
