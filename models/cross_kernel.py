"""One step of the fused cross network (:mod:`afmrec.models.fused_cross`): the kernel and
its PyTorch reference. Needs only torch (and Triton for the kernel).

A step computes, for a row of the batch,

    x = x_0 * (beta + w Q^T) [+ x_prev],     z = A x + a,

with ``x_0`` (N = (F + 1) D wide) assembled from the dense row and the F fields' K-wide
codes, ``w`` (R wide) the small vectors of earlier layers and ``Q^T`` (R, N) their ``up``
factors; optionally it also writes ``x`` (the next step's ``x_prev``). The kernel walks
the N columns :data:`CHUNK` at a time and never writes ``x_0`` or ``s``.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


BLOCK_B = 128
"""Rows a program takes."""

CHUNK = 64
"""Columns of the interaction a program handles at a time."""

MAX_BLOCK_O = 128
"""Output columns a program accumulates at most (wider outputs take several programs,
each recomputing ``x``)."""

MAX_BLOCK_R = 128
"""Columns of ``w`` a product reads at a time."""

NUM_WARPS = 8

NUM_STAGES = 2


def padded(width: int) -> int:
    """The power of two >= ``width`` (at least 16): tensor-core tiles' widths."""
    return max(16, 1 << (width - 1).bit_length())


def interaction(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                code_weight: torch.Tensor) -> torch.Tensor:
    """``x_0`` (B, (F + 1) D): the dense row, then each field's ``W_f^T [c_f; nonempty_f]``.

    Args: dense (B, D); codes (B, F K); nonempty (B, F); code_weight (F, KP, D), KP > K
    (row K is the bias of a non-empty bag, rows past it zeros)."""
    batch, (fields, _, dim) = dense.shape[0], code_weight.shape
    k = codes.shape[1] // fields
    z = codes.view(batch, fields, k).transpose(0, 1)  # (F, B, K)
    x = torch.bmm(z, code_weight[:, :k]) + nonempty.T.unsqueeze(2) * code_weight[:, k].unsqueeze(1)
    return torch.cat([dense, x.transpose(0, 1).reshape(batch, fields * dim)], dim=1)


