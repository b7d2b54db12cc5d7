"""Low-rank replacements of an embedding-bag collection and of a Linear layer.

Both implement the two factors of docs/compression.md. With ``U`` (m x K) the kept
principal directions of a block's output ``y = W x + b`` and ``c`` a centre (the output
mean for AFM):

* first factor  ``W1 = U^T W``, ``b1 = U^T b`` (for a table: the new K-wide table ``E U``);
* second factor ``W2 = U``, ``b2 = (I - U U^T) c``.

At ``K = m`` both reproduce the original block exactly. Weights are folded in float64.
"""

from __future__ import annotations

import dataclasses
from typing import List, Mapping

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .kernels.cross import CodeLayout, code_weight_rows, project_codes


def residual_bias(components: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``(I - U U^T) c``: the part of the centre the kept directions do not carry.

    Args:
        components: ``U``, shape (m, K), orthonormal columns.
        center: ``c``, shape (m,).
    Returns:
        Tensor of shape (m,), float64.
    """
    u, c = components.double(), center.double()
    return c - u @ (u.T @ c)


def nonempty_mask(features: KeyedJaggedTensor, keys: List[str]) -> torch.Tensor:
    """Which bags hold at least one id.

    A leaf of ``torch.fx`` tracing (it reads the KJT's key list) and TorchScript-able, so
    that a model using it can be exported (``afmrec export``).

    Returns:
        Tensor of shape (B, len(keys)), float32, 1.0 for a non-empty bag.
    """
    all_keys = features.keys()
    lengths = features.lengths().view(len(all_keys), -1)
    index = [all_keys.index(k) for k in keys]
    return (lengths[index] > 0).T.to(torch.float32)


torch.fx.wrap("nonempty_mask")


def _plain_runs(plain: list[bool], columns: list[int]) -> list[tuple[int, int, int]]:
    """The runs of consecutive features that are not projected, as (first feature, count,
    code column of the first)."""
    runs: list[tuple[int, int, int]] = []
    for i, p in enumerate(plain):
        if not p:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
        else:
            runs.append((i, 1, columns[i]))
    return runs


class LowRankEmbeddingBagCollection(nn.Module):
    """An ``EmbeddingBagCollection`` of K-wide tables plus one projection per table.

    The forward pass returns what the original D-wide collection returned (a
    ``KeyedTensor`` of width D per feature), so it drops into TorchRec's ``SparseArch``.
    The projection bias ``b2`` is added only to non-empty bags: sum pooling of an empty
    bag gives 0 in the original model, and it still does here, so full rank is exact on
    multi-hot data with missing values.

    Tables absent from ``ranks`` keep their width and pass through unprojected.

    Args:
        tables: the original (D-wide) table configs, in feature order.
        ranks: table name -> K.
        device: where the K-wide tables live (``meta`` for sharding later).
        projection_device: where the projections live (default: ``device``).

    Example::

        cfg = EmbeddingBagConfig(name="t", embedding_dim=3, num_embeddings=10, feature_names=["f"])
        lr = LowRankEmbeddingBagCollection([cfg], {"t": 2})
        kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([1, 2]), torch.tensor([2, 0]))
        lr(kjt).values().shape  # (2, 3)
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        ranks: Mapping[str, int],
        device: torch.device | None = None,
        projection_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        unknown = set(ranks) - {t.name for t in tables}
        if unknown:
            raise ValueError(f"ranks given for unknown tables {sorted(unknown)}")
        self._configs = list(tables)
        self.codes = EmbeddingBagCollection(
            tables=[
                dataclasses.replace(t, embedding_dim=ranks.get(t.name, t.embedding_dim))
                for t in tables
            ],
            device=device,
        )
        self.projections = nn.ModuleDict(
            {
                t.name: nn.Linear(ranks[t.name], t.embedding_dim, device=projection_device or device)
                for t in tables
                if t.name in ranks
            }
        )
        self._feature_tables = [(f, t.name) for t in tables for f in t.feature_names]
        self._dims = [t.embedding_dim for t in tables for _ in t.feature_names]  # D per feature
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, table) in enumerate(self._feature_tables):
            if table in ranks:
                groups.setdefault((ranks[table], self._dims[i]), []).append(i)
        self._rank_groups = list(groups.values())
        widths = [ranks.get(table, self._dims[i]) for i, (_, table) in enumerate(self._feature_tables)]
        self._code_columns = [sum(widths[:i]) for i in range(len(widths))]  # of each feature's code
        self._plain_runs = _plain_runs([table not in ranks for _, table in self._feature_tables],
                                       self._code_columns)
        self._serving: tuple[int, int] | None = None  # (K, padding), see fuse_projections_

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The configs of the original D-wide tables (what the consumers see)."""
        return self._configs

    @property
    def ranks(self) -> dict[str, int]:
        return {name: p.in_features for name, p in self.projections.items()}

    def _group_projection(self, indices: list[int], codes: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``U_f z_f + b2_f * nonempty_f`` for one group of equal-rank features, as one
        batched GEMM instead of one per feature.

        Args: indices: the group's features (positions in feature order); codes: their
        (B, K) pooled codes; mask: (B, F). Returns: (G, B, D)."""
        projs = [self.projections[self._feature_tables[i][1]] for i in indices]
        z = torch.stack(codes)  # (G, B, K)
        w = torch.stack([p.weight.T for p in projs])  # (G, K, D)
        bias = torch.stack([p.bias for p in projs]).unsqueeze(1)  # (G, 1, D)
        return torch.baddbmm(mask.T[indices].unsqueeze(2) * bias, z, w)

    def project(self, codes: KeyedTensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Maps each feature's K-wide pooled code to D: ``U z + b2 * nonempty``.

        Args:
            codes: pooled K-wide outputs, one key per feature.
            mask: (B, F) non-empty indicator.
        Returns:
            one (B, D) tensor per feature, in feature order.
        """
        by_feature = codes.to_dict()
        out: list[torch.Tensor | None] = [None] * len(self._feature_tables)
        for indices in self._rank_groups:
            y = self._group_projection(indices, [by_feature[self._feature_tables[i][0]] for i in indices], mask)
            for j, i in enumerate(indices):
                out[i] = y[j]
        for i, (feature, table) in enumerate(self._feature_tables):
            if table not in self.projections:
                out[i] = by_feature[feature]
        return out  # type: ignore[return-value]

    def _write_fields(self, codes: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> None:
        """:meth:`project`'s fields written into ``out`` (B, F, D) where they are consumed,
        for tables of any ranks: each run of consecutive full-width features is one copy
        from the codes, each group of equal-rank features one batched GEMM (no per-feature
        split of the codes, no concatenation of the F fields, no copy of it).

        Args: codes: (B, C) the pooled codes in feature order (C the sum of their widths);
        mask: (B, F)."""
        dim = self._dims[0]
        for first, count, column in self._plain_runs:
            out.narrow(1, first, count).copy_(codes.narrow(1, column, count * dim).view(-1, count, dim))
        for indices in self._rank_groups:
            k = self.projections[self._feature_tables[indices[0]][1]].in_features
            y = self._group_projection(indices, [codes.narrow(1, self._code_columns[i], k) for i in indices], mask)
            for j, i in enumerate(indices):
                out.select(1, i).copy_(y[j])

    def fuse_projections_(self, multiple: int = 8, max_padding: float = 0.01) -> bool:
        """Serving form of the projections: the pooled codes are read in place as (B, F, K),
        the non-empty indicator appended as one more code column (zero-padded to a
        multiple of ``multiple``, for aligned tensor-core GEMMs), and one batched GEMM
        with the stacked ``[U_f^T; b2_f]`` gives the (B, F, D) fields. It replaces
        stacking the codes and the weights, a masked bias and a concatenation of F pieces
        on every call. For inference (``afmrec export``); the projections stay the trained
        parameters.

        Every code table is made K wide, K the largest rank, exactly:

        * a table of rank below K gets zero columns (zero codes meet zero weights), if all
          of them together add at most ``max_padding`` of the collection's code entries
          (a table of a few rows, whose rank its row count caps, costs nothing to pad);
        * a table left unprojected (compression would not have made it smaller: a few
          rows) becomes the identity code table of its n <= K rows, with its rows as the
          projection: bag sums of one-hot codes times the rows are the rows' bag sums.

        Returns False (and changes nothing) where this fails: widths differ, an
        unprojected table has more than K rows, or the padding costs more.
        """
        ranks, rows = self.ranks, {t.name: t.num_embeddings for t in self._configs}
        if not ranks or len(set(self._dims)) != 1:
            return False
        k = max(ranks.values())
        plain = [t.name for t in self._configs if t.name not in ranks]
        if any(rows[t] > k for t in plain):
            return False
        extra = sum(rows[t] * (k - r) for t, r in ranks.items())
        if extra > max_padding * sum(rows[t] * r for t, r in ranks.items()):
            return False
        weight = self._stacked_projections(k, multiple)
        with torch.no_grad():
            for i, (_, table) in enumerate(self._feature_tables):
                if table not in ranks:
                    weight[i, : rows[table]] = self.codes.embedding_bags[table].weight
        self._widen_codes_(k)
        self.register_buffer("serving_weight", weight)
        self._serving = (k, weight.shape[1] - k - 1)
        return True

    def _stacked_projections(self, bias_row: int, multiple: int) -> torch.Tensor:
        """(F, KP, D): each projected feature's ``U_f^T`` in rows ``[0, K_f)`` and its
        ``b2`` in row ``bias_row``, zeros elsewhere (KP > ``bias_row``, a multiple of
        ``multiple``); all zeros for a feature left whole."""
        ref = next(iter(self.projections.values())).weight
        kp = code_weight_rows(bias_row, multiple)
        weight = torch.zeros(len(self._feature_tables), kp, self._dims[0], dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for i, (_, table) in enumerate(self._feature_tables):
                if table in self.projections:
                    proj = self.projections[table]
                    weight[i, : proj.in_features] = proj.weight.T
                    weight[i, bias_row] = proj.bias
        return weight

    def _widen_codes_(self, k: int) -> None:
        """Makes every code table ``k`` wide: projected ones get zero columns, unprojected
        ones become identity tables (see :meth:`fuse_projections_`). Tables already ``k``
        wide keep their weight tensors."""
        old = self.codes
        configs = [dataclasses.replace(c, embedding_dim=k) for c in old.embedding_bag_configs()]
        new = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        for c in old.embedding_bag_configs():
            weight = old.embedding_bags[c.name].weight
            if c.name not in self.projections:
                weight = nn.Parameter(torch.eye(c.num_embeddings, k, dtype=weight.dtype, device=weight.device))
            elif c.embedding_dim < k:
                zeros = weight.new_zeros(weight.shape[0], k - c.embedding_dim)
                weight = nn.Parameter(torch.cat([weight.detach(), zeros], 1))
            new.embedding_bags[c.name].weight = weight
        self.codes = new

    def code_layout(self, multiple: int = 8) -> tuple[torch.Tensor, CodeLayout]:
        """The codes as the fused cross network reads them: ``code_weight`` (F, KP, D) and
        the :class:`~afmrec.models.kernels.cross.CodeLayout` of :meth:`forward_codes`'
        values. In serving form (:meth:`fuse_projections_`) its ``serving_weight`` (shared)
        and F codes of one width; otherwise each projected field's ``U_f^T`` in rows
        ``[0, K_f)`` and its ``b2`` in the bias row (the largest rank), ``KP`` padded to a
        multiple of ``multiple``, and a whole table's field its row as it lies (width 0).
        Every feature D wide."""
        if self._serving is not None:
            k = self._serving[0]
            return self.serving_weight, CodeLayout.uniform(len(self._feature_tables), k)
        ranks = self.ranks
        layout = CodeLayout.of_widths([ranks.get(table, 0) for _, table in self._feature_tables], self._dims[0])
        return self._stacked_projections(layout.bias_row, multiple), layout

    def forward_codes(self, features: KeyedJaggedTensor) -> tuple[KeyedTensor, torch.Tensor]:
        """The K-wide pooled codes and the (B, F) non-empty mask, before projection."""
        codes = self.codes(features)
        return codes, nonempty_mask(features, [f for f, _ in self._feature_tables])

    @property
    def serving(self) -> bool:
        """Whether the projections are in serving form (:meth:`fuse_projections_`)."""
        return self._serving is not None

    @property
    def code_width(self) -> int:
        """K, the width of every code table in serving form (:meth:`fuse_projections_`)."""
        if self._serving is None:
            raise ValueError("the projections are not in serving form (fuse_projections_)")
        return self._serving[0]

    def project_into(self, features: KeyedJaggedTensor, out: torch.Tensor) -> None:
        """Writes the F fields into ``out``, shape (B, F, D), which may be a view of a
        larger buffer (such as the cross network's input), where they are consumed: in
        serving form (:meth:`fuse_projections_`) with one batched GEMM, otherwise (ranks
        that differ, full-width tables) as :meth:`_write_fields` does. Every feature D wide."""
        codes, mask = self.forward_codes(features)
        if self._serving is not None:
            self._project_codes_into(codes, mask, out)
        else:
            self._write_fields(codes.values(), mask, out)

    def _project_codes_into(self, codes: KeyedTensor, mask: torch.Tensor, out: torch.Tensor) -> None:
        k, pad = self._serving  # the codes come in feature order (tested)
        project_codes(codes.values(), mask, self.serving_weight, out, k, pad)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Args: features: KJT of F features. Returns: KeyedTensor, (B, F * D)."""
        keys = [f for f, _ in self._feature_tables]
        codes, mask = self.forward_codes(features)
        if self._serving is not None:
            batch = mask.shape[0]
            fields = codes.values().new_empty([batch, len(keys), self._dims[0]])
            self._project_codes_into(codes, mask, fields)
            return KeyedTensor(keys=keys, length_per_key=self._dims, values=fields.view(batch, -1))
        ys = self.project(codes, mask)
        return KeyedTensor(keys=keys, length_per_key=[y.shape[1] for y in ys], values=torch.cat(ys, dim=1))

    @classmethod
    def from_embedding_bag_collection(
        cls,
        ebc: EmbeddingBagCollection,
        components: Mapping[str, torch.Tensor],
        centers: Mapping[str, torch.Tensor],
    ) -> "LowRankEmbeddingBagCollection":
        """Folds ``E' = E U`` for every table named in ``components``.

        Args:
            ebc: the original collection (unsharded).
            components: table name -> ``U``, shape (D, K), orthonormal columns.
            centers: table name -> ``c``, shape (D,) (the pooled-output mean for AFM).
        """
        configs = ebc.embedding_bag_configs()
        weights = {n: p for n, p in ebc.embedding_bags.named_parameters()}
        device = next(iter(weights.values())).device
        ranks = {name: u.shape[1] for name, u in components.items()}
        # Tables on `meta` (a sharded model's skeleton) get only their K-wide shapes here:
        # their rows are folded shard by shard (afmrec.sharding.compress); the small
        # projections are real tensors on the device of the components.
        proj_device = next(iter(components.values())).device if device.type == "meta" else device
        out = cls(configs, ranks, device=device, projection_device=proj_device)
        with torch.no_grad():
            for t in configs:
                if t.name in components:
                    u = components[t.name].to(proj_device)
                    proj = out.projections[t.name]
                    proj.weight.copy_(u.to(proj.weight.dtype))
                    bias = residual_bias(u, centers[t.name].to(proj_device))
                    proj.bias.copy_(bias.to(proj.bias.dtype))
                if device.type == "meta":
                    continue
                src = weights[f"{t.name}.weight"]
                dst = out.codes.embedding_bags[t.name].weight
                if t.name not in components:
                    dst.copy_(src)
                else:
                    u = components[t.name].to(device).double()
                    dst.copy_((src.double() @ u).to(dst.dtype))
        return out


class LowRankLinear(nn.Module):
    """``second(act(first(x)))``: a Linear (m x n) replaced by n -> K -> m.

    Args:
        in_features: n.  out_features: m.  rank: K.
        activation: optional module between the factors (the paper's best variant; it
            changes the function, so the model must be fine-tuned).

    Example::

        lin = nn.Linear(8, 6)
        u = torch.linalg.qr(torch.randn(6, 6)).Q
        lr = LowRankLinear.from_linear(lin, u, torch.zeros(6))  # full rank: exact
        torch.allclose(lr(x := torch.randn(4, 8)), lin(x), atol=1e-5)  # True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        activation: nn.Module | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.first = nn.Linear(in_features, rank, device=device)
        self.activation = activation if activation is not None else nn.Identity()
        self.second = nn.Linear(rank, out_features, device=device)

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def rank(self) -> int:
        return self.first.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (..., n). Returns: (..., m)."""
        return self.second(self.activation(self.first(x)))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        components: torch.Tensor,
        center: torch.Tensor,
        activation: nn.Module | None = None,
    ) -> "LowRankLinear":
        """Folds ``W1 = U^T W``, ``b1 = U^T b``, ``W2 = U``, ``b2 = (I - U U^T) c``.

        Args:
            linear: the original layer, weight (m, n).
            components: ``U``, shape (m, K), orthonormal columns.
            center: ``c``, shape (m,).
            activation: optional module between the factors.
        """
        w = linear.weight
        u = components.to(w.device).double()
        b = linear.bias.double() if linear.bias is not None else torch.zeros_like(u[:, 0])
        out = cls(linear.in_features, linear.out_features, u.shape[1], activation, w.device).to(w.dtype)
        with torch.no_grad():
            out.first.weight.copy_((u.T @ w.double()).to(w.dtype))
            out.first.bias.copy_((u.T @ b).to(w.dtype))
            out.second.weight.copy_(u.to(w.dtype))
            out.second.bias.copy_(residual_bias(u, center.to(w.device)).to(w.dtype))
        return out
