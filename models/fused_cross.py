"""DLRM-DCNv2's cross network served from an AFM model's codes, without its (B, N) activations.

The cross network ``x_{l+1} = x_0 * y_{l+1} + x_l`` (``y_l = up_l(down_l(x_{l-1}))``,
``x_0`` the (B, N) interaction) unrolls to

    x_l = x_0 * s_l,    s_l = 1 + y_1 + ... + y_l.

In an AFM model every ``up`` is a low-rank pair, ``y_j = Q_j w_j + q_j`` with ``Q_j``
(N, k_j) and ``w_j`` k_j wide, so ``s_l = beta_l + [Q_1 .. Q_l] [w_1; ..; w_l]`` with
``beta_l = 1 + q_1 + ... + q_l``; and ``x_0``'s fields are the projections of the
tables' K-wide codes, ``x_0[f] = W_f^T [c_f; nonempty_f]`` (the dense arch's output is
field 0). A layer's input enters the network only through the first factor of its
``down`` (N -> k), so

    z_{l+1} = A_{l+1} (x_0 * s_l) + a_{l+1}

is computed chunk by chunk of the N columns from the codes and the (B, k_1 + .. + k_l)
``w``\\ s, with neither ``x_0`` nor ``s_l`` nor ``x_l`` ever written: a launch reads
O(B (F K + sum k)) floats instead of about six passes over (B, N) per layer (the
projection that writes ``x_0``, the two GEMMs, the element-wise update). The small maps
between ``z_l`` and ``w_l`` (the rest of ``down``, the first factor of ``up``) are one
merged (k -> k') GEMM. The last launch gives the over arch's first factor of ``x_L``.

On CUDA the launch is one Triton kernel (:func:`cross_down`, a ``torch.library`` op that
``torch.export`` and AOTInductor compile into the artifact); elsewhere the same function
in PyTorch's ops (materialising the (B, N) tensors, for reference and CPU).

The function is the model's up to floating-point order: the sums of ``y``\\ s are
added in another order than ``x_l + x_0 y``, and ``beta`` and the merged maps are
folded in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from .cross import CrossNet
from .lowrank import LowRankEmbeddingBagCollection, LowRankLinear

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

MAX_WIDTH = 256
"""Widest ``down`` factor (k) a launch accumulates: its (rows, k) accumulator lives in
registers."""

BLOCK_B = 64
"""Rows a program takes."""

CHUNK = 64
"""Columns of the interaction a program handles at a time."""

BLOCK_R = 32
"""Columns of the ``w``\\ s a program reads at a time."""

NUM_WARPS = 8

NUM_STAGES = 2


def _padded(width: int) -> int:
    return max(16, 1 << (width - 1).bit_length())


def _factors(module: nn.Module) -> tuple[nn.Linear | None, nn.Linear] | None:
    """A Linear map as (its first factor or None, its last factor), if it is a plain
    Linear or a low-rank pair without activation."""
    if isinstance(module, LowRankLinear) and isinstance(module.activation, nn.Identity):
        return module.first, module.second
    if type(module) is nn.Linear:
        return None, module
    return None


def unfusable_reason(collection: nn.Module, crossnet: nn.Module, head: nn.Module) -> str | None:
    """Why :class:`FusedCrossNet` cannot serve these modules, or None if it can."""
    if not isinstance(collection, LowRankEmbeddingBagCollection) or not collection.serving:
        return "the tables are not low-rank tables in serving form"
    if not isinstance(crossnet, CrossNet) or not len(crossnet.layers):
        return "no cross network of Linear blocks"
    dim = collection._dims[0]
    if dim < 16 or dim & (dim - 1) or dim % CHUNK and CHUNK % dim:
        return f"embedding width {dim} is not a power of 2 >= 16"
    for layer in crossnet.layers:
        down, up = _factors(layer.down), _factors(layer.up)
        if down is None or (down[0] or down[1]).out_features > MAX_WIDTH:
            return f"a cross layer's down does not start with a Linear of <= {MAX_WIDTH} outputs"
        if up is None or up[1].in_features > MAX_WIDTH:
            return f"a cross layer's up does not end with a Linear of <= {MAX_WIDTH} inputs"
    if type(head) is not nn.Linear or head.out_features > MAX_WIDTH:
        return f"the over arch does not start with a Linear of <= {MAX_WIDTH} outputs"
    return None


class FusedCrossNet(nn.Module):
    """The interaction, the cross network and the over arch's first Linear (``head``) of an
    AFM-compressed DLRM-DCNv2, from the codes (module docstring).

    Args:
        collection: the low-rank tables in serving form
            (:meth:`LowRankEmbeddingBagCollection.fuse_projections_`); their
            ``serving_weight`` is shared, not copied.
        crossnet: the cross network; every ``up`` a :class:`LowRankLinear`.
        head: the first Linear applied to the network's output (N -> k_o).
    """

    def __init__(self, collection: LowRankEmbeddingBagCollection, crossnet: CrossNet, head: nn.Linear) -> None:
        super().__init__()
        reason = unfusable_reason(collection, crossnet, head)
        if reason is not None:
            raise ValueError(f"cannot fuse the cross network: {reason}")
        self.code_weight = collection.serving_weight  # (F, KP, D), shared
        self.num_fields, self.code_width, self.dim = len(collection._dims), collection._serving[0], collection._dims[0]
        ref = head.weight
        n = (self.num_fields + 1) * self.dim
        ups, betas, beta = [], [], torch.ones(n, dtype=torch.float64, device=ref.device)
        downs: list[nn.Linear] = []
        mids: list[nn.Module] = []
        for layer in crossnet.layers:
            (down_first, down_last), (up_first, up_last) = _factors(layer.down), _factors(layer.up)
            downs.append(down_first or down_last)
            betas.append(beta.clone())
            mids.append(self._merged(down_last if down_first is not None else None, up_first))
            ups.append(up_last.weight.T)
            if up_last.bias is not None:
                beta = beta + up_last.bias.double()
        downs.append(head)
        betas.append(beta)
        self.mids = nn.ModuleList(mids)
        self.register_buffer("up_t", torch.cat(ups).contiguous())  # (sum k', N): the Q_j^T
        self.register_buffer("betas", torch.stack(betas).to(ref.dtype))  # (L + 1, N)
        self.widths = [d.out_features for d in downs]
        self.downs_t = nn.ParameterList([self._padded_t(d.weight) for d in downs])  # (N, k_pad) each
        self.down_biases = nn.ParameterList([self._padded_bias(d) for d in downs])
        self.starts = [0]
        for w in ups:
            self.starts.append(self.starts[-1] + w.shape[0])

    @staticmethod
    def _merged(*linears: nn.Linear | None) -> nn.Module:
        """The given Linears applied in turn, as one Linear (folded in float64), or the
        identity if there are none."""
        linears = tuple(m for m in linears if m is not None)
        if not linears:
            return nn.Identity()
        w = b = None
        for m in linears:
            mb = m.bias.double() if m.bias is not None else torch.zeros_like(m.weight[:, 0], dtype=torch.float64)
            w, b = (m.weight.double(), mb) if w is None else (m.weight.double() @ w, m.weight.double() @ b + mb)
        out = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=linears[0].weight.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            out.bias.copy_(b)
        return out.requires_grad_(False)

    @staticmethod
    def _padded_t(weight: torch.Tensor) -> nn.Parameter:
        out = weight.new_zeros(weight.shape[1], _padded(weight.shape[0]))
        out[:, : weight.shape[0]] = weight.detach().T
        return nn.Parameter(out, requires_grad=False)

    @staticmethod
    def _padded_bias(linear: nn.Linear) -> nn.Parameter:
        out = linear.weight.new_zeros(_padded(linear.out_features))
        if linear.bias is not None:
            out[: linear.out_features] = linear.bias.detach()
        return nn.Parameter(out, requires_grad=False)

    def forward(self, dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """Args: dense (B, D) the dense arch's output; codes (B, F K) the tables' pooled
        codes in feature order; nonempty (B, F) 1.0 where a bag has ids.
        Returns: (B, k_o), the over arch's first Linear of the cross network's output."""
        ws = codes.new_empty(codes.shape[0], 0)
        launch = cross_down if codes.is_cuda and triton is not None else cross_down_reference
        for i, mid in enumerate(self.mids):
            z = launch(dense, codes, nonempty, self.code_weight, ws, self.up_t[: self.starts[i]],
                       self.betas[i], self.downs_t[i], self.down_biases[i], self.widths[i])
            ws = torch.cat([ws, mid(z)], dim=1)
        last = len(self.mids)
        return launch(dense, codes, nonempty, self.code_weight, ws, self.up_t, self.betas[last],
                      self.downs_t[last], self.down_biases[last], self.widths[last])


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


def cross_down_reference(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                         code_weight: torch.Tensor, ws: torch.Tensor, up_t: torch.Tensor,
                         beta: torch.Tensor, down_t: torch.Tensor, down_bias: torch.Tensor,
                         width: int) -> torch.Tensor:
    """``A (x_0 * (beta + ws Q^T)) + a`` in PyTorch's ops (materialises (B, N) tensors).

    Args: dense, codes, nonempty, code_weight: as :func:`interaction`; ws (B, R); up_t
    (R, N); beta (N,); down_t (N, k_pad) = ``A^T`` zero-padded; down_bias (k_pad,);
    width: k. Returns: (B, k)."""
    s = torch.addmm(beta, ws, up_t) if ws.shape[1] else beta
    x = interaction(dense, codes, nonempty, code_weight) * s
    return torch.addmm(down_bias[:width], x, down_t[:, :width])


if triton is not None:

    @triton.jit
    def _chunk(acc, x0, col0, rows, row_ok, ws_ptr, ws_stride, up_ptr, beta_ptr, down_ptr,
               R: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_O: tl.constexpr):
        """acc + (x0 * s) A^T over columns [col0, col0 + CHUNK): s = beta + ws Q^T there."""
        cols = col0 + tl.arange(0, CHUNK)
        s = tl.zeros((BLOCK_B, CHUNK), tl.float32) + tl.load(beta_ptr + cols)[None, :]
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            w = tl.load(ws_ptr + rows[:, None] * ws_stride + rr[None, :],
                        mask=row_ok[:, None] & (rr < R)[None, :], other=0.0)
            q = tl.load(up_ptr + rr[:, None] * N + cols[None, :], mask=(rr < R)[:, None], other=0.0)
            s = tl.dot(w, q, s)
        a = tl.load(down_ptr + cols[:, None] * BLOCK_O + tl.arange(0, BLOCK_O)[None, :])
        return tl.dot(x0 * s, a, acc)

    @triton.jit
    def _cross_down_kernel(dense_ptr, codes_ptr, nonempty_ptr, cw_ptr, ws_ptr, up_ptr, beta_ptr,
                           down_ptr, bias_ptr, out_ptr, B,
                           dense_stride, codes_stride, ne_row_stride, ne_field_stride, ws_stride,
                           out_stride,
                           F: tl.constexpr, D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
                           R: tl.constexpr, OUT: tl.constexpr,
                           CHUNK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
        N: tl.constexpr = (F + 1) * D
        PER_FIELD: tl.constexpr = D // CHUNK
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        c = tl.arange(0, CHUNK)
        acc = tl.zeros((BLOCK_B, BLOCK_O), tl.float32)
        for h in range(PER_FIELD):  # the dense row: field 0
            x0 = tl.load(dense_ptr + rows[:, None] * dense_stride + h * CHUNK + c[None, :],
                         mask=row_ok[:, None], other=0.0)
            acc = _chunk(acc, x0, h * CHUNK, rows, row_ok, ws_ptr, ws_stride, up_ptr, beta_ptr,
                         down_ptr, R, N, CHUNK, BLOCK_B, BLOCK_R, BLOCK_O)
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
            acc = _chunk(acc, x0, D + j * CHUNK, rows, row_ok, ws_ptr, ws_stride, up_ptr, beta_ptr,
                         down_ptr, R, N, CHUNK, BLOCK_B, BLOCK_R, BLOCK_O)
        o = tl.arange(0, BLOCK_O)
        acc += tl.load(bias_ptr + o)[None, :]
        tl.store(out_ptr + rows[:, None] * out_stride + o[None, :], acc,
                 mask=row_ok[:, None] & (o < OUT)[None, :])

    @torch.library.triton_op("afmrec::cross_down", mutates_args=())
    def _cross_down_op(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
                       code_weight: torch.Tensor, ws: torch.Tensor, up_t: torch.Tensor,
                       beta: torch.Tensor, down_t: torch.Tensor, down_bias: torch.Tensor,
                       width: int) -> torch.Tensor:
        batch, (fields, kp, dim) = dense.shape[0], code_weight.shape
        out = dense.new_empty(batch, width)
        chunk = min(CHUNK, dim)
        torch.library.wrap_triton(_cross_down_kernel)[(triton.cdiv(batch, BLOCK_B),)](
            dense, codes, nonempty, code_weight, ws, up_t, beta, down_t, down_bias, out,
            batch,
            dense.stride(0), codes.stride(0), nonempty.stride(0), nonempty.stride(1), ws.stride(0),
            out.stride(0),
            F=fields, D=dim, K=codes.shape[1] // fields, KP=kp, R=ws.shape[1], OUT=width, CHUNK=chunk, BLOCK_B=BLOCK_B,
            BLOCK_K=_padded(codes.shape[1] // fields), BLOCK_R=BLOCK_R, BLOCK_O=down_t.shape[1],
            num_warps=NUM_WARPS, num_stages=NUM_STAGES)
        return out


def cross_down(dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor,
               code_weight: torch.Tensor, ws: torch.Tensor, up_t: torch.Tensor,
               beta: torch.Tensor, down_t: torch.Tensor, down_bias: torch.Tensor,
               width: int) -> torch.Tensor:
    """:func:`cross_down_reference`'s function as one Triton kernel (CUDA): a program takes
    :data:`BLOCK_B` rows and walks the N columns :data:`CHUNK` at a time, computing
    ``x_0``'s chunk from the codes (a K-deep product) and ``s``'s from ``ws`` (an R-deep
    product), and accumulates ``(x_0 * s) A^T`` in registers. Reads ``dense``, ``codes``,
    ``nonempty``, ``ws`` once (the weights from L2); writes (B, k)."""
    return torch.ops.afmrec.cross_down(dense, codes, nonempty, code_weight, ws, up_t, beta, down_t,
                                       down_bias, width)
