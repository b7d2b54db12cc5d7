"""The statistics update's one pass over a batch's rows: centre, round, sum.

:func:`centre_round_sum` gives each group's centre (the mean of its first
:data:`PILOT_ROWS` kept rows), the rows centred there in the Gram GEMM's input type, and
their column sums. On CUDA, where Triton is installed, it is two generated kernels: one
takes the centres, the other reads each row once (float32) where it lies, writes it once
(bfloat16 or float32) and sums the rounded values in the same pass. PyTorch's own
kernels take a copy into one (G, R, m) tensor, two passes for the centre and three for
the rest, and run the centring unvectorised. Elsewhere (CPU, no Triton) it runs those
PyTorch kernels.

The rows are read where they lie through :class:`RowGroups`, a table of addresses: the
layers' outputs (a Linear's (R, m) output, a field of a sparse arch's (B, F, D) output)
are read in place, and a CUDA graph of the update reads whatever rows the table names at
replay time, so a batch's update copies no rows into the graph's buffers.

Both give the same rounded rows for a given centre (``y - mask c`` rounded once in
float32, then once to the output type, to nearest even) and column sums of those rounded
rows in float32, in another order of addition: the bound of the statistics' moments
(``batch_moments`` in ``pipeline/stats/moments.py``, its caller) holds for both.
"""

from __future__ import annotations

from typing import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# The centring pass's tiling, swept on an H100 over the six width groups of the
# MLPerf-shaped DLRM-DCNv2 (timed in a CUDA graph; BENCHMARKS.md): 64 x 128
# tiles, 4 warps, about 4,096 programs took 184 us a batch where 32 x 128 and 1,024
# programs took 211 us; 8 warps or 16-row tiles were slower.
BLOCK_R = 64
"""Rows a program loads at a time."""

MAX_BLOCK_M = 128
"""Columns a program takes at most."""

NUM_WARPS = 4
"""Warps of a program of the centring pass."""

MIN_PROGRAMS = 4096
"""Programs a launch aims for (an H100 has 132 SMs): splits over rows make up for few
groups and narrow rows."""

PILOT_ROWS = 256
"""Rows whose mean is a group's centre: close enough to the mean to keep centred values
small, without a pass over the batch."""

PILOT_BLOCK_M = 32
"""Columns a program of the centre's kernel takes (all PILOT_ROWS rows at once)."""


class AddressTable:
    """A device table of int64 addresses, refilled from host integers by one copy (enqueued
    on the current stream), none where they are the last ones. The caching allocator
    hands a layer one of a few blocks in turn, so the pinned host copies of the last few
    tables are kept."""

    def __init__(self, size: int, device: torch.device):
        self.table = torch.empty(size, dtype=torch.int64, device=device)
        self._pointed: tuple[int, ...] = ()
        self._staged: dict[tuple[int, ...], torch.Tensor] = {}  # most recent last

    def fill(self, addresses: Sequence[int]) -> None:
        key = tuple(addresses)
        if key == self._pointed:
            return
        host = self._staged.pop(key, None)
        if host is None:
            host = torch.tensor(key, dtype=torch.int64).pin_memory()
        self._staged[key] = host  # a pending copy only reads it
        if len(self._staged) > 4:
            del self._staged[next(iter(self._staged))]
        self.table.copy_(host, non_blocking=True)
        self._pointed = key


