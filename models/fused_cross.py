"""DLRM-DCNv2's interaction and cross network served from an AFM model's codes.

In an AFM model every cross layer's ``up`` ends with a narrow factor,
``y_l = Q_l w_l + q_l`` with ``Q_l`` (N, k) and ``w_l`` k wide (k = 112 at the MLPerf
shape where N = 3456), and the interaction's fields are projections of the tables'
K_f-wide codes, ``x_0[f] = W_f^T [c_f; nonempty_f]`` (the dense arch's output is field 0;
a table left whole gives its pooled row, ``x_0[f] = c_f``: :class:`~afmrec.models.kernels.
cross.CodeLayout`).
A layer ``x_l = x_0 * y_l + x_{l-1}`` is then one GEMM of depth k whose epilogue forms
``x_0``'s tile from the codes and applies the update
(:func:`~afmrec.models.kernels.cross.cross_update`): neither ``x_0`` nor ``y_l`` is
written or read back. Per layer, one pass over the (B, N) activation is written and one
read by the update (none for the first layer, where ``x_{l-1} = x_0``), and one read by
the next ``down`` GEMM; the plain serving form makes six (the ``down`` GEMM's read, the
``up`` GEMM's write, the element-wise update's three reads and one write), plus the
projection that writes ``x_0``.

``x_0`` is linear in ``u = [dense; codes; nonempty]`` (D + F K + F wide, against N =
(F + 1) D), so the first layer's ``w_1`` is one GEMM over ``u``: ``x_0`` is never
written, nor read by a ``down`` GEMM. The small maps between a layer's ``down`` input and
``w_l`` (the rest of ``down``, the first factor of ``up``; for the first layer also the
interaction and all of ``down``) are one merged GEMM, folded in float64. The function is
the model's up to floating-point order.

A cross network whose input is not made of codes (the original model's full-width tables)
gets the same kernel with ``x_0`` read from memory (:class:`X0CrossNet`): per layer the
``down`` GEMM (and an ``up`` pair's first factor) stays with cuBLAS, and the update kernel
does the ``up`` GEMM (depth r, 512 at the MLPerf shape: ``w`` read in chunks) with the
update in its epilogue, so ``y_l`` is never written; it reads ``x_0`` and ``x_{l-1}``
once and writes ``x_l``, against the plain form's ``up`` write and three reads and one
write of its element-wise update. Whether that beats cuBLAS's ``up`` GEMM at depth 512
is measured per artifact (``afmrec bench speed``).

On CUDA the update is a Triton kernel (a ``torch.library`` op that ``torch.export`` and
AOTInductor compile into the artifact); elsewhere the same function in PyTorch's ops.
"""

from __future__ import annotations

import torch
from torch import nn

from .cross import CrossNet
from .kernels.cross import CodeLayout, cross_update, cross_update_x0
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
    if not isinstance(collection, LowRankEmbeddingBagCollection) or not collection.ranks:
        return "the tables are not low-rank tables"
    if not isinstance(crossnet, CrossNet) or not len(crossnet.layers):
        return "no cross network of Linear blocks"
    dim = collection._dims[0]
    if len(set(collection._dims)) != 1:
        return "the tables' widths differ"
    if dim < 16 or dim & (dim - 1):
        return f"embedding width {dim} is not a power of 2 >= 16"
    for layer in crossnet.layers:
        up = _factors(layer.up)
        if _factors(layer.down) is None or up is None:
            return "a cross layer's down or up is not a Linear or a low-rank pair"
        if up[1].in_features > MAX_RANK:
            return f"a cross layer's up does not end with a Linear of <= {MAX_RANK} inputs"
    return None


