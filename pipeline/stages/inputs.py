"""What the stages read: datasets and ranges of their rows, checked against a model.

:class:`DataRef` names a Parquet dataset or a contiguous range of its rows;
:func:`check_matching_schema` and :func:`check_teacher` refuse data or a teacher that does
not fit a model, saying how; :func:`model_fingerprint` identifies a saved model (what
statistics and compressions record they were computed from).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from afmrec.models import ModelConfig, TableSpec
from afmrec.sharding.checkpoint import CHECKSUMS
from afmrec.sharding.env import DistEnv

from ..artifacts import file_fingerprint, fingerprint
from ..data import DataSchema, ParquetBatches, read_schema
from ..errors import InputError
from ..model_io import ModelRecord, load_record
from ..sensitivity import SensitivityConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataRef:
    """A Parquet dataset, or a contiguous fraction ``[start, stop)`` of its rows.

    ``DIR`` is the whole dataset, ``DIR@0.9:1`` its last tenth (rows in file order):
    the way to hold out validation rows without writing a second copy.
    """

    path: Path
    start: float = 0.0
    stop: float = 1.0
    # The dense columns in the order a model reads them (matched by name, see
    # check_matching_schema); None: the dataset's order.
    dense: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise InputError(f"{self}: row range must satisfy 0 <= start < stop <= 1")

    @classmethod
    def parse(cls, spec: str | os.PathLike[str]) -> "DataRef":
        spec = str(spec)
        path, sep, rng = spec.rpartition("@") if "@" in spec else (spec, "", "")
        if not sep:
            return cls(Path(spec))
        try:
            a, b = rng.split(":")
            return cls(Path(path), float(a or 0), float(b or 1))
        except ValueError:
            raise InputError(f"{spec}: expected DIR or DIR@START:STOP (fractions)") from None

    def probe_slice(self) -> "DataRef":
        """The default rows of the loss probes: this range's last tenth
        (:attr:`~afmrec.pipeline.sensitivity.SensitivityConfig.fraction`)."""
        return self.split(SensitivityConfig.fraction)[1]

    def split(self, fraction: float) -> tuple["DataRef", "DataRef"]:
        """(first ``1 - fraction``, last ``fraction``) of this range."""
        cut = self.stop - (self.stop - self.start) * fraction
        return dataclasses.replace(self, stop=cut), dataclasses.replace(self, start=cut)

    def schema(self) -> DataSchema:
        return read_schema(self.path)

    def batches(self, batch_size: int, env: DistEnv | None = None, **kwargs: Any) -> ParquetBatches:
        """This rank's batches (every rank gets as many: see :class:`ParquetBatches`)."""
        if env is not None:
            kwargs.update(rank=env.rank, world_size=env.world_size)
        reader = ParquetBatches(self.path, batch_size, row_range=(self.start, self.stop), **kwargs)
        if self.dense is not None and self.dense != reader.schema.dense:
            # The reader selects every column by name through its schema (conform_table,
            # make_batch): the same names in the model's order are read in that order.
            reader.schema = dataclasses.replace(reader.schema, dense=self.dense)
        return reader

    def fingerprint(self) -> str:
        return fingerprint([file_fingerprint(self.path), self.start, self.stop])

    def __str__(self) -> str:
        full = self.start == 0.0 and self.stop == 1.0
        return str(self.path) if full else f"{self.path}@{self.start:g}:{self.stop:g}"


def model_config_from_schema(schema: DataSchema, arch: str, **overrides: Any) -> ModelConfig:
    """A model for a dataset: one table per sparse field, the dense width from the data."""
    tables = tuple(TableSpec(f.name, f.num_embeddings) for f in schema.sparse)
    dim = overrides.get("embedding_dim", ModelConfig.embedding_dim)
    overrides.setdefault("dense_arch", (max(4 * dim, 32), dim))
    try:
        return ModelConfig(arch=arch, tables=tables, num_dense=len(schema.dense),
                           dense_names=schema.dense, **overrides)
    except ValueError as e:
        raise InputError(f"model config: {e}") from None


def check_matching_schema(record: ModelRecord, data: DataRef) -> DataRef:
    """``data`` as the model reads it: its tables must be the model's (names and sizes) and
    its dense columns the model's, matched by name (in any order) where the model records
    their names, by count for a model of an earlier version.

    Raises:
        InputError: the data does not match the model, saying how.
    """
    schema = data.schema()
    want = {t.name: t.num_embeddings for t in record.model.tables}
    have = schema.table_sizes()
    names = record.model.dense_names
    if want != have or record.model.num_dense != len(schema.dense):
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise InputError(
            f"{data}: the data does not match the model (tables differ: {diff[:4]}; "
            f"dense {len(schema.dense)} vs {record.model.num_dense})"
        )
    if names is None:
        if schema.dense:
            log.warning("the model records no names of its dense features (written by an earlier "
                        "afmrec): the columns of %s are read by position, %s", data, list(schema.dense))
        return data
    if set(names) != set(schema.dense):
        raise InputError(f"{data}: the data's dense columns {list(schema.dense)} are not the "
                         f"model's {list(names)}")
    return dataclasses.replace(data, dense=names)


def check_teacher(student: ModelRecord, teacher: ModelRecord, teacher_dir: Path) -> None:
    """A teacher reads the student's batches: it needs the same tables and dense features
    (by name, in the same order).

    Raises:
        InputError: the teacher's inputs differ from the student's.
    """
    s, t = student.model, teacher.model
    same_tables = ({x.name: x.num_embeddings for x in s.tables}
                   == {x.name: x.num_embeddings for x in t.tables})
    same_dense = s.num_dense == t.num_dense and (
        None in (s.dense_names, t.dense_names) or s.dense_names == t.dense_names)
    if not (same_tables and same_dense):
        raise InputError(f"{teacher_dir}: the teacher's inputs are not the student's (tables "
                         f"{[(x.name, x.num_embeddings) for x in t.tables][:4]}, dense "
                         f"{list(t.dense_names or [t.num_dense])}; the student has "
                         f"{[(x.name, x.num_embeddings) for x in s.tables][:4]}, dense "
                         f"{list(s.dense_names or [s.num_dense])})")


# The environment of a stage run in one process, without a process group.
LOCAL = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def model_fingerprint(model_dir: Path) -> str:
    """Architecture plus checkpoint content. A checkpoint's ``checksums.json`` already
    holds the SHA-256 of each of its files (verified whenever it is loaded), so hashing
    it stands for hashing them all, without reading gigabytes a second time."""
    checkpoint = model_dir / "checkpoint"
    checksums = checkpoint / CHECKSUMS
    content = file_fingerprint(checksums if checksums.is_file() else checkpoint)
    return fingerprint([load_record(model_dir).fingerprint, content])