class RowGroups:
    """G groups of R float32 rows of width m, read where they lie: row r of group g starts
    ``r * row_stride`` elements after the address ``addresses[g]`` (columns contiguous).

    A kernel launched on it (also one replayed by a CUDA graph) reads the rows whose
    addresses the table holds when it runs: :meth:`point_at` moves no rows, and the
    caller keeps them alive until the kernels that read them have run. Several groups can
    share one table (:class:`SharedAddresses`): one copy then points all of them.
    """

    dtype = torch.float32

    def __init__(self, groups: int, rows: int, width: int, row_stride: int, device: torch.device):
        self.shape = (groups, rows, width)
        self.row_stride = row_stride
        self.device = torch.device(device)
        self._own: AddressTable | None = AddressTable(groups, device)  # None once shared
        self.addresses = self._own.table
        self.pointed: list[int] = []  # the host addresses of the last point_at
        self._source: torch.Tensor | None = None  # the tensor of :meth:`of`

    @classmethod
    def of(cls, y: torch.Tensor) -> "RowGroups":
        """The groups of a (G, R, m) float32 tensor whose columns are contiguous, read in
        place (the addresses computed on its device: no host sync, capturable); the
        groups hold ``y``, so its rows outlive them."""
        groups, rows, width = y.shape
        out = cls(groups, rows, width, y.stride(1), y.device)
        out._source = y
        step = y.stride(0) * y.element_size()
        torch.arange(groups, device=y.device, out=out.addresses).mul_(step).add_(y.data_ptr())
        return out

    def point_at(self, addresses: list[int]) -> None:
        """Points the groups at rows starting at ``addresses`` (host integers, each a
        ``data_ptr()``): copied to the device now, or, for shared groups, by
        :meth:`SharedAddresses.upload`."""
        self.pointed = addresses
        if self._own is not None:
            self._own.fill(addresses)


class SharedAddresses:
    """The address tables of several :class:`RowGroups` as slices of one device table, so
    that one copy a batch points all of them (a statistics update reads a few groups per
    width of output; each copy is a launch the host pays for)."""

    def __init__(self, groups: Sequence[RowGroups]):
        self.groups = list(groups)
        device = self.groups[0].device if self.groups else torch.device("cpu")
        self._table = AddressTable(sum(g.shape[0] for g in self.groups), device)
        offset = 0
        for g in self.groups:
            g._own, g.addresses = None, self._table.table[offset : offset + g.shape[0]]
            offset += g.shape[0]

    def upload(self) -> None:
        """Copies what the groups were last pointed at to the device (current stream)."""
        if self.groups:
            self._table.fill([a for g in self.groups for a in g.pointed])


def reads_in_place(y: torch.Tensor) -> bool:
    """Whether :func:`centre_round_sum` can read the rows of ``y`` (a (R, m) or (B, F, D)
    float32 output) in place through :class:`RowGroups`: on CUDA with Triton."""
    return triton is not None and y.is_cuda and y.dtype == torch.float32 and y.stride(-1) == 1


def centre_round_sum(
    y: torch.Tensor | RowGroups, mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's centre, its rows centred there (masked rows 0) and rounded to
    ``dtype``, and their sums over S splits of the rows.

    Args:
        y: (G, R, m) float32 rows, a tensor or :class:`RowGroups`; masked rows are 0.
        mask: (G, R) bool, the rows to count, or None for all.
        dtype: ``torch.float32`` or ``torch.bfloat16``, the Gram GEMM's input type.
    Returns:
        ``c`` (G, m) float32, the mean of each group's first :data:`PILOT_ROWS` kept rows
        (0 if none is kept); ``yc`` (G, R, m) of ``dtype``, contiguous; ``t`` (G, S, m)
        float32, the sums of ``yc``'s rows in S >= 1 consecutive splits (added in float64
        by the recombination, which is at least as accurate as one float32 sum).
    """
    if isinstance(y, RowGroups):
        return _fused(y, mask, dtype)
    if triton is not None and y.is_cuda and y.dtype == torch.float32:
        return _fused(RowGroups.of(y if y.stride(2) == 1 else y.contiguous()), mask, dtype)
    c = _pilot_centre(y, mask)
    return (c, *_unfused(y, mask, c, dtype))


def _pilot_centre(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(G, m): the mean of each group's first :data:`PILOT_ROWS` kept rows, 0 if none is."""
    pilot = y[:, :PILOT_ROWS]
    if mask is None:
        return pilot.sum(1) / max(pilot.shape[1], 1)  # no rows: 0, not a 0/0
    return pilot.sum(1) / mask[:, :PILOT_ROWS].sum(1, keepdim=True).clamp_min(1).to(y.dtype)


