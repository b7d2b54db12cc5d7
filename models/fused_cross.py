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

A step from :data:`CARRY_FROM` on reads the previous step's ``x_{l-1}`` and adds
``x_0 * y_l`` instead (one pass over (B, N) written and read per layer, against a product
with every earlier layer's ``w``). On CUDA a step is one Triton kernel
(:func:`~afmrec.models.cross_kernel.cross_step`, a ``torch.library`` op that
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

from .cross_kernel import cross_step, padded

MAX_WIDTH = 256
"""Widest ``down`` factor (k) and ``up`` factor (k') the fused network takes."""

CARRY_FROM = 2
"""The first step that reads the previous step's ``x`` instead of recomputing ``s`` from
every earlier layer's ``w`` (see :class:`FusedCrossNet`)."""


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
    if dim < 16 or dim & (dim - 1):
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
        ups, biases = [], [torch.ones(n, dtype=torch.float64, device=ref.device)]
        downs: list[nn.Linear] = []
        mids: list[nn.Module] = []
        for layer in crossnet.layers:
            (down_first, down_last), (up_first, up_last) = _factors(layer.down), _factors(layer.up)
            downs.append(down_first or down_last)
            mids.append(self._merged(down_last if down_first is not None else None, up_first))
            ups.append(up_last.weight.T)
            biases.append(up_last.bias.double() if up_last.bias is not None else torch.zeros_like(biases[0]))
        downs.append(head)
        self.mids = nn.ModuleList(mids)
        self.register_buffer("up_t", torch.cat(ups).contiguous())  # (sum k', N): the Q_j^T
        # row 0: 1; row l: q_l (a carrying step's beta); betas row l: 1 + q_1 + .. + q_l
        self.register_buffer("up_biases", torch.stack(biases).to(ref.dtype))
        self.register_buffer("betas", torch.stack(biases).cumsum(0).to(ref.dtype))  # (L + 1, N)
        self.carry_from = CARRY_FROM
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
        out = weight.new_zeros(weight.shape[1], padded(weight.shape[0]))
        out[:, : weight.shape[0]] = weight.detach().T
        return nn.Parameter(out, requires_grad=False)

    @staticmethod
    def _padded_bias(linear: nn.Linear) -> nn.Parameter:
        out = linear.weight.new_zeros(padded(linear.out_features))
        if linear.bias is not None:
            out[: linear.out_features] = linear.bias.detach()
        return nn.Parameter(out, requires_grad=False)

    def forward(self, dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """Args: dense (B, D) the dense arch's output; codes (B, F K) the tables' pooled
        codes in feature order; nonempty (B, F) 1.0 where a bag has ids.
        Returns: (B, k_o), the over arch's first Linear of the cross network's output."""
        layers = len(self.mids)
        ws: list[torch.Tensor] = []  # w_1 .. w_l
        x: torch.Tensor | None = None  # x_l, kept by the step before a carrying one
        for step in range(layers + 1):  # step l: z_{l+1} (the head's output at l = L) from x_l
            if x is not None:  # x_l = x_0 * (Q_l w_l + q_l) + x_{l-1}
                start, end = self.starts[step - 1], self.starts[step]
                w, up_t, beta = ws[-1], self.up_t[start:end], self.up_biases[step]
            else:  # x_l = x_0 * (1 + q_1 + .. + q_l + [Q_1 .. Q_l] [w_1; ..; w_l])
                w = torch.cat(ws, dim=1) if ws else codes.new_empty(codes.shape[0], 0)
                up_t, beta = self.up_t[: self.starts[step]], self.betas[step]
            keep = step < layers and step + 1 >= self.carry_from
            z, kept = cross_step(dense, codes, nonempty, self.code_weight, w, up_t, beta, x,
                                 self.downs_t[step], self.down_biases[step], self.widths[step], keep)
            x = kept if keep else None
            if step < layers:
                ws.append(self.mids[step](z))
        return z