class CodeLinear(nn.Module):
    """A Linear map of ``u = [dense; codes; nonempty]`` applied to the three parts where
    they lie (three GEMMs into one output, no concatenated copy of ``u``).

    Args:
        weight: (out, D + F K + F); bias: (out,); widths: (D, F K, F).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, widths: tuple[int, int, int]) -> None:
        super().__init__()
        parts = weight.detach().T.split(widths)  # (D, out), (F K, out), (F, out)
        self.dense_t, self.codes_t, self.nonempty_t = (nn.Parameter(p.contiguous(), requires_grad=False)
                                                       for p in parts)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """Args: dense (B, D); codes (B, F K); nonempty (B, F). Returns: (B, out)."""
        out = torch.addmm(self.bias, dense, self.dense_t)
        out = torch.addmm(out, codes, self.codes_t)
        return torch.addmm(out, nonempty, self.nonempty_t)


Affine = tuple[torch.Tensor, torch.Tensor]
"""A map ``x -> W x + b`` as (W, b) in float64."""


def _affine(linear: nn.Linear) -> Affine:
    w = linear.weight.detach().double()
    return w, linear.bias.detach().double() if linear.bias is not None else w.new_zeros(w.shape[0])


def _compose(*maps: Affine | None) -> Affine | None:
    """The given maps applied in turn (None entries skipped), as one; None if there are none."""
    out = None
    for m in maps:
        if m is not None:
            out = m if out is None else (m[0] @ out[0], m[0] @ out[1] + m[1])
    return out


def interaction_map(code_weight: torch.Tensor, layout: CodeLayout) -> Affine:
    """``x_0`` as an affine map of ``u = [dense; codes; nonempty]`` (float64).

    Args: code_weight (F, KP, D): a projected field's rows ``[0, K_f)`` its projection,
    row ``layout.bias_row`` its non-empty bias; layout: the codes' (C wide).
    Returns: W (N, D + C + F), b (N,) = 0, N = (F + 1) D."""
    fields, _, dim = code_weight.shape
    cw, c = code_weight.detach().double(), layout.codes_width
    w = cw.new_zeros((fields + 1) * dim, dim + c + fields)
    w[:dim, :dim] = torch.eye(dim, dtype=w.dtype, device=w.device)
    for f, (column, width) in enumerate(layout.fields):
        rows, at = slice((f + 1) * dim, (f + 2) * dim), dim + column
        if width == 0:  # a whole table's row
            w[rows, at:at + dim] = torch.eye(dim, dtype=w.dtype, device=w.device)
        else:
            w[rows, at:at + width] = cw[f, :width].T
            w[rows, dim + c + f] = cw[f, layout.bias_row]
    return w, w.new_zeros(w.shape[0])


class FusedCrossNet(nn.Module):
    """The interaction and the cross network of an AFM-compressed DLRM-DCNv2, from the
    dense arch's output and the tables' codes (module docstring).

    Args:
        collection: the low-rank tables, their ranks one or several, tables left whole
            among them (:meth:`LowRankEmbeddingBagCollection.code_layout`; in serving
            form, :meth:`~LowRankEmbeddingBagCollection.fuse_projections_`, its
            ``serving_weight`` is shared, not copied).
        crossnet: the cross network; every ``up`` a Linear or low-rank pair whose last
            factor has at most :data:`MAX_RANK` inputs (AFM leaves ``down`` N -> k and
            ``up`` k -> N). Its ``down`` factors after the first layer's are shared.
    """

    def __init__(self, collection: LowRankEmbeddingBagCollection, crossnet: CrossNet) -> None:
        super().__init__()
        reason = unfusable_reason(collection, crossnet)
        if reason is not None:
            raise ValueError(f"cannot fuse the cross network: {reason}")
        code_weight, self.layout = collection.code_layout()
        if collection.serving:
            self.code_weight = code_weight  # (F, KP, D), shared
        else:
            self.register_buffer("code_weight", code_weight)
        self.register_buffer("layout_tensor", self.layout.tensor(code_weight.device))  # (F, 2) int32
        fields, _, dim = self.code_weight.shape
        dtype = self.code_weight.dtype
        downs, mids, ups, betas = [], [], [], []
        for i, layer in enumerate(crossnet.layers):
            (down_first, down_last), (up_first, up_last) = _factors(layer.down), _factors(layer.up)
            small = (_affine(down_last) if down_first is not None else None,
                     _affine(up_first) if up_first is not None else None)
            if i == 0:  # w_1 straight from u: x_0 is neither written nor read
                w, b = _compose(interaction_map(self.code_weight, self.layout), _affine(down_first or down_last),
                                *small)
                self.first = CodeLinear(w.to(dtype), b.to(dtype), (dim, self.layout.codes_width, fields))
            else:
                downs.append(down_first or down_last)
                mids.append(self._linear(_compose(*small), dtype))
            ups.append(up_last.weight.detach().T.contiguous())
            q = _affine(up_last)[1]
            betas.append(q + 1 if i == 0 else q)  # x_1 = x_0 * (y_1 + 1): x_0 is not read back
        self.downs = nn.ModuleList(downs)
        self.mids = nn.ModuleList(mids)
        self.ups = nn.ParameterList([nn.Parameter(u, requires_grad=False) for u in ups])  # (k', N): Q_l^T
        self.register_buffer("betas", torch.stack(betas).to(dtype))  # (L, N)

    @staticmethod
    def _linear(affine: Affine | None, dtype: torch.dtype) -> nn.Module:
        """``affine`` as a Linear of ``dtype``, or the identity for None."""
        if affine is None:
            return nn.Identity()
        w, b = affine
        out = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            out.bias.copy_(b)
        return out.requires_grad_(False)

    def forward(self, dense: torch.Tensor, codes: torch.Tensor, nonempty: torch.Tensor) -> torch.Tensor:
        """Args: dense (B, D) the dense arch's output; codes (B, C) the tables' pooled
        codes in feature order (:attr:`layout`); nonempty (B, F) 1.0 where a bag has ids.
        Returns: (B, N), the cross network's output."""
        w = self.first(dense, codes, nonempty)  # (B, k'): the first layer's, from u
        layout, layout_tensor = self.layout, self.layout_tensor
        x = cross_update(dense, codes, nonempty, self.code_weight, w, self.ups[0], self.betas[0], None,
                         layout, layout_tensor)
        for i, (down, mid) in enumerate(zip(self.downs, self.mids)):
            x = cross_update(dense, codes, nonempty, self.code_weight, mid(down(x)), self.ups[i + 1],
                             self.betas[i + 1], x, layout, layout_tensor)
        return x