def _unfused(y: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`centre_round_sum` with PyTorch's kernels: a centring pass that rounds as it
    writes, and a sum (one split)."""
    yc = torch.empty(y.shape, dtype=dtype, device=y.device)
    if mask is None:
        torch.sub(y, c.unsqueeze(1), out=yc)
    else:
        torch.addcmul(y, mask.unsqueeze(2).to(y.dtype), c.unsqueeze(1), value=-1, out=yc)
    return yc, yc.sum(1, dtype=torch.float32, keepdim=True)


def add_recombined_(totals: Sequence[torch.Tensor], n: torch.Tensor, c: torch.Tensor,
                    t: torch.Tensor, gc: torch.Tensor) -> bool:
    """Adds a batch's moments, given by its centred parts, to float64 totals in one kernel.

    ``n_tot += n``, ``s_tot += n c + t`` and ``g_tot += Gc + c w^T + w c^T`` with ``w = t +
    n c / 2`` (that is, ``Gc + c t^T + t c^T + n c c^T``), ``t`` the sum of the splits'
    sums, all in float64, where Triton runs (CUDA) and the totals are contiguous;
    PyTorch's kernels take about a dozen launches for it, each a few microseconds of a
    graph replay.

    Args:
        totals: ``n`` (G,), ``s`` (G, m), ``g`` (G, m, m), float64, updated in place.
        n: (G,) float64 counts; c: (G, m) centres; t: (G, S, m) the centred rows' sums over
            S splits; gc: (G, m, m) centred Gram matrices (float32).
    Returns:
        False (nothing done) where the kernel does not apply.
    """
    n_tot, s_tot, g_tot = totals
    if triton is None or not gc.is_cuda or not all(x.is_contiguous() for x in totals):
        return False
    groups, width = c.shape
    splits = t.shape[1]
    block = min(64, max(16, triton.next_power_of_2(width)))
    grid = (groups, triton.cdiv(width, block), triton.cdiv(width, block))
    _add_recombined_kernel[grid](n_tot, s_tot, g_tot, n.contiguous(), c.contiguous(),
                                 t.contiguous(), gc.contiguous(), width, splits,
                                 SPLITS=triton.next_power_of_2(splits), BLOCK=block)
    return True


def _fused(y: RowGroups, mask: torch.Tensor | None,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`centre_round_sum` as two Triton kernels (the centres, then the pass); the
    partial sums of the row splits are added in a fixed order (deterministic)."""
    groups, rows, width = y.shape
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(width)))
    column_blocks = triton.cdiv(width, block_m)
    row_blocks = triton.cdiv(rows, BLOCK_R)
    splits = max(1, min(row_blocks, triton.cdiv(MIN_PROGRAMS, groups * column_blocks)))
    rows_per_split = triton.cdiv(row_blocks, splits) * BLOCK_R
    splits = triton.cdiv(rows, rows_per_split) if rows else 1
    c = torch.empty((groups, width), dtype=torch.float32, device=y.device)
    yc = torch.empty(y.shape, dtype=dtype, device=y.device)
    partial = torch.empty((groups, splits, width), dtype=torch.float32, device=y.device)
    keep = mask.contiguous().view(torch.uint8) if mask is not None else y.addresses  # unread stand-in
    pilot_m = min(PILOT_BLOCK_M, block_m)
    _pilot_kernel[(groups, triton.cdiv(width, pilot_m))](
        y.addresses, keep, c, rows, width, y.row_stride, PILOT_ROWS=PILOT_ROWS,
        HAS_MASK=mask is not None, BLOCK_M=pilot_m)
    _centre_round_sum_kernel[(groups, column_blocks, splits)](
        y.addresses, keep, c, yc, partial, rows, width, y.row_stride,
        ROWS_PER_SPLIT=rows_per_split, HAS_MASK=mask is not None, BLOCK_R=BLOCK_R, BLOCK_M=block_m,
        num_warps=NUM_WARPS)
    return c, yc, partial


