"""The compressible blocks of a model, and name patterns that select them.

A block is an affine map whose output we observe and factor (docs/compression.md):

* ``table``: one embedding table; ``y`` is the pooled output of a feature it serves
  (observed where the dense part consumes it), ``x`` the bag's count vector, ``W = E^T``;
* ``linear``: an ``nn.Linear``; ``y = W x + b``. The ``up`` Linear of a DCN cross layer is
  not a block: its output lies in the r-dimensional span of its weight already, the
  ``down`` block's factors shrink it (fused, ``compress._fuse_cross_layers``), and its
  N x N Gram matrix (N = 3456 at the MLPerf shape) would cost the statistics pass more
  than the forward pass. Without fusion (``CompressConfig(fuse=False)``, planned with
  ``find_blocks(model, fuse=False)``) it stays as it is.

Block names are module paths (``dense_arch.model._mlp.0._linear``) and, for tables, the
collection's path plus the table name (``sparse_arch.embedding_bag_collection.t0``).
Patterns are ``fnmatch`` globs over these names, like peft's ``target_modules``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable, Literal

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from afmrec.models import CrossLayer, LowRankEmbeddingBagCollection, LowRankLinear

from .errors import InputError

BlockKind = Literal["table", "linear"]


@dataclass(frozen=True)
class Block:
    """One compressible block.

    Attributes:
        name: unique name (module path, plus ``.table`` for tables).
        kind: ``"table"`` or ``"linear"``.
        module: path of the ``nn.Linear``, or of the ``EmbeddingBagCollection``.
        table: the table name (tables only).
        in_features: ``n`` (Linear input width; rows ``V`` of a table).
        out_features: ``m`` (Linear output width; ``D`` of a table).
        features: the sparse features a table serves (tables only).
        bias: whether the Linear has a bias (tables: no).
        fused_into: output width of the Linear that absorbs this block's second factor
            (a DCN cross layer's ``up``, N wide, for its ``down``): the block then owns
            that Linear's weight (N x m), which the compressed layer shrinks to N x K,
            and there is no ``b2`` of its own. 0: the two factors stay (every block of
            ``find_blocks(model, fuse=False)``, as ``CompressConfig(fuse=False)`` builds
            the model).
    """

    name: str
    kind: BlockKind
    module: str
    in_features: int
    out_features: int
    table: str | None = None
    features: tuple[str, ...] = ()
    bias: bool = True
    fused_into: int = 0

    @property
    def params(self) -> int:
        """Parameters of the original block (a table has no bias), plus the weight of the
        Linear that absorbs its second factor, if any."""
        m = self.out_features
        return self.in_features * m + self.has_bias * m + self.fused_into * m

    @property
    def params_per_rank(self) -> int:
        """Parameters one unit of rank costs: a row of ``W1`` (or a column of ``E'``)
        plus a column of ``W2`` (or of the absorbing Linear) and a bias entry of ``b1``
        for a Linear."""
        return self.in_features + (self.fused_into or self.out_features) + (self.kind == "linear")

    @property
    def _b2(self) -> int:
        return 0 if self.fused_into else self.out_features

    @property
    def has_bias(self) -> bool:
        return self.kind == "linear" and self.bias

    def compressed_params(self, rank: int) -> int:
        """Parameters of the two factors at ``rank`` (``b2`` included)."""
        return rank * self.params_per_rank + self._b2

    def max_useful_rank(self) -> int:
        """Largest rank at which the factors are still smaller than the block (0: never)."""
        k = (self.params - self._b2 - 1) // self.params_per_rank
        return max(0, min(k, self.in_features, self.out_features))


def find_blocks(model: nn.Module, *, fuse: bool = True) -> list[Block]:
    """Every table and every ``nn.Linear`` of ``model`` that is not already low-rank (nor
    the ``up`` of a cross layer).

    Args:
        model: an unsharded model (or its skeleton).
        fuse: whether the model will be compressed with fusion (``CompressConfig.fuse``):
            a cross layer's ``down`` is then fused into its ``up`` (``Block.fused_into``),
            otherwise no block is and the ``up`` counts among the other parameters.
    """
    blocks: list[Block] = []
    skip: list[str] = []
    fused_into: dict[str, int] = {}  # a cross layer's down -> the width of its up
    for path, module in model.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, CrossLayer):
            prefix = f"{path}." if path else ""
            skip.append(f"{prefix}up")
            if fuse and isinstance(module.up, nn.Linear):
                fused_into[f"{prefix}down"] = module.up.out_features
        if isinstance(module, (LowRankLinear, LowRankEmbeddingBagCollection)):
            skip.append(path)
        elif isinstance(module, EmbeddingBagCollection):
            for cfg in module.embedding_bag_configs():
                blocks.append(
                    Block(
                        name=f"{path}.{cfg.name}",
                        kind="table",
                        module=path,
                        in_features=cfg.num_embeddings,
                        out_features=cfg.embedding_dim,
                        table=cfg.name,
                        features=tuple(cfg.feature_names),
                    )
                )
        elif type(module) is nn.Linear:  # exact type, as compress_ swaps: a subclass (such as
            # nn.MultiheadAttention's out_proj, whose weight it reads directly) is no block
            blocks.append(Block(path, "linear", path, module.in_features, module.out_features,
                                bias=module.bias is not None, fused_into=fused_into.get(path, 0)))
    return blocks


@dataclass(frozen=True)
class TableHook:
    """Where the pooled outputs of some tables are observed (statistics, probes).

    Attributes:
        module: path of the module whose output holds them: the collection's owner where
            it has ``sparse_feature_names`` (TorchRec's ``SparseArch``: a plain (B, F, D)
            tensor also under ``DistributedModelParallel``), else the collection itself
            (an unsharded ``EmbeddingBagCollection`` of any model: a ``KeyedTensor``).
        features: the features of that output the tables' rows are read from, in order.
        blocks: the tables (at the collection, all of one width).
    """

    module: str
    features: tuple[str, ...]
    blocks: tuple[Block, ...]


def table_hooks(model: nn.Module, blocks: Iterable[Block]) -> list[TableHook]:
    """The observation points of the table blocks among ``blocks`` (see :class:`TableHook`):
    one per sparse arch, or one per collection and table width."""
    modules = dict(model.named_modules())
    groups: dict[tuple[str, int], tuple[tuple[str, ...], list[Block]]] = {}
    for b in blocks:
        if b.kind != "table":
            continue
        owner = b.module.rpartition(".")[0]
        names = getattr(modules[owner], "sparse_feature_names", None) if owner in modules else None
        if names is not None:
            key, features = (owner, 0), tuple(names)
        else:
            ebc = modules[b.module]
            key = (b.module, b.out_features)
            features = tuple(f for c in ebc.embedding_bag_configs() if c.embedding_dim == b.out_features
                             for f in c.feature_names)
        groups.setdefault(key, (features, []))[1].append(b)
    return [TableHook(path, features, tuple(bs)) for (path, _), (features, bs) in groups.items()]


def match(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_blocks(
    blocks: list[Block], target: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> list[Block]:
    """Blocks whose name matches a ``target`` glob and no ``exclude`` glob.

    Raises:
        InputError: a pattern matches no block (a typo must not be a silent no-op), or
            the patterns leave no block (there would be nothing to observe or compress).
    """
    target, exclude = list(target), list(exclude)
    names = [b.name for b in blocks]
    for p in (*target, *exclude):
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise InputError(f"pattern {p!r} matches no block; blocks are: {', '.join(names)}")
    chosen = [b for b in blocks if match(b.name, target) and not match(b.name, exclude)]
    if not chosen:
        raise InputError(f"the target patterns {target} less the excluded {exclude} leave no block")
    return chosen


def resolve_pattern_map(mapping: dict[str, int], names: list[str]) -> dict[str, int]:
    """Per-name values from ``{glob: value}`` (the last matching glob wins).

    Raises:
        InputError: a glob matches none of ``names``.
    """
    out: dict[str, int] = {}
    for pattern, value in mapping.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise InputError(f"pattern {pattern!r} matches no block")
        out.update({n: value for n in hits})
    return out
