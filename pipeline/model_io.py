"""The model artifact: ``model.json`` (how to rebuild the model) plus a DCP checkpoint.

``model.json`` holds the :class:`~afmrec.models.ModelConfig`, the compression record
(ranks by block, :class:`~afmrec.pipeline.compress.CompressConfig`, basis method) for a
compressed model, and what produced it. Loading rebuilds the original architecture,
re-applies the same ``compress_`` with placeholder bases, then loads the weights, so a
compressed model has no model class of its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from afmrec.models import ModelConfig, build_model
from afmrec.sharding.checkpoint import load_state_, save_state
from afmrec.sharding.dmp import shard_model
from afmrec.sharding.env import DistEnv, is_rank_zero
from afmrec.sharding.plan import ShardingConfig

from .artifacts import MODEL, fingerprint, read_json, shared_atomic_dir, versions, write_json
from .bases import Bases
from .blocks import find_blocks
from .compress import CompressConfig, compress_
from .errors import InputError
from .hints import typed_dataclass

FORMAT = "afmrec.model/1"


@dataclass
class ModelRecord:
    """What ``model.json`` holds."""

    model: ModelConfig
    ranks: dict[str, int] | None = None
    compress: CompressConfig | None = None
    method: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # the rank plan's policy, table format and bytes

    def __post_init__(self) -> None:
        if self.ranks is not None and not all(r >= 1 for r in self.ranks.values()):
            raise InputError(f"ranks must be >= 1, got {self.ranks}")

    @property
    def compressed(self) -> bool:
        return self.ranks is not None

    @property
    def fingerprint(self) -> str:
        """Identifies the architecture (config and ranks), not the weights."""
        return fingerprint([self.model.to_dict(), self.ranks, self.compress and self.compress.to_dict()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model.to_dict(),
            "ranks": self.ranks,
            "compress": self.compress.to_dict() if self.compress else None,
            "method": self.method,
            "plan": self.plan,
            "provenance": {"versions": versions(), **self.provenance},
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "model.json") -> "ModelRecord":
        """The record of a parsed ``model.json``, every field's type checked.

        Raises:
            InputError: ``d`` is not an afmrec model record, or a field is missing, unknown,
                of the wrong type or invalid (naming the file and the field).
        """
        if not isinstance(d, dict):
            raise InputError(f"{source}: not an afmrec model (JSON {json.dumps(d)[:40]}, not an object)")
        if d.get("format") != FORMAT:
            raise InputError(f"{source}: not an afmrec model (format {d.get('format')!r})")
        return typed_dataclass(cls, {k: v for k, v in d.items() if k != "format"}, source)


def build_from_record(record: ModelRecord, device: Any = None, sparse_device: Any = None) -> nn.Module:
    """The (untrained) module of ``record``'s architecture, compressed if it is.

    With ``sparse_device="meta"`` the tables have shapes but no storage: the skeleton
    that sharding materialises, or that tells block names and parameter counts.
    """
    model = build_model(record.model, device, sparse_device)
    if record.compressed:
        placeholders = Bases.placeholders(find_blocks(model), record.ranks)
        compress_(model, placeholders, record.compress or CompressConfig())
    return model


def skeleton(record: ModelRecord) -> nn.Module:
    """The model's structure with tables on ``meta``: block names and global sizes, no
    storage and no weights read."""
    return build_from_record(record, "cpu", sparse_device="meta")


def build_sharded(
    record: ModelRecord, env: DistEnv, sharding: ShardingConfig | None = None
) -> nn.Module:
    """``record``'s model with its tables materialised by sharding (table-wise by
    default) over the job's ranks; weights are DMP's initialisation."""
    model = build_from_record(record, env.device, sparse_device="meta")
    return shard_model(model, env, sharding or ShardingConfig())


def save_model(
    model: nn.Module | dict[str, Any],
    record: ModelRecord,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    extra: Mapping[str, Callable[[Path], None]] | None = None,
) -> Path:
    """Writes ``out_dir/model.json`` and ``out_dir/checkpoint`` atomically.

    ``model`` may be sharded (every rank writes its shards: collective) or a ready state
    dict (the shard-local compressed tables). ``extra`` adds files to the folder,
    ``{name: write(path)}``, written by rank 0 before the folder appears: the folder is
    visible with all of its files or not at all (a compressed model with its bases).
    """
    with shared_atomic_dir(out_dir, overwrite=overwrite, kind=MODEL) as tmp:
        save_state(model, tmp / "checkpoint")
        if is_rank_zero():
            write_json(tmp / "model.json", record.to_dict())
            for name, write in (extra or {}).items():
                write(tmp / name)
    return Path(out_dir)


def load_record(model_dir: str | os.PathLike[str]) -> ModelRecord:
    path = Path(model_dir) / "model.json"
    if not Path(model_dir).is_dir():
        raise InputError(f"{model_dir}: model directory not found")
    return ModelRecord.from_dict(read_json(path), str(path))


def load_model(
    model_dir: str | os.PathLike[str],
    device: Any = None,
    *,
    env: DistEnv | None = None,
    sharding: ShardingConfig | None = None,
) -> tuple[nn.Module, ModelRecord]:
    """Rebuilds and loads a saved model.

    In a job of several ranks (``env`` with a process group) the model is sharded with
    ``sharding`` (table-wise by default) and each rank loads its shards, whatever plan or
    world size wrote the checkpoint; otherwise it is loaded whole in this process.
    """
    record = load_record(model_dir)
    try:
        if env is not None and env.is_distributed:
            model = build_sharded(record, env, sharding)
        else:
            model = build_from_record(record, device)
    except InputError as e:  # a record that names blocks the architecture lacks
        raise InputError(f"{Path(model_dir) / 'model.json'}: {e}") from None
    load_state_(model, Path(model_dir) / "checkpoint")
    return model, record
