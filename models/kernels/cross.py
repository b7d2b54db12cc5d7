"""One layer of the fused cross network (:mod:`afmrec.models.fused_cross`): the kernel and
its PyTorch reference. Needs only torch (and Triton for the kernel).

An update computes, for a row of the batch,

    x = x_0 * (beta + w Q^T) [+ x_prev],

with ``x_0`` (N = (F + 1) D wide) assembled from the dense row and the F fields' codes
(:class:`CodeLayout`: K-wide codes, one K for all or one per table, and whole tables'
D-wide rows), ``w`` (R wide) a layer's small vector and ``Q^T`` (R, N) its ``up`` factor.
The kernel is a GEMM of depth R whose epilogue forms ``x_0``'s tile from the codes (a
K-deep product, or the row itself) and applies the update: ``x_0`` is never written or
read, and neither is ``y``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


# Tiling swept on an H200 at the MLPerf shape (bench/fused_cross_sweep.py, its output in
# bench/fused_cross_sweep_h200.txt). Before, a program took one 128 x 64 tile with 4 warps
# (255 registers a thread, bound by latency): one update (reads x_prev, writes x) took
# 1.23 ms, 1.48 TB/s. Now a program keeps its rows' w in registers and walks TILES column
# tiles, so one tile's loads (Q^T's, x_prev's, the codes') are in flight while the last one
# computes, as FlashAttention's forward walks its key blocks; small programs of 2 warps
# (64 x 32 tiles) fill the SMs best: 0.95 ms, 1.91 TB/s, and the three-layer chain 3.27 ms
# against 3.92.
BLOCK_B = 64
"""Rows a program takes."""

BLOCK_N = 32
"""Columns of a tile (at most the embedding width: a tile's columns lie in one field)."""

MAX_RESIDENT_R = 128
"""Widest (padded) w a program keeps in registers over its tiles; a wider one is read in
chunks of this width for every tile."""

TILES = 12
"""Most column tiles a program walks (the largest divisor of the tile count up to this)."""

NUM_WARPS = 2

NUM_STAGES = 2


def padded(width: int) -> int:
    """The power of two >= ``width`` (at least 16): tensor-core tiles' widths."""
    return max(16, 1 << (width - 1).bit_length())


@dataclass(frozen=True)
class CodeLayout:
    """Where each field's code lies in the codes (B, C), and how it becomes its D-wide
    field of ``x_0``.

    Attributes:
        fields: per field, (column, width): width k > 0, a k-wide code that becomes
            ``[c_f; nonempty_f] W_f`` (``code_weight[f, :k]``, then the non-empty bias
            ``code_weight[f, bias_row]``); width 0, a whole table's pooled row, its D
            columns taken as they are.
        bias_row: the row of ``code_weight`` holding the non-empty bias (at least the
            widest code's width).
        codes_width: C.
    """

    fields: tuple[tuple[int, int], ...]
    bias_row: int
    codes_width: int

    @classmethod
    def of_widths(cls, widths: tuple[int, ...] | list[int], dim: int) -> "CodeLayout":
        """Fields of the given code widths (0: a whole table's ``dim``-wide row), one
        after another; the bias row is the widest code's width."""
        spans = [w or dim for w in widths]
        columns = [sum(spans[:i]) for i in range(len(spans))]
        return cls(tuple(zip(columns, widths)), max(widths), sum(spans))

    @classmethod
    def uniform(cls, fields: int, k: int) -> "CodeLayout":
        """F codes of one width K, one after another (a collection in serving form)."""
        return cls.of_widths([k] * fields, k)

    def tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(F, 2) int32: each field's column and width, as the kernel reads them."""
        return torch.tensor(self.fields, dtype=torch.int32, device=device).view(-1, 2)


def code_weight_rows(bias_row: int, multiple: int) -> int:
    """KP, the rows of a ``code_weight`` (F, KP, D): past ``bias_row``, rounded up to a
    multiple of ``multiple`` (aligned tiles for the kernels)."""
    return -(-(bias_row + 1) // multiple) * multiple


def project_codes(codes: torch.Tensor, nonempty: torch.Tensor, code_weight: torch.Tensor,
                  out: torch.Tensor, k: int, pad: int) -> None:
    """Writes each field's ``[c_f; nonempty_f; 0] W_f`` into ``out`` with one batched GEMM.

    Args: codes (B, F K); nonempty (B, F); code_weight (F, K + 1 + pad, D) (row K the bias
    of a non-empty bag, the ``pad`` rows after it zeros); out (B, F, D), may be a view of a
    larger buffer; k, pad: Python ints (shapes are not read, so torch.fx can trace it)."""
    fields = code_weight.shape[0]
    z = codes.view(-1, fields, k)  # (B, F, K)
    parts = [z, nonempty.to(z.dtype).unsqueeze(2)] + ([z.new_zeros(z.shape[0], fields, pad)] if pad else [])
    # (F, B, K + 1 + pad) @ (F, K + 1 + pad, D) -> (F, B, D), i.e. ``out`` transposed
    x = torch.cat(parts, dim=2).transpose(0, 1)
    if torch.compiler.is_exporting():
        # torch.export replays the write through out's transposed view on out's base and
        # gives the base the view's strides, which the caller's later views of it (a
        # flattening) cannot take: AOTInductor failed on the CPU. A copy exports cleanly.
        out.copy_(torch.bmm(x, code_weight).transpose(0, 1))
    else:
        torch.bmm(x, code_weight, out=out.transpose(0, 1))


def interaction(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                code_weight: torch.Tensor, layout: CodeLayout | None = None) -> torch.Tensor:
    """``x_0`` (B, (F + 1) D): the dense row, then each field (:class:`CodeLayout`; None:
    F codes of one width, projected by :func:`project_codes` as the plain serving form
    writes them).

    Args: dense (B, D); codes (B, C); nonempty (B, F); code_weight (F, KP, D), KP > the
    bias row."""
    batch, (fields, kp, dim) = dense.shape[0], code_weight.shape
    if layout is None:
        k = codes.shape[1] // fields
        x0 = dense.new_empty(batch, fields + 1, dim)
        x0.select(1, 0).copy_(dense)
        project_codes(codes, nonempty, code_weight, x0.narrow(1, 1, fields), k, kp - k - 1)
        return x0.view(batch, -1)
    parts = [dense]
    for f, (column, width) in enumerate(layout.fields):
        if width == 0:
            parts.append(codes[:, column:column + dim])
        else:
            bias = nonempty[:, f:f + 1].to(codes.dtype) * code_weight[f, layout.bias_row]
            parts.append(torch.addmm(bias, codes[:, column:column + width], code_weight[f, :width]))
    return torch.cat(parts, 1)


def cross_update_reference(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                           code_weight: torch.Tensor, w: torch.Tensor, up_t: torch.Tensor,
                           beta: torch.Tensor, prev: Optional[torch.Tensor],
                           layout: CodeLayout | None = None) -> torch.Tensor:
    """The update in PyTorch's ops (materialises ``x_0`` and ``s``).

    Args: dense, codes, nonempty, code_weight, layout: as :func:`interaction`; w (B, R);
    up_t (R, N); beta (N,); prev (B, N) or None. Returns: x (B, N)."""
    s = torch.addmm(beta, w, up_t) if w.shape[1] else beta
    x = interaction(dense, codes, nonempty, code_weight, layout) * s
    return x + prev if prev is not None else x


if triton is not None:

    @triton.jit
    def _x0_tile(dense_ptr, codes_ptr, nonempty_ptr, cw_ptr, layout_ptr, rows, row_ok, col0, dense_stride,
                 codes_stride, ne_row_stride, ne_field_stride, D: tl.constexpr, KB: tl.constexpr,
                 KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, X0_GIVEN: tl.constexpr):
        """x_0's (rows, [col0, col0 + BLOCK_N)) tile: the dense row's, a whole table's row
        (width 0 in the layout) or [c_f; nonempty_f] W_f (``layout_ptr``: (F, 2) int32, each
        field's column and width; row KB of W_f its bias); with X0_GIVEN, read from x_0
        itself (``dense_ptr``, (B, N))."""
        field = col0 // D - 1  # -1: the dense row
        within = col0 % D + tl.arange(0, BLOCK_N)
        if X0_GIVEN:
            x0 = tl.load(dense_ptr + rows[:, None] * dense_stride + col0 + tl.arange(0, BLOCK_N)[None, :],
                         mask=row_ok[:, None], other=0.0)
        elif field < 0:
            x0 = tl.load(dense_ptr + rows[:, None] * dense_stride + within[None, :], mask=row_ok[:, None],
                         other=0.0)
        else:
            column = tl.load(layout_ptr + 2 * field)
            width = tl.load(layout_ptr + 2 * field + 1)
            if width == 0:
                x0 = tl.load(codes_ptr + rows[:, None] * codes_stride + column + within[None, :],
                             mask=row_ok[:, None], other=0.0)
            else:
                kk = tl.arange(0, BLOCK_K)
                code = tl.load(codes_ptr + rows[:, None] * codes_stride + column + kk[None, :],
                               mask=row_ok[:, None] & (kk < width)[None, :], other=0.0)
                weight = tl.load(cw_ptr + (field * KP + kk[:, None]) * D + within[None, :],
                                 mask=(kk < width)[:, None], other=0.0)
                present = tl.load(nonempty_ptr + rows * ne_row_stride + field * ne_field_stride, mask=row_ok,
                                  other=0.0)
                bias = tl.load(cw_ptr + (field * KP + KB) * D + within)
                x0 = tl.dot(code, weight) + present[:, None] * bias[None, :]
        return x0

    @triton.jit
    def _cross_update_kernel(dense_ptr, codes_ptr, nonempty_ptr, cw_ptr, layout_ptr, w_ptr, up_ptr, beta_ptr,
                             prev_ptr, out_ptr, B, dense_stride, codes_stride, ne_row_stride, ne_field_stride,
                             w_stride, prev_stride, out_stride,
                             F: tl.constexpr, D: tl.constexpr, KB: tl.constexpr, KP: tl.constexpr,
                             R: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK_B: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                             TILES: tl.constexpr, NUM_STAGES: tl.constexpr, X0_GIVEN: tl.constexpr):
        N: tl.constexpr = (F + 1) * D
        RESIDENT: tl.constexpr = BLOCK_R >= R  # w fits one chunk: loaded once, kept in registers
        rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        rr = tl.arange(0, BLOCK_R)
        if RESIDENT:
            w = tl.load(w_ptr + rows[:, None] * w_stride + rr[None, :], mask=row_ok[:, None] & (rr < R)[None, :],
                        other=0.0)
        # column tiles vary fastest between programs too: the programs of one row block run
        # together and share its codes in L2
        for t in tl.range(0, TILES, num_stages=NUM_STAGES):
            col0 = (tl.program_id(0) * TILES + t) * BLOCK_N
            cols = col0 + tl.arange(0, BLOCK_N)
            s = tl.zeros((BLOCK_B, BLOCK_N), tl.float32) + tl.load(beta_ptr + cols)[None, :]
            if RESIDENT:
                q = tl.load(up_ptr + rr[:, None] * N + cols[None, :], mask=(rr < R)[:, None], other=0.0)
                s = tl.dot(w, q, s)
            else:
                for r0 in range(0, R, BLOCK_R):  # s = beta + w Q^T, chunk by chunk
                    rc = r0 + rr
                    wc = tl.load(w_ptr + rows[:, None] * w_stride + rc[None, :],
                                 mask=row_ok[:, None] & (rc < R)[None, :], other=0.0)
                    q = tl.load(up_ptr + rc[:, None] * N + cols[None, :], mask=(rc < R)[:, None], other=0.0)
                    s = tl.dot(wc, q, s)
            x0 = _x0_tile(dense_ptr, codes_ptr, nonempty_ptr, cw_ptr, layout_ptr, rows, row_ok, col0, dense_stride,
                          codes_stride, ne_row_stride, ne_field_stride, D, KB, KP, BLOCK_N, BLOCK_K, X0_GIVEN)
            if HAS_PREV:
                x = tl.load(prev_ptr + rows[:, None] * prev_stride + cols[None, :], mask=row_ok[:, None],
                            other=0.0)
                x += x0 * s
            else:
                x = x0 * s
            tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], x, mask=row_ok[:, None])

    def launch(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor, code_weight: torch.Tensor,
               w: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor, prev: Optional[torch.Tensor],
               layout: Optional[torch.Tensor] = None, bias_row: int = -1) -> torch.Tensor:
        """Runs :func:`_cross_update_kernel` on :func:`cross_update`'s arguments (on CUDA, or
        on the CPU under Triton's interpreter, ``TRITON_INTERPRET=1``); returns x.
        ``layout``: :meth:`CodeLayout.tensor` with its ``bias_row``; None: F codes of one
        width."""
        batch, (fields, kp, dim) = dense.shape[0], code_weight.shape
        out = dense.new_empty(batch, (fields + 1) * dim)
        if layout is None:
            bias_row = codes.shape[1] // fields
            layout = CodeLayout.uniform(fields, bias_row).tensor(codes.device)
        r, block_n = w.shape[1], min(BLOCK_N, dim)
        ntiles = (fields + 1) * dim // block_n
        tiles = max(t for t in range(1, TILES + 1) if ntiles % t == 0)
        grid = (ntiles // tiles, triton.cdiv(batch, BLOCK_B))
        torch.library.wrap_triton(_cross_update_kernel)[grid](
            dense, codes, nonempty, code_weight, layout, w, up_t, beta, prev if prev is not None else dense, out,
            batch, dense.stride(0), codes.stride(0), nonempty.stride(0), nonempty.stride(1), w.stride(0),
            prev.stride(0) if prev is not None else 0, out.stride(0),
            F=fields, D=dim, KB=bias_row, KP=kp, R=r, HAS_PREV=prev is not None, BLOCK_B=BLOCK_B, BLOCK_N=block_n,
            BLOCK_K=padded(bias_row), BLOCK_R=min(padded(r), MAX_RESIDENT_R), TILES=tiles, NUM_STAGES=NUM_STAGES,
            X0_GIVEN=False,  # every argument named: torch.export's Triton wrapper does not fill defaults
            num_warps=NUM_WARPS)
        return out

    def launch_x0(x0: torch.Tensor, w: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor,
                  prev: Optional[torch.Tensor]) -> torch.Tensor:
        """Runs :func:`_cross_update_kernel` on :func:`cross_update_x0`'s arguments: the same
        GEMM and epilogue, ``x_0``'s tiles read from ``x0`` (the codes' arguments unused)."""
        batch, n = x0.shape
        out = x0.new_empty(batch, n)
        r, block_n = w.shape[1], x0_block_n(n)
        ntiles = n // block_n
        tiles = max(t for t in range(1, TILES + 1) if ntiles % t == 0)
        grid = (ntiles // tiles, triton.cdiv(batch, BLOCK_B))
        torch.library.wrap_triton(_cross_update_kernel)[grid](
            x0, x0, x0, x0, x0, w, up_t, beta, prev if prev is not None else x0, out, batch,
            x0.stride(0), 0, 0, 0, w.stride(0), prev.stride(0) if prev is not None else 0, out.stride(0),
            F=0, D=n, KB=1, KP=2, R=r, HAS_PREV=prev is not None, BLOCK_B=BLOCK_B, BLOCK_N=block_n, BLOCK_K=16,
            BLOCK_R=min(padded(r), MAX_RESIDENT_R), TILES=tiles, NUM_STAGES=NUM_STAGES, X0_GIVEN=True,
            num_warps=NUM_WARPS)
        return out

    @torch.library.triton_op("afmrec::cross_update_x0", mutates_args=())
    def _cross_update_x0_op(x0: torch.Tensor, w: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor,
                            prev: Optional[torch.Tensor]) -> torch.Tensor:
        return launch_x0(x0, w, up_t, beta, prev)

    @torch.library.triton_op("afmrec::cross_update", mutates_args=())
    def _cross_update_op(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                         code_weight: torch.Tensor, w: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor,
                         prev: Optional[torch.Tensor], layout: Optional[torch.Tensor], bias_row: int) -> torch.Tensor:
        return launch(dense, codes, nonempty, code_weight, w, up_t, beta, prev, layout, bias_row)


def cross_update(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                 code_weight: torch.Tensor, w: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor,
                 prev: Optional[torch.Tensor], layout: CodeLayout | None = None,
                 layout_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`cross_update_reference`'s function, as one Triton kernel on CUDA (elsewhere the
    reference): a program takes :data:`BLOCK_B` rows, keeps their ``w`` in registers and
    walks up to :data:`TILES` column tiles of :data:`BLOCK_N` (each inside one field): per
    tile it accumulates ``w Q^T`` over R, then forms ``x_0``'s tile (the dense row's, a
    whole table's row, or ``[c_f; nonempty_f] W_f``) and the update in registers. Reads
    ``w``, the codes and ``prev``; writes ``x``: one pass over (B, N) written, one read if
    ``prev``. ``layout``: the codes' :class:`CodeLayout` (None: F codes of one width);
    ``layout_tensor``: its :meth:`CodeLayout.tensor` on the device (made here if None)."""
    if triton is None or not dense.is_cuda:
        return cross_update_reference(dense, codes, nonempty, code_weight, w, up_t, beta, prev, layout)
    if layout is not None and layout_tensor is None:
        layout_tensor = layout.tensor(dense.device)
    return torch.ops.afmrec.cross_update(dense, codes, nonempty, code_weight, w, up_t, beta, prev,
                                         layout_tensor, layout.bias_row if layout is not None else -1)


def x0_block_n(n: int) -> int:
    """Columns of a tile of :func:`cross_update_x0`: the largest power of two up to
    :data:`BLOCK_N` that divides N (at least 16, tensor-core tiles' width)."""
    block = BLOCK_N
    while block > 16 and n % block:
        block //= 2
    return block


def cross_update_x0_reference(x0: torch.Tensor, w: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor,
                              prev: Optional[torch.Tensor]) -> torch.Tensor:
    """``x0 * (beta + w up_t) [+ prev]`` in PyTorch's ops. Args: x0 (B, N); w (B, R); up_t
    (R, N); beta (N,); prev (B, N) or None. Returns: x (B, N)."""
    x = x0 * torch.addmm(beta, w, up_t)
    return x + prev if prev is not None else x


def cross_update_x0(x0: torch.Tensor, w: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor,
                    prev: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`cross_update_x0_reference`'s function, as :func:`cross_update`'s kernel with
    ``x_0`` read from memory instead of formed from codes (a cross network whose input is
    not made of codes: the original model's). On CUDA where N is a multiple of 16,
    elsewhere the reference. Reads ``w``, ``x0`` and ``prev``; writes ``x``: the ``up``
    GEMM's (B, N) output is never written."""
    if triton is None or not x0.is_cuda or x0.shape[1] % 16:
        return cross_update_x0_reference(x0, w, up_t, beta, prev)
    return torch.ops.afmrec.cross_update_x0(x0, w, up_t, beta, prev)