if triton is not None:

    @triton.jit
    def _pilot_kernel(addresses_ptr, keep_ptr, c_ptr, rows, width, row_stride,
                      PILOT_ROWS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr):
        """Program (g, column block): ``c[g]``, the mean of group g's first PILOT_ROWS
        kept rows (masked rows are 0 in ``y``), 0 if none is kept; one load of all of
        them."""
        g = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        in_cols = cols < width
        y_ptr = tl.load(addresses_ptr + g).to(tl.pointer_type(tl.float32))
        row = tl.arange(0, PILOT_ROWS)
        in_rows = row < rows
        offsets = row.to(tl.int64)[:, None] * row_stride + cols[None, :]
        y = tl.load(y_ptr + offsets, mask=in_rows[:, None] & in_cols[None, :], other=0.0)
        if HAS_MASK:
            keep = tl.load(keep_ptr + g.to(tl.int64) * rows + row, mask=in_rows, other=0)
            kept = tl.sum(keep.to(tl.float32), axis=0)
        else:
            kept = tl.sum(in_rows.to(tl.float32), axis=0)
        tl.store(c_ptr + g * width + cols, tl.sum(y, axis=0) / tl.maximum(kept, 1.0), mask=in_cols)

    @triton.jit
    def _centre_round_sum_kernel(addresses_ptr, keep_ptr, c_ptr, yc_ptr, partial_ptr, rows,
                                 width, row_stride, ROWS_PER_SPLIT: tl.constexpr,
                                 HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_M: tl.constexpr):
        """Program (g, column block, split): rows ``[split * ROWS_PER_SPLIT, ...)`` of group
        g, BLOCK_M columns, read where they lie; writes their centred, rounded values
        (contiguous) and their column sums. (The split's length is a compile-time
        constant: a batch shape compiles once.)"""
        g = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(2)
        in_cols = cols < width
        y_ptr = tl.load(addresses_ptr + g).to(tl.pointer_type(tl.float32))
        centre = tl.load(c_ptr + g * width + cols, mask=in_cols, other=0.0)
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
        start = split * ROWS_PER_SPLIT
        stop = tl.minimum(start + ROWS_PER_SPLIT, rows)
        base = g.to(tl.int64) * rows * width
        for r in range(0, ROWS_PER_SPLIT, BLOCK_R):
            row = (start + r + tl.arange(0, BLOCK_R)).to(tl.int64)
            in_rows = row < stop
            inside = in_rows[:, None] & in_cols[None, :]
            y = tl.load(y_ptr + row[:, None] * row_stride + cols[None, :], mask=inside, other=0.0)
            if HAS_MASK:
                kept = tl.load(keep_ptr + g.to(tl.int64) * rows + row, mask=in_rows, other=0).to(tl.float32)
                yc = y - kept[:, None] * centre[None, :]
            else:
                yc = y - centre[None, :]
            rounded = tl.where(inside, yc, 0.0).to(yc_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(yc_ptr + base + row[:, None] * width + cols[None, :], rounded, mask=inside)
            acc += tl.sum(rounded.to(tl.float32), axis=0)
        tl.store(partial_ptr + (g * tl.num_programs(2) + split) * width + cols, acc, mask=in_cols)

    @triton.jit
    def _add_recombined_kernel(n_tot_ptr, s_tot_ptr, g_tot_ptr, n_ptr, c_ptr, t_ptr, gc_ptr,
                               width, splits, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        """Program (g, i block, j block): ``g_tot[g, i, j] += gc + c_i w_j + w_i c_j`` in
        float64, ``t`` the float64 sum of the ``splits`` partial sums; the programs of the
        first j block add ``n c_i + t_i`` to ``s_tot[g, i]``, program (g, 0, 0) adds ``n``
        to ``n_tot[g]``."""
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
        t_i = _split_sum(t_ptr, g, i, in_i, width, splits, SPLITS)
        t_j = _split_sum(t_ptr, g, j, in_j, width, splits, SPLITS)
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

    @triton.jit
    def _split_sum(t_ptr, g, cols, in_cols, width, splits, SPLITS: tl.constexpr):
        """Columns ``cols`` of ``t[g].sum(0)``, ``t`` (G, splits, width) float32, in float64."""
        split = tl.arange(0, SPLITS)
        offsets = (g * splits + split)[:, None] * width + cols[None, :]
        t = tl.load(t_ptr + offsets, mask=(split < splits)[:, None] & in_cols[None, :], other=0.0)
        return tl.sum(t.to(tl.float64), axis=0)
