"""Pooled lookups of FBGEMM's packed inference rows by one Triton kernel, with the id check
inline (:class:`afmrec.models.serving.FlatLookup` serves with it in the AOTInductor
artifact on CUDA). Needs only torch (and Triton for the kernel).

The rows are those of FBGEMM's ``IntNBitTableBatchedEmbeddingBagsCodegen``, unchanged: one
byte buffer, table ``t``'s row ``i`` at byte ``row0_t + i * stride_t``, a row holding
``dim_t`` values of one :data:`ROW_KINDS` format (``int8``: a float16 scale and bias in
its first 4 bytes, then ``dim_t`` unsigned bytes, value = scale * q + bias). A bag's pooled
value is the sum of its rows; an id outside its table reads row 0 (FBGEMM's bounds check in
its ``WARNING`` mode, without the count).

Why a kernel of our own: FBGEMM's INT8 kernel is slower on 32-wide rows than its FP32 one
(1.20 against 1.10 ms a batch of 65,536 at the MLPerf shape on an H200), though it reads
half the bytes; and its bounds check, which export cannot hold, costs a separate pass.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

ROW_KINDS: dict[str, int] = {"fp32": 0, "fp16": 1, "int8": 2}
"""The row formats the kernel reads, by FBGEMM's ``SparseType`` name."""

QPARAM_BYTES = 4
"""An int8 row's leading scale and bias (two float16)."""

TABLE_FIELDS = 5
"""Rows of the ``tables`` argument: row0 (bytes), stride (bytes), rows, dim, output column."""

# Tiling: a program pools BLOCK_B bags of one table, BLOCK_J ids of each a step, all of a
# row's values at once.
BLOCK_B = 64
BLOCK_J = 1
NUM_WARPS = 4
NUM_STAGES = 2


def padded(width: int) -> int:
    """The power of two >= ``width`` (at least 16)."""
    return max(16, 1 << (width - 1).bit_length())


def decode_rows(raw: torch.Tensor, kind: int, dim: int) -> torch.Tensor:
    """Values of packed rows. Args: raw (n, stride) uint8. Returns: (n, dim) float32."""
    if kind == ROW_KINDS["int8"]:
        qparams = raw[:, :QPARAM_BYTES].contiguous().view(torch.float16).float()  # (n, 2)
        q = raw[:, QPARAM_BYTES:QPARAM_BYTES + dim].float()
        return q * qparams[:, :1] + qparams[:, 1:]
    width = 4 if kind == ROW_KINDS["fp32"] else 2
    return raw[:, :width * dim].contiguous().view(torch.float32 if width == 4 else torch.float16).float()


def pooled_lookup_reference(weights: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor,
                            offsets: torch.Tensor, kind: int, total_dim: int) -> torch.Tensor:
    """The lookup in PyTorch's ops, table by table.

    Args:
        weights: (W,) uint8, the packed rows.
        tables: (5, T) int64 (:data:`TABLE_FIELDS`).
        indices: (L,) ids, table by table, bag by bag.
        offsets: (T * B + 1,) each bag's first id in ``indices`` (bags table-major).
        kind: a :data:`ROW_KINDS` value.
        total_dim: the output's width.

    Returns: (B, total_dim) float32, table t's pooled rows in its columns.
    """
    num_tables = tables.shape[1]
    batch = (offsets.numel() - 1) // num_tables
    out = torch.zeros(batch, total_dim, device=weights.device)
    offsets = offsets.long()
    for t, (row0, stride, rows, dim, col) in enumerate(tables.t().tolist()):
        bounds = offsets[t * batch:(t + 1) * batch + 1]
        ids = indices[bounds[0]:bounds[-1]].long()
        ids = torch.where((ids >= 0) & (ids < rows), ids, torch.zeros_like(ids))
        raw = weights[row0:row0 + rows * stride].view(rows, stride)[ids]
        bag = torch.repeat_interleave(torch.arange(batch, device=weights.device), bounds.diff())
        out[:, col:col + dim].index_add_(0, bag, decode_rows(raw, kind, dim))
    return out


