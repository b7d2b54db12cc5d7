"""The statistics update's one pass over a batch's rows: centre, round, sum.

:func:`centre_round_sum` gives the centred rows in the Gram GEMM's input type and their
column sums. On CUDA, where Triton is installed, it is one generated kernel: each row is
read once (float32), written once (bfloat16 or float32), and the column sums are taken of
the rounded values in the same pass. PyTorch's own kernels take three passes for it and
run the centring unvectorised (a broadcast centre and a type cast), at about a third of
the memory bandwidth. Elsewhere (CPU, no Triton) it runs those PyTorch kernels.

Both give the same rounded rows (``y - mask c`` rounded once in float32, then once to the
output type, to nearest even) and column sums of those rounded rows in float32, in
another order of addition: the bound of :func:`~afmrec.pipeline.stats.batch_moments`
holds for both.
"""

from __future__ import annotations

from typing import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_R = 32
"""Rows a program loads at a time."""

MIN_PROGRAMS = 1024
"""Programs a launch aims for (an H100 has 132 SMs): splits over rows make up for few
groups and narrow rows."""


def centre_round_sum(
    y: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows centred at ``c`` (masked rows 0), rounded to ``dtype``, and their sums.

    Args:
        y: (G, R, m) float32 rows; masked rows are 0.
        mask: (G, R) bool, the rows to count, or None for all.
        c: (G, m) float32 centres.
        dtype: ``torch.float32`` or ``torch.bfloat16``, the Gram GEMM's input type.
    Returns:
        ``yc`` (G, R, m) of ``dtype`` and ``t`` (G, m) float32, the sum of ``yc``'s rows.
    """
    if triton is not None and y.is_cuda and y.dtype == torch.float32:
        return _fused(y, mask, c, dtype)
    return _unfused(y, mask, c, dtype)


def _unfused(y: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`centre_round_sum` with PyTorch's kernels: a centring pass that rounds as it
    writes, and a sum."""
    yc = torch.empty(y.shape, dtype=dtype, device=y.device)
    if mask is None:
        torch.sub(y, c.unsqueeze(1), out=yc)
    else:
        torch.addcmul(y, mask.unsqueeze(2).to(y.dtype), c.unsqueeze(1), value=-1, out=yc)
    return yc, yc.sum(1, dtype=torch.float32)


def add_recombined_(totals: Sequence[torch.Tensor], n: torch.Tensor, c: torch.Tensor,
                    t: torch.Tensor, gc: torch.Tensor) -> bool:
    """Adds a batch's moments, given by its centred parts, to float64 totals in one kernel.

    ``n_tot += n``, ``s_tot += n c + t`` and ``g_tot += Gc + c w^T + w c^T`` with ``w = t +
    n c / 2`` (that is, ``Gc + c t^T + t c^T + n c c^T``), all in float64, where Triton runs
    (CUDA) and the totals are contiguous; PyTorch's kernels take about a dozen launches
    for it, each a few microseconds of a graph replay.

    Args:
        totals: ``n`` (G,), ``s`` (G, m), ``g`` (G, m, m), float64, updated in place.
        n: (G,) float64 counts; c: (G, m) centres; t: (G, m) centred sums; gc: (G, m, m)
            centred Gram matrices (float32).
    Returns:
        False (nothing done) where the kernel does not apply.
    """
    n_tot, s_tot, g_tot = totals
    if triton is None or not gc.is_cuda or not all(x.is_contiguous() for x in totals):
        return False
    groups, width = c.shape
    block = min(64, max(16, triton.next_power_of_2(width)))
    grid = (groups, triton.cdiv(width, block), triton.cdiv(width, block))
    _add_recombined_kernel[grid](n_tot, s_tot, g_tot, n.contiguous(), c.contiguous(),
                                 t.contiguous(), gc.contiguous(), width, BLOCK=block)
    return True


def _fused(y: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`centre_round_sum` as one Triton kernel; the partial sums of the row splits
    are added in a fixed order (deterministic)."""
    y, c = y.contiguous(), c.contiguous()
    groups, rows, width = y.shape
    block_m = min(128, max(16, triton.next_power_of_2(width)))
    column_blocks = triton.cdiv(width, block_m)
    row_blocks = triton.cdiv(rows, BLOCK_R)
    splits = max(1, min(row_blocks, triton.cdiv(MIN_PROGRAMS, groups * column_blocks)))
    rows_per_split = triton.cdiv(row_blocks, splits) * BLOCK_R
    splits = triton.cdiv(rows, rows_per_split) if rows else 1
    yc = torch.empty(y.shape, dtype=dtype, device=y.device)
    partial = torch.empty((groups, splits, width), dtype=torch.float32, device=y.device)
    keep = mask.contiguous().view(torch.uint8) if mask is not None else y  # y: an unread stand-in
    _centre_round_sum_kernel[(groups, column_blocks, splits)](
        y, keep, c, yc, partial, rows, width,
        ROWS_PER_SPLIT=rows_per_split, HAS_MASK=mask is not None, BLOCK_R=BLOCK_R, BLOCK_M=block_m,
    )
    return yc, partial.sum(1)


if triton is not None:

    @triton.jit
    def _centre_round_sum_kernel(y_ptr, keep_ptr, c_ptr, yc_ptr, partial_ptr, rows, width,
                                 ROWS_PER_SPLIT: tl.constexpr, HAS_MASK: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr):
        """Program (g, column block, split): rows ``[split * ROWS_PER_SPLIT, ...)`` of group
        g, BLOCK_M columns; writes their centred, rounded values and their column sums.
        (The split's length is a compile-time constant: a batch shape compiles once.)"""
        g = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(2)
        in_cols = cols < width
        centre = tl.load(c_ptr + g * width + cols, mask=in_cols, other=0.0)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        start = split * ROWS_PER_SPLIT
        stop = tl.minimum(start + ROWS_PER_SPLIT, rows)
        base = g.to(tl.int64) * rows * width
        for r in range(0, ROWS_PER_SPLIT, BLOCK_R):
            row = start + r + tl.arange(0, BLOCK_R)
            in_rows = row < stop
            inside = in_rows[:, None] & in_cols[None, :]
            offsets = base + row.to(tl.int64)[:, None] * width + cols[None, :]
            y = tl.load(y_ptr + offsets, mask=inside, other=0.0)
            if HAS_MASK:
                kept = tl.load(keep_ptr + g * rows + row, mask=in_rows, other=0).to(tl.float32)
                yc = y - kept[:, None] * centre[None, :]
            else:
                yc = y - centre[None, :]
            rounded = tl.where(inside, yc, 0.0).to(yc_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(yc_ptr + offsets, rounded, mask=inside)
            acc += tl.sum(rounded.to(tl.float32), axis=0)
        tl.store(partial_ptr + (g * tl.num_programs(2) + split) * width + cols, acc, mask=in_cols)

    @triton.jit
    def _add_recombined_kernel(n_tot_ptr, s_tot_ptr, g_tot_ptr, n_ptr, c_ptr, t_ptr, gc_ptr,
                               width, BLOCK: tl.constexpr):
        """Program (g, i block, j block): ``g_tot[g, i, j] += gc + c_i w_j + w_i c_j`` in
        float64; the programs of the first j block add ``n c_i + t_i`` to ``s_tot[g, i]``,
        program (g, 0, 0) adds ``n`` to ``n_tot[g]``."""
        g = tl.program_id(0)
        bi = tl.program_id(1)
        bj = tl.program_id(2)
        i = bi * BLOCK + tl.arange(0, BLOCK)
        j = bj * BLOCK + tl.arange(0, BLOCK)
        in_i = i < width
        in_j = j < width
        count = tl.load(n_ptr + g)
        c_i = tl.load(c_ptr + g * width + i, mask=in_i, other=0.0).to(tl.float64)
        c_j = tl.load(c_ptr + g * width + j, mask=in_j, other=0.0).to(tl.float64)
        t_i = tl.load(t_ptr + g * width + i, mask=in_i, other=0.0).to(tl.float64)
        t_j = tl.load(t_ptr + g * width + j, mask=in_j, other=0.0).to(tl.float64)
        w_i = t_i + 0.5 * count * c_i
        w_j = t_j + 0.5 * count * c_j
        base = g.to(tl.int64) * width * width
        offsets = base + i.to(tl.int64)[:, None] * width + j[None, :]
        inside = in_i[:, None] & in_j[None, :]
        gc = tl.load(gc_ptr + offsets, mask=inside, other=0.0).to(tl.float64)
        total = tl.load(g_tot_ptr + offsets, mask=inside, other=0.0)
        total += gc + c_i[:, None] * w_j[None, :] + w_i[:, None] * c_j[None, :]
        tl.store(g_tot_ptr + offsets, total, mask=inside)
        if bj == 0:
            s_total = tl.load(s_tot_ptr + g * width + i, mask=in_i, other=0.0)
            tl.store(s_tot_ptr + g * width + i, s_total + count * c_i + t_i, mask=in_i)
            if bi == 0:
                tl.store(n_tot_ptr + g, tl.load(n_tot_ptr + g) + count)
