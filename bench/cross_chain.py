"""The fused cross network's layers chained without their (B, N) activations: each layer's
``down`` product taken straight from ``x_0`` and every earlier layer's small vector.
Needs only torch (and Triton for the kernel); loads on its own from its file path.

Unrolled, the cross network's ``x_l = x_0 * y_l + x_{l-1}`` (``x_1 = x_0 * (y_1 + 1)``,
``y_l = w_l Q_l^T + q_l``) is

    x_l = x_0 * (b_l + W_l Qcat_l^T),   b_l = 1 + q_1 + ... + q_l,

with ``W_l = [w_1 ... w_l]`` (B, Kc) and ``Qcat_l^T`` the ``up`` factors' ``Q_k^T`` stacked
(Kc, N). What the next layer (or the over arch's first low-rank factor) reads of ``x_l`` is
only ``u = x_l Dn^T`` with ``Dn`` (R_out, N), so :func:`chain_down` computes ``u`` as two
chained GEMMs, like attention's: ``x`` lives a (rows, columns) tile at a time in registers
and is never written.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def _padded(width: int) -> int:
    """The power of two >= ``width`` (at least 16): tensor-core tiles' widths
    (``cross_kernel.padded``'s, repeated so that this file loads on its own)."""
    return max(16, 1 << (width - 1).bit_length())


def chain_down_reference(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                         code_weight: torch.Tensor, w_cat: torch.Tensor, up_cat_t: torch.Tensor,
                         beta: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """:func:`chain_down`'s function in PyTorch's ops (materialises ``x_0`` and ``x``).

    Args: dense (B, D); codes (B, F K); nonempty (B, F); code_weight (F, KP, D), KP > K (row
    K of field f's block the bias of a non-empty bag, the rows after it zeros); w_cat
    (B, Kc), Kc >= 0; up_cat_t (Kc, N) with N = (F + 1) D; beta (N,); down_w (R_out, N).
    Returns: u (B, R_out) = (x_0 * (beta + w_cat up_cat_t)) down_w^T."""
    batch, (fields, kp, _) = dense.shape[0], code_weight.shape
    k = codes.shape[1] // fields
    # x_0's fields: [c_f; nonempty_f; 0] W_f, as cross_kernel.interaction forms them
    z = torch.cat([codes.view(batch, fields, k), nonempty.to(codes.dtype).unsqueeze(2),
                   codes.new_zeros(batch, fields, kp - k - 1)], dim=2)
    x0 = torch.cat([dense, torch.einsum("bfk,fkd->bfd", z, code_weight).reshape(batch, -1)], dim=1)
    s = torch.addmm(beta, w_cat, up_cat_t) if w_cat.shape[1] else beta
    return (x0 * s) @ down_w.T


if triton is not None:

    @triton.jit
    def _scale_tile(w_ptr, up_ptr, beta_ptr, rows, row_ok, cols, w_stride, up_stride_k, up_stride_n,
                    KC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """s's (rows, cols) tile: beta + W Qcat^T, a product of depth KC in steps of BLOCK_K."""
        s = tl.zeros((BLOCK_M, BLOCK_N), tl.float32) + tl.load(beta_ptr + cols)[None, :]
        for k0 in range(0, KC, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + rows[:, None] * w_stride + kk[None, :], mask=row_ok[:, None] & (kk < KC)[None, :],
                        other=0.0)
            q = tl.load(up_ptr + kk[:, None] * up_stride_k + cols[None, :] * up_stride_n, mask=(kk < KC)[:, None],
                        other=0.0)
            s = tl.dot(w, q, s, input_precision="tf32")
        return s

    @triton.jit
    def _chain_down_kernel(dense_ptr, codes_ptr, nonempty_ptr, cw_ptr, w_ptr, up_ptr, beta_ptr, down_ptr, out_ptr,
                           B, R_OUT, dense_stride, codes_stride, ne_row_stride, ne_field_stride, w_stride,
                           up_stride_k, up_stride_n, down_stride_r, down_stride_n, out_stride,
                           F: tl.constexpr, D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, KC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rr < R_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for n0 in range(0, D, BLOCK_N):  # the dense field: x_0's tile is the dense row's
            cols = n0 + tl.arange(0, BLOCK_N)
            s = _scale_tile(w_ptr, up_ptr, beta_ptr, rows, row_ok, cols, w_stride, up_stride_k, up_stride_n, KC,
                            BLOCK_M, BLOCK_N, BLOCK_K)
            x0 = tl.load(dense_ptr + rows[:, None] * dense_stride + cols[None, :], mask=row_ok[:, None], other=0.0)
            dn = tl.load(down_ptr + rr[None, :] * down_stride_r + cols[:, None] * down_stride_n, mask=r_ok[None, :],
                         other=0.0)
            acc = tl.dot(x0 * s, dn, acc, input_precision="tf32")
        kc = tl.arange(0, BLOCK_C)
        for n0 in range(D, (F + 1) * D, BLOCK_N):  # the tables' fields: x_0's tile is [c_f; nonempty_f] W_f
            cols = n0 + tl.arange(0, BLOCK_N)
            s = _scale_tile(w_ptr, up_ptr, beta_ptr, rows, row_ok, cols, w_stride, up_stride_k, up_stride_n, KC,
                            BLOCK_M, BLOCK_N, BLOCK_K)
            # cross_kernel._x0_tile's product, repeated so that this file loads on its own
            field = n0 // D - 1
            within = n0 % D + tl.arange(0, BLOCK_N)
            code = tl.load(codes_ptr + rows[:, None] * codes_stride + field * K + kc[None, :],
                           mask=row_ok[:, None] & (kc < K)[None, :], other=0.0)
            weight = tl.load(cw_ptr + (field * KP + kc[:, None]) * D + within[None, :], mask=(kc < K)[:, None],
                             other=0.0)
            present = tl.load(nonempty_ptr + rows * ne_row_stride + field * ne_field_stride, mask=row_ok, other=0.0)
            bias = tl.load(cw_ptr + (field * KP + K) * D + within)
            x0 = tl.dot(code, weight, input_precision="tf32") + present[:, None] * bias[None, :]
            dn = tl.load(down_ptr + rr[None, :] * down_stride_r + cols[:, None] * down_stride_n, mask=r_ok[None, :],
                         other=0.0)
            acc = tl.dot(x0 * s, dn, acc, input_precision="tf32")
        tl.store(out_ptr + rows[:, None] * out_stride + rr[None, :], acc, mask=row_ok[:, None] & r_ok[None, :])


def chain_down(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor, code_weight: torch.Tensor,
               w_cat: torch.Tensor, up_cat_t: torch.Tensor, beta: torch.Tensor, down_w: torch.Tensor, *,
               block_m: int = 128, block_n: int = 64, block_r: int = 128, block_k: int = 16, num_warps: int = 8,
               num_stages: int = 2, warmup: bool = False) -> torch.Tensor:
    """:func:`chain_down_reference`'s ``u`` (B, R_out) as one Triton kernel on CUDA tensors
    (on any with TRITON_INTERPRET=1 set: Triton's interpreter), elsewhere the reference. All
    products TF32, everything fp32 in memory.

    A program takes ``block_m`` rows and a ``block_r``-wide chunk of R_out (``block_r`` at
    most R_out's :func:`_padded` width; each chunk recomputes its rows' ``x``; the chunks of
    a row block are neighbours in the grid, so its ``w_cat`` and codes stay in L2). It
    walks the N columns in tiles of ``block_n`` (at most D: a tile lies in one field):
    ``s = beta + W Qcat^T`` by a loop of depth Kc in steps of ``block_k``, ``x_0``'s tile
    (the dense row's, or the field's K-deep product of codes), then ``acc += (x_0 * s) Dn^T``.
    Nothing of (B, N) is read or written.

    Args: as :func:`chain_down_reference` (up_cat_t and down_w may be strided views; w_cat,
    dense and codes with contiguous rows, e.g. w_cat the first Kc columns of a (B, Kc_max)
    buffer; code_weight contiguous); the tiling (powers of two, ``block_n`` dividing D);
    warmup: only compile the kernel for these arguments (Triton's ``warmup``: queued under
    ``triton.AsyncCompileMode``), ``u`` is left unwritten."""
    if triton is None or not (dense.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return chain_down_reference(dense, codes, nonempty, code_weight, w_cat, up_cat_t, beta, down_w)
    batch, (fields, kp, dim), r_out = dense.shape[0], code_weight.shape, down_w.shape[0]
    k, kc = codes.shape[1] // fields, w_cat.shape[1]
    block_n, block_r = min(block_n, dim), min(block_r, _padded(r_out))
    if dim % block_n or (kc and w_cat.stride(1) != 1) or not code_weight.is_contiguous():
        raise ValueError("chain_down: block_n must divide D, w_cat's rows and code_weight be contiguous")
    out = dense.new_empty(batch, r_out)
    grid = (triton.cdiv(r_out, block_r), triton.cdiv(batch, block_m))
    args = (dense, codes, nonempty, code_weight, w_cat, up_cat_t, beta.contiguous(), down_w, out, batch, r_out,
            dense.stride(0), codes.stride(0), nonempty.stride(0), nonempty.stride(1), w_cat.stride(0),
            up_cat_t.stride(0), up_cat_t.stride(1), down_w.stride(0), down_w.stride(1), out.stride(0))
    meta = {"F": fields, "D": dim, "K": k, "KP": kp, "KC": kc, "BLOCK_M": block_m, "BLOCK_N": block_n,
            "BLOCK_R": block_r, "BLOCK_K": block_k, "BLOCK_C": _padded(k), "num_warps": num_warps,
            "num_stages": num_stages}
    if warmup:
        _chain_down_kernel.warmup(*args, grid=grid, **meta)
    else:
        _chain_down_kernel[grid](*args, **meta)
    return out
