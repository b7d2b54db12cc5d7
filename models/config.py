"""Typed configuration of the CTR models this project builds.

Shape notation used in every docstring of ``afmrec.models``:

* ``B``: batch size;  ``F``: number of sparse features (one per table);
* ``D``: embedding width of the original model;  ``K``: a low-rank width;
* ``N``: number of dense input features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ARCHS = ("dlrm", "dcn", "deepfm")


@dataclass(frozen=True)
class TableSpec:
    """One embedding table, looked up by the sparse feature of the same name."""

    name: str
    num_embeddings: int

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"table name {self.name!r} must be a Python identifier")
        if self.num_embeddings <= 0:
            raise ValueError(f"table {self.name}: num_embeddings must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (the checkpoint holds only weights).

    Args:
        arch: ``"dlrm"`` (torchrec ``DLRM``, dot interaction), ``"dcn"`` (torchrec
            ``DLRM_DCN``, low-rank cross layers) or ``"deepfm"`` (FM + a deep tower over
            the concatenated embeddings).
        tables: the embedding tables, in feature order.
        num_dense: number of dense input features ``N`` (may be 0).
        embedding_dim: ``D``, shared by all tables (the interactions need it).
        dense_arch: layer sizes of the bottom MLP over dense features; the last one
            must equal ``embedding_dim`` (it becomes one more field).
        over_arch: layer sizes of the top MLP (dlrm, dcn); the last one must be 1.
        deep_arch: hidden layer sizes of DeepFM's deep tower (a final Linear to 1 is added).
        dcn_num_layers / dcn_low_rank_dim: DCNv2 cross-network depth and rank.
        dense_names: the names of the ``N`` dense features in input order (the data's
            columns are matched to them by name); ``None`` for models of earlier
            versions, which match them by position.
    """

    arch: str
    tables: tuple[TableSpec, ...]
    num_dense: int = 0
    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (64, 16)
    over_arch: tuple[int, ...] = (128, 64, 1)
    deep_arch: tuple[int, ...] = (256, 128)
    dcn_num_layers: int = 2
    dcn_low_rank_dim: int = 16
    dense_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if not self.tables:
            raise ValueError("a model needs at least one embedding table")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate table names in {names}")
        if self.num_dense < 0 or self.embedding_dim <= 0:
            raise ValueError("num_dense must be >= 0 and embedding_dim > 0")
        if self.dense_arch and self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(
                f"dense_arch must end in embedding_dim={self.embedding_dim}, got {self.dense_arch}"
            )
        if self.arch != "deepfm" and (not self.over_arch or self.over_arch[-1] != 1):
            raise ValueError(f"over_arch must end in 1, got {self.over_arch}")
        if any(s <= 0 for s in (*self.dense_arch, *self.over_arch, *self.deep_arch)):
            raise ValueError("layer sizes must be positive")
        if self.dense_names is not None and (len(self.dense_names) != self.num_dense
                                             or len(set(self.dense_names)) != self.num_dense):
            raise ValueError(f"dense_names must name each of the {self.num_dense} dense features "
                             f"once, got {list(self.dense_names)}")
        if self.dcn_num_layers < 0 or self.dcn_low_rank_dim < 1:
            raise ValueError(f"dcn_num_layers must be >= 0 and dcn_low_rank_dim >= 1, got "
                             f"{self.dcn_num_layers} and {self.dcn_low_rank_dim}")

    @property
    def feature_names(self) -> list[str]:
        return [t.name for t in self.tables]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["tables"] = tuple(TableSpec(**t) for t in d["tables"])
        for k in ("dense_arch", "over_arch", "deep_arch", "dense_names"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

