"""``compress_``: swap every block named in the bases for its low-rank factors, in place.

One entry point for every model and every basis method (AFM, weight SVD, placeholders for
reloading): a registry maps the module type to the handler that replaces it (as torchao's
``quantize_``). After the swaps, projections are fused into consumers that are linear in
them (DeepFM's deep tower; the ``up`` kernel of a DCN cross layer whose ``down`` kernel was
factored); they are kept where the consumer is not (DLRM's dot interaction, the FM, the
cross product ``x_0 * ...``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from afmrec.models import (
    CrossLayer,
    DeepFM,
    FusedDeepFMSparseArch,
    LowRankEmbeddingBagCollection,
    LowRankLinear,
)

from .bases import Bases
from .blocks import find_blocks
from .errors import InputError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class CompressConfig:
    """How factors are put into the model.

    Args:
        activation: ``None`` (exact factorisation) or a name in ``ACTIVATIONS`` to put
            between the two factors of every Linear (needs fine-tuning).
        fuse: fold projections into a consumer that is linear in them (table projections
            into DeepFM's deep tower, a cross layer's ``down.second`` into its ``up``).
    """

    activation: str | None = None
    fuse: bool = True

    def __post_init__(self) -> None:
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")

    def to_dict(self) -> dict:
        return {"activation": self.activation, "fuse": self.fuse}


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _swap_collection(model: nn.Module, path: str, ebc: nn.Module, bases: Bases, config: CompressConfig) -> None:
    tables = {f"{path}.{c.name}": c.name for c in ebc.embedding_bag_configs()}
    chosen = {t: bases.bases[b] for b, t in tables.items() if b in bases.bases}
    if chosen:
        lowrank = LowRankEmbeddingBagCollection.from_embedding_bag_collection(
            ebc,
            {t: b.components for t, b in chosen.items()},
            {t: b.center for t, b in chosen.items()},
        )
        _set_submodule(model, path, lowrank)


def _swap_linear(model: nn.Module, path: str, linear: nn.Module, bases: Bases, config: CompressConfig) -> None:
    basis = bases.bases.get(path)
    if basis is not None:
        act = ACTIVATIONS[config.activation]() if config.activation else None
        _set_submodule(model, path, LowRankLinear.from_linear(linear, basis.components, basis.center, act))


# module type -> handler that swaps one such module (exact type match, so that our own
# low-rank subclasses are never compressed twice).
HANDLERS: dict[type, Callable[[nn.Module, str, nn.Module, Bases, CompressConfig], None]] = {
    EmbeddingBagCollection: _swap_collection,
    nn.Linear: _swap_linear,
}


def fuse_deep_input(linear: nn.Linear, lowrank: LowRankEmbeddingBagCollection, prefix: int) -> nn.Linear:
    """Folds the table projections into the Linear that reads ``[prefix, y_1 .. y_F]``.

    With ``y_f = U_f z_f + b2_f m_f`` (``m_f`` the non-empty indicator),
    ``W y = sum_f (W_f U_f) z_f + sum_f (W_f b2_f) m_f``: the new Linear reads
    ``[prefix, z_1 .. z_F, m_1 .. m_F]`` and is exact.

    Args:
        linear: weight (H, prefix + F * D).
        lowrank: the collection producing ``z`` and ``m``.
        prefix: width of the leading columns that are not embeddings (the dense field).
    Returns:
        a new ``nn.Linear`` of weight (H, prefix + sum K + F).
    """
    w = linear.weight.detach().double()
    cols, masks, start = [w[:, :prefix]], [], prefix
    for cfg in lowrank.embedding_bag_configs():
        for _ in cfg.feature_names:
            w_f = w[:, start : start + cfg.embedding_dim]
            start += cfg.embedding_dim
            proj = lowrank.projections[cfg.name] if cfg.name in lowrank.projections else None
            if proj is None:
                cols.append(w_f)
                masks.append(torch.zeros_like(w_f[:, :1]))
            else:
                cols.append(w_f @ proj.weight.detach().double())
                masks.append(w_f @ proj.bias.detach().double().unsqueeze(1))
    if start != w.shape[1]:
        raise ValueError(f"the deep tower reads {w.shape[1]} columns, the fields give {start}")
    fused = torch.cat(cols + masks, dim=1)
    out = nn.Linear(fused.shape[1], linear.out_features, device=linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(fused.to(linear.weight.dtype))
        out.bias.copy_(linear.bias)
    return out


def _first_deep_linear(model: DeepFM) -> tuple[str, nn.Linear]:
    """Path and module of the Linear that reads DeepFM's deep input (the input factor,
    if that Linear is itself low-rank)."""
    for path, module in model.deep_arch.named_modules():
        if isinstance(module, LowRankLinear):
            return f"deep_arch.{path}.first", module.first
        if isinstance(module, nn.Linear):
            return f"deep_arch.{path}", module
    raise ValueError("DeepFM deep tower has no Linear")


def _fuse_deep_tower(model: nn.Module) -> bool:
    """Fuses the table projections into DeepFM's deep tower; returns whether it did."""
    if not isinstance(model, DeepFM) or isinstance(model.sparse_arch, FusedDeepFMSparseArch):
        return False
    lowrank = model.sparse_arch.embedding_bag_collection
    if not isinstance(lowrank, LowRankEmbeddingBagCollection):
        return False
    path, linear = _first_deep_linear(model)
    prefix = model.sparse_arch.D if model.dense_arch is not None else 0
    _set_submodule(model, path, fuse_deep_input(linear, lowrank, prefix))
    model.sparse_arch = FusedDeepFMSparseArch(lowrank)
    return True