def cross_step_reference(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                         code_weight: torch.Tensor, ws: torch.Tensor, up_t: torch.Tensor,
                         beta: torch.Tensor, prev: Optional[torch.Tensor], down_t: torch.Tensor,
                         down_bias: torch.Tensor, width: int, keep: bool
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The step in PyTorch's ops (materialises the (B, N) tensors).

    Args: dense, codes, nonempty, code_weight: as :func:`interaction`; ws (B, R); up_t
    (R, N); beta (N,); prev (B, N) or None; down_t (N, k_pad) = ``A^T`` zero-padded;
    down_bias (k_pad,); width: k; keep: return ``x``.
    Returns: z (B, k) and x (B, N) (an empty tensor unless ``keep``)."""
    s = torch.addmm(beta, ws, up_t) if ws.shape[1] else beta
    x = interaction(dense, codes, nonempty, code_weight) * s
    if prev is not None:
        x = x + prev
    z = torch.addmm(down_bias[:width], x, down_t[:, :width])
    return z, x if keep else x.new_empty(0)


if triton is not None:

    @triton.jit
    def _chunk(acc, x0, col0, rows, row_ok, ws_ptr, ws_stride, up_ptr, beta_ptr, prev_ptr, prev_stride,
               x_ptr, x_stride, write, down_ptr, down_stride, o,
               R: tl.constexpr, N: tl.constexpr, HAS_PREV: tl.constexpr, WRITE_X: tl.constexpr,
               CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
        """acc + x A^T over columns [col0, col0 + CHUNK), x = x0 * (beta + ws Q^T) [+ prev]."""
        cols = col0 + tl.arange(0, CHUNK)
        s = tl.zeros((BLOCK_B, CHUNK), tl.float32) + tl.load(beta_ptr + cols)[None, :]
        for r0 in tl.static_range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            w = tl.load(ws_ptr + rows[:, None] * ws_stride + rr[None, :],
                        mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)
            q = tl.load(up_ptr + rr[:, None] * N + cols[None, :], mask=(rr < R)[:, None], other=0.0)
            s = tl.dot(w, q, s)
        x = x0 * s
        if HAS_PREV:
            x += tl.load(prev_ptr + rows[:, None] * prev_stride + cols[None, :], mask=row_ok[:, None], other=0.0)
        if WRITE_X:
            tl.store(x_ptr + rows[:, None] * x_stride + cols[None, :], x, mask=row_ok[:, None] & write)
        a = tl.load(down_ptr + cols[:, None] * down_stride + o[None, :])
        return tl.dot(x, a, acc)

    @triton.jit
    def _cross_step_kernel(dense_ptr, codes_ptr, nonempty_ptr, cw_ptr, ws_ptr, up_ptr, beta_ptr, prev_ptr,
                           down_ptr, bias_ptr, out_ptr, x_ptr, B,
                           dense_stride, codes_stride, ne_row_stride, ne_field_stride, ws_stride,
                           prev_stride, down_stride, out_stride, x_stride,
                           F: tl.constexpr, D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                           R: tl.constexpr, OUT: tl.constexpr, HAS_PREV: tl.constexpr,
                           WRITE_X: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
        N: tl.constexpr = (F + 1) * D
        PER_FIELD: tl.constexpr = D // CHUNK
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        write = tl.program_id(1) == 0  # one program of a row block writes x
        c = tl.arange(0, CHUNK)
        acc = tl.zeros((BLOCK_B, BLOCK_O), tl.float32)
        for h in range(PER_FIELD):  # the dense row: field 0
            x0 = tl.load(dense_ptr + rows[:, None] * dense_stride + h * CHUNK + c[None, :],
                         mask=row_ok[:, None], other=0.0)
            acc = _chunk(acc, x0, h * CHUNK, rows, row_ok, ws_ptr, ws_stride, up_ptr, beta_ptr, prev_ptr,
                         prev_stride, x_ptr, x_stride, write, down_ptr, down_stride, o,
                         R, N, HAS_PREV, WRITE_X, CHUNK, BLOCK_B, BLOCK_R)
        kk = tl.arange(0, BLOCK_K)
        for j in range(F * PER_FIELD):
            f = j // PER_FIELD
            h = j % PER_FIELD
            code = tl.load(codes_ptr + rows[:, None] * codes_stride + f * K + kk[None, :],
                           mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
            w = tl.load(cw_ptr + (f * KP + kk[:, None]) * D + h * CHUNK + c[None, :],
                        mask=(kk < K)[:, None], other=0.0)
            present = tl.load(nonempty_ptr + rows * ne_row_stride + f * ne_field_stride, mask=row_ok,
                              other=0.0)
            b2 = tl.load(cw_ptr + (f * KP + K) * D + h * CHUNK + c)
            x0 = tl.dot(code, w) + present[:, None] * b2[None, :]
            acc = _chunk(acc, x0, D + j * CHUNK, rows, row_ok, ws_ptr, ws_stride, up_ptr, beta_ptr, prev_ptr,
                         prev_stride, x_ptr, x_stride, write, down_ptr, down_stride, o,
                         R, N, HAS_PREV, WRITE_X, CHUNK, BLOCK_B, BLOCK_R)
        acc += tl.load(bias_ptr + o)[None, :]
        tl.store(out_ptr + rows[:, None] * out_stride + o[None, :], acc,
                 mask=row_ok[:, None] & (o < OUT)[None, :])

    @torch.library.triton_op("afmrec::cross_step", mutates_args=())
    def _cross_step_op(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                       code_weight: torch.Tensor, ws: torch.Tensor, up_t: torch.Tensor,
                       beta: torch.Tensor, prev: Optional[torch.Tensor], down_t: torch.Tensor,
                       down_bias: torch.Tensor, width: int, keep: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, (fields, kp, dim) = dense.shape[0], code_weight.shape
        out = dense.new_empty(batch, width)
        x = dense.new_empty(batch, (fields + 1) * dim) if keep else dense.new_empty(0)
        k, r = codes.shape[1] // fields, ws.shape[1]
        block_o = min(MAX_BLOCK_O, down_t.shape[1])
        grid = (triton.cdiv(batch, BLOCK_B), down_t.shape[1] // block_o)
        torch.library.wrap_triton(_cross_step_kernel)[grid](
            dense, codes, nonempty, code_weight, ws, up_t, beta, prev if prev is not None else dense,
            down_t, down_bias, out, x, batch,
            dense.stride(0), codes.stride(0), nonempty.stride(0), nonempty.stride(1), ws.stride(0),
            prev.stride(0) if prev is not None else 0, down_t.stride(0), out.stride(0),
            x.stride(0) if keep else 0,
            F=fields, D=dim, K=k, KP=kp, R=r, OUT=width, HAS_PREV=prev is not None, WRITE_X=keep,
            CHUNK=min(CHUNK, dim), BLOCK_B=BLOCK_B, BLOCK_K=padded(k),
            BLOCK_R=min(MAX_BLOCK_R, padded(r)), BLOCK_O=block_o,
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        return out, x


def cross_step(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
               code_weight: torch.Tensor, ws: torch.Tensor, up_t: torch.Tensor, beta: torch.Tensor,
               prev: Optional[torch.Tensor], down_t: torch.Tensor, down_bias: torch.Tensor,
               width: int, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_step_reference`'s function, as one Triton kernel on CUDA (elsewhere the
    reference). A program takes :data:`BLOCK_B` rows and up to :data:`MAX_BLOCK_O` output
    columns, walks the N columns :data:`CHUNK` at a time (``x_0``'s chunk from the codes, a
    K-deep product; ``s``'s from ``ws``, an R-deep one) and accumulates ``x A^T`` in
    registers. ``down_t``'s padded width must be a power of two (:func:`padded`)."""
    if triton is None or not dense.is_cuda:
        return cross_step_reference(dense, codes, nonempty, code_weight, ws, up_t, beta, prev, down_t,
                                    down_bias, width, keep)
    return torch.ops.afmrec.cross_step(dense, codes, nonempty, code_weight, ws, up_t, beta, prev, down_t,
                                       down_bias, width, keep)