def x0_unfusable_reason(crossnet: nn.Module) -> str | None:
    """Why :class:`X0CrossNet` cannot serve ``crossnet``, or None if it can."""
    if not isinstance(crossnet, CrossNet) or not len(crossnet.layers):
        return "no cross network of Linear blocks"
    for layer in crossnet.layers:
        up = _factors(layer.up)
        if up is None:
            return "a cross layer's up is not a Linear or a low-rank pair"
        if up[1].out_features % 16:
            return f"the cross network's width {up[1].out_features} is not a multiple of 16"
    return None


class X0CrossNet(nn.Module):
    """The cross network with each layer's ``up`` GEMM and update in one kernel
    (:func:`~afmrec.models.kernels.cross.cross_update_x0`), ``x_0`` read from memory: for a
    cross network whose input is not made of codes (module docstring).

    Args:
        crossnet: the cross network; every ``up`` a Linear or a low-rank pair without
            activation. Its ``down`` modules and ``up`` first factors are shared.
    """

    def __init__(self, crossnet: CrossNet) -> None:
        super().__init__()
        reason = x0_unfusable_reason(crossnet)
        if reason is not None:
            raise ValueError(f"cannot fuse the cross network: {reason}")
        self.downs = nn.ModuleList(layer.down for layer in crossnet.layers)
        firsts, ups, betas = [], [], []
        for i, layer in enumerate(crossnet.layers):
            first, last = _factors(layer.up)
            firsts.append(first if first is not None else nn.Identity())
            ups.append(nn.Parameter(last.weight.detach().T.contiguous(), requires_grad=False))  # (r, N)
            q = _affine(last)[1].to(last.weight.dtype)
            betas.append(q + 1 if i == 0 else q)  # x_1 = x_0 * (y_1 + 1): x_0 is not read twice
        self.firsts = nn.ModuleList(firsts)
        self.ups = nn.ParameterList(ups)
        self.register_buffer("betas", torch.stack(betas))  # (L, N)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Args: x0 (B, N), the interaction. Returns: (B, N), the cross network's output."""
        x = None
        for i, (down, first) in enumerate(zip(self.downs, self.firsts)):
            w = first(down(x0 if x is None else x))  # (B, r)
            x = cross_update_x0(x0, w, self.ups[i], self.betas[i], x)
        return x