def compose_linears(outer: nn.Linear, inner: nn.Linear) -> nn.Linear:
    """``outer(inner(z)) = (W_o W_i) z + (W_o b_i + b_o)`` as one Linear (folded in float64).

    Args:
        outer: weight (m, k), bias (m,) or None.
        inner: weight (k, n), bias (k,) or None.
    Returns:
        a new ``nn.Linear(n, m)`` with a bias, on ``outer``'s device and dtype.
    """
    w_o, w_i = outer.weight, inner.weight
    b_o = outer.bias if outer.bias is not None else w_o.new_zeros(w_o.shape[0])
    b_i = inner.bias if inner.bias is not None else w_i.new_zeros(w_i.shape[0])
    out = nn.Linear(inner.in_features, outer.out_features, device=w_o.device, dtype=w_o.dtype)
    with torch.no_grad():
        out.weight.copy_(w_o.double() @ w_i.double())
        out.bias.copy_(w_o.double() @ b_i.double() + b_o.double())
    return out


def _fuse_cross_layers(model: nn.Module) -> bool:
    """Folds the second factor of every factored cross-layer ``down`` into its ``up``.

    With ``down = second(act(first(x)))``, the layer becomes ``down = act(first(x))``
    (N -> K; just ``first`` without an activation) and ``up`` = ``up o second`` (K -> N),
    exact: ``second`` and ``up`` are consecutive Linear maps. (``up`` itself is never a
    block, see :func:`~afmrec.pipeline.blocks.find_blocks`.) Returns whether any layer
    was fused.
    """
    layers = [m for m in model.modules() if isinstance(m, CrossLayer) and isinstance(m.down, LowRankLinear)]
    for layer in layers:
        low = layer.down
        layer.up = compose_linears(layer.up, low.second)
        layer.down = low.first if isinstance(low.activation, nn.Identity) else nn.Sequential(low.first, low.activation)
    return bool(layers)


def _fuse_(model: nn.Module) -> bool:
    """Every fusion that applies to ``model``; returns whether any did."""
    deep = _fuse_deep_tower(model)
    cross = _fuse_cross_layers(model)
    return deep or cross


def compress_(model: nn.Module, bases: Bases, config: CompressConfig = CompressConfig()) -> nn.Module:
    """Replaces every block named in ``bases`` by its two factors, in place.

    Args:
        model: an unsharded model (:func:`afmrec.models.build_model`'s, or any module
            holding TorchRec collections and ``nn.Linear`` layers).
        bases: a :class:`~afmrec.pipeline.bases.Bases` keyed by block name.
        config: activation between factors, fusion.

    Returns:
        ``model`` (for chaining).

    Raises:
        InputError: a basis names a block the model does not have, or has the wrong width.
    """
    blocks = {b.name: b for b in find_blocks(model)}
    for name, basis in bases.bases.items():
        if name not in blocks:
            raise InputError(f"bases name block {name!r}, which this model does not have")
        m = blocks[name].out_features
        if basis.components.shape[0] != m or not 1 <= basis.rank <= m:
            raise InputError(
                f"block {name}: basis of shape {tuple(basis.components.shape)} does not fit "
                f"an output of width {m}"
            )
    targets = [
        (path, module)
        for path, module in model.named_modules()
        if type(module) in HANDLERS and path
    ]
    for path, module in targets:
        HANDLERS[type(module)](model, path, module, bases, config)
    if config.fuse:
        _fuse_(model)
    return model