if triton is not None:

    @triton.jit
    def _pooled_lookup_kernel(w_ptr, ids_ptr, offsets_ptr, tables_ptr, out_ptr, B, T, out_stride,
                              KIND: tl.constexpr, QPARAM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr,
                              BLOCK_D: tl.constexpr, NUM_STAGES: tl.constexpr):
        t = tl.program_id(1)
        bags = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        bag_ok = bags < B
        first = tl.load(offsets_ptr + t * B + bags, mask=bag_ok, other=0)
        count = tl.load(offsets_ptr + t * B + bags + 1, mask=bag_ok, other=0) - first
        row0 = tl.load(tables_ptr + t)
        stride = tl.load(tables_ptr + T + t)
        rows = tl.load(tables_ptr + 2 * T + t)
        dim = tl.load(tables_ptr + 3 * T + t)
        col = tl.load(tables_ptr + 4 * T + t)
        cols = tl.arange(0, BLOCK_D)[None, None, :]
        col_ok = cols < dim
        jj = tl.arange(0, BLOCK_J)[None, :]
        acc = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        # BLOCK_J ids of each of the BLOCK_B bags a step: (BLOCK_B, BLOCK_J, BLOCK_D) tiles
        for j in tl.range(0, tl.max(count, axis=0), BLOCK_J, num_stages=NUM_STAGES):
            live = bag_ok[:, None] & (j + jj < count[:, None])
            idx = tl.load(ids_ptr + first[:, None] + j + jj, mask=live, other=0).to(tl.int64)
            idx = tl.where((idx >= 0) & (idx < rows), idx, 0)
            row = w_ptr + row0 + idx * stride  # (BLOCK_B, BLOCK_J) uint8 pointers
            m = live[:, :, None] & col_ok
            if KIND == 2:
                qp = row.to(tl.pointer_type(tl.float16), bitcast=True)
                scale = tl.load(qp, mask=live, other=0.0).to(tl.float32)[:, :, None]
                bias = tl.load(qp + 1, mask=live, other=0.0).to(tl.float32)[:, :, None]
                q = tl.load(row[:, :, None] + QPARAM + cols, mask=m, other=0).to(tl.float32)
                acc += tl.sum(q * scale + bias, axis=1)
            elif KIND == 1:
                vals = row.to(tl.pointer_type(tl.float16), bitcast=True)
                acc += tl.sum(tl.load(vals[:, :, None] + cols, mask=m, other=0.0).to(tl.float32), axis=1)
            else:
                vals = row.to(tl.pointer_type(tl.float32), bitcast=True)
                acc += tl.sum(tl.load(vals[:, :, None] + cols, mask=m, other=0.0), axis=1)
        out = out_ptr + bags[:, None] * out_stride + col + tl.arange(0, BLOCK_D)[None, :]
        tl.store(out, acc, mask=bag_ok[:, None] & (tl.arange(0, BLOCK_D) < dim)[None, :])

    def launch(weights: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
               kind: int, total_dim: int, max_dim: int) -> torch.Tensor:
        """Runs :func:`_pooled_lookup_kernel` on :func:`pooled_lookup`'s arguments (on CUDA,
        or on the CPU under Triton's interpreter, ``TRITON_INTERPRET=1``)."""
        num_tables = tables.shape[1]
        batch = (offsets.shape[0] - 1) // num_tables
        out = weights.new_empty(batch, total_dim, dtype=torch.float32)
        grid = (triton.cdiv(batch, BLOCK_B), num_tables)
        torch.library.wrap_triton(_pooled_lookup_kernel)[grid](
            weights, indices, offsets, tables, out, batch, num_tables, out.stride(0),
            KIND=kind, QPARAM=QPARAM_BYTES, BLOCK_B=BLOCK_B, BLOCK_J=BLOCK_J, BLOCK_D=padded(max_dim), NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
        return out

    @torch.library.triton_op("afmrec::pooled_lookup", mutates_args=())
    def _pooled_lookup_op(weights: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor,
                          offsets: torch.Tensor, kind: int, total_dim: int, max_dim: int) -> torch.Tensor:
        return launch(weights, tables, indices, offsets, kind, total_dim, max_dim)


def pooled_lookup(weights: torch.Tensor, tables: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                  kind: int, total_dim: int, max_dim: int) -> torch.Tensor:
    """:func:`pooled_lookup_reference`'s function (``max_dim``: the widest table's dim), as
    one Triton kernel on CUDA (elsewhere the reference): a program pools :data:`BLOCK_B`
    bags of one table, a row's values at once, the next rows' loads in flight while it
    adds (``NUM_STAGES``). Reads each id and its row once; writes (B, total_dim)."""
    if triton is None or not weights.is_cuda:
        return pooled_lookup_reference(weights, tables, indices, offsets, kind, total_dim)
    return torch.ops.afmrec.pooled_lookup(weights, tables, indices, offsets, kind, total_dim, max_dim)
