"""DLRM-DCNv2's interaction and cross network served from an AFM model's codes.

In an AFM model every cross layer's ``up`` ends with a narrow factor,
``y_l = Q_l w_l + q_l`` with ``Q_l`` (N, k) and ``w_l`` k wide (k = 112 at the MLPerf
shape where N = 3456), and the interaction's fields are projections of the tables'
K-wide codes, ``x_0[f] = W_f^T [c_f; nonempty_f]`` (the dense arch's output is field 0).
A layer ``x_l = x_0 * y_l + x_{l-1}`` is then one GEMM of depth k whose epilogue forms
``x_0``'s tile from the codes and applies the update
(:func:`~afmrec.models.cross_kernel.cross_update`): neither ``x_0`` nor ``y_l`` is
written or read back. Per layer, one pass over the (B, N) activation is written and one
read by the update (none for the first layer, where ``x_{l-1} = x_0``), and one read by
the next ``down`` GEMM; the plain serving form makes six (the ``down`` GEMM's read, the
``up`` GEMM's write, the element-wise update's three reads and one write), plus the
projection that writes ``x_0``.

The small maps between a layer's ``down`` input and ``w_l`` (the rest of ``down``, the
first factor of ``up``) are one merged (k -> k') GEMM, folded in float64. The function
is the model's up to floating-point order.

On CUDA the update is a Triton kernel (a ``torch.library`` op that ``torch.export`` and
AOTInductor compile into the artifact); elsewhere the same function in PyTorch's ops.
"""

from __future__ import annotations

import torch
from torch import nn

from .cross import CrossNet
from .cross_kernel import cross_update
from .lowrank import LowRankEmbeddingBagCollection, LowRankLinear

MAX_RANK = 256
"""Widest ``up`` input (k') the fused network takes: the update's GEMM depth."""


def _factors(module: nn.Module) -> tuple[nn.Linear | None, nn.Linear] | None:
    """A Linear map as (its first factor or None, its last factor), if it is a plain
    Linear or a low-rank pair without activation."""
    if isinstance(module, LowRankLinear) and isinstance(module.activation, nn.Identity):
        return module.first, module.second
    if type(module) is nn.Linear:
        return None, module
    return None


def unfusable_reason(collection: nn.Module, crossnet: nn.Module) -> str | None:
    """Why :class:`FusedCrossNet` cannot serve these modules, or None if it can."""
    if not isinstance(collection, LowRankEmbeddingBagCollection) or not collection.serving:
        return "the tables are not low-rank tables in serving form"
    if not isinstance(crossnet, CrossNet) or not len(crossnet.layers):
        return "no cross network of Linear blocks"
    dim = collection._dims[0]
    if dim < 16 or dim & (dim - 1):
        return f"embedding width {dim} is not a power of 2 >= 16"
    for layer in crossnet.layers:
        up = _factors(layer.up)
        if _factors(layer.down) is None or up is None:
            return "a cross layer's down or up is not a Linear or a low-rank pair"
        if up[1].in_features > MAX_RANK:
            return f"a cross layer's up does not end with a Linear of <= {MAX_RANK} inputs"
    return None


class FusedCrossNet(nn.Module):
    """The interaction and the cross network of an AFM-compressed DLRM-DCNv2, from the
    dense arch's output and the tables' codes (module docstring).

    Args:
        collection: the low-rank tables in serving form
            (:meth:`LowRankEmbeddingBagCollection.fuse_projections_`); their
            ``serving_weight`` is shared, not copied.
        crossnet: the cross network; every ``up`` a Linear or low-rank pair whose last
            factor has at most :data:`MAX_RANK` inputs (AFM leaves ``down`` N -> k and
            ``up`` k -> N). Its ``down`` factors are shared.
    """

    def __init__(self, collection: LowRankEmbeddingBagCollection, crossnet: CrossNet) -> None:
        super().__init__()
        reason = unfusable_reason(collection, crossnet)
        if reason is not None:
            raise ValueError(f"cannot fuse the cross network: {reason}")
        self.code_weight = collection.serving_weight  # (F, KP, D), shared
        n = (len(collection._dims) + 1) * collection._dims[0]
        downs, mids, ups = [], [], []
        betas = [torch.ones(n, dtype=torch.float64, device=self.code_weight.device)]  # x_0's step
        for i, layer in enumerate(crossnet.layers):
            (down_first, down_last), (up_first, up_last) = _factors(layer.down), _factors(layer.up)
            downs.append(down_first or down_last)
            mids.append(self._merged(down_last if down_first is not None else None, up_first))
            ups.append(up_last.weight.detach().T.contiguous())
            q = up_last.bias.double() if up_last.bias is not None else torch.zeros_like(betas[0])
            betas.append(q + 1 if i == 0 else q)  # x_1 = x_0 * (y_1 + 1): x_0 is not read back
        self.downs = nn.ModuleList(downs)
        self.mids = nn.ModuleList(mids)
        self.ups = nn.ParameterList([nn.Parameter(u, requires_grad=False) for u in ups])  # (k', N): Q_l^T
        self.register_buffer("betas", torch.stack(betas).to(self.code_weight.dtype))  # (L + 1, N)

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

    def forward(self, dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """Args: dense (B, D) the dense arch's output; codes (B, F K) the tables' pooled
        codes in feature order; nonempty (B, F) 1.0 where a bag has ids.
        Returns: (B, N), the cross network's output."""
        x = cross_update(dense, codes, nonempty, self.code_weight, codes.new_empty(codes.shape[0], 0),
                         self.ups[0][:0], self.betas[0], None)  # x_0
        for i, (down, mid, up) in enumerate(zip(self.downs, self.mids, self.ups)):
            x = cross_update(dense, codes, nonempty, self.code_weight, mid(down(x)), up, self.betas[i + 1],
                             x if i else None)
        return x
