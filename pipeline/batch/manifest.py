"""The manifest of a batch: a CSV or Parquet table, one :class:`BatchRow` a checkpoint.

Relative paths in it are relative to the manifest's folder; every cell is converted to
its field's type (:mod:`afmrec.pipeline.hints`), and a bad cell is an error naming its row
and column.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ..compress import CompressConfig
from ..errors import InputError
from ..hints import scalar_type
from ..ranks import RankConfig
from ..stages import DataRef


@dataclass(frozen=True)
class BatchRow:
    """One manifest row: a checkpoint, how to compress it, where the results go.

    Args:
        checkpoint: a model folder (``model.json`` + ``checkpoint/``, from
            ``afmrec train``), or, with ``model_config``, a folder holding a DCP
            checkpoint (itself, or its ``checkpoint/``).
        calibration: statistics data, ``DIR`` or ``DIR@START:STOP``.
        out: the row's folder (created; not shared with another row).
        name: the row's name in the results (default: the name of ``out``).
        model_config: a JSON file of the architecture (a ``ModelConfig``, or a
            ``model.json``), for a checkpoint without ``model.json``.
        ratio, energy, rank: the rank policy's value, exactly one of them (as ``afmrec
            compress --ratio/--energy/--rank``).
        policy, table_format, serve_device, table_multiple, dense_ratio, method, activation: as
            ``afmrec compress`` (``policy`` none: its default for the value given).
        probe: labelled rows of the loss probes (default: the last tenth of ``calibration``).
        finetune: fine-tuning data (its last tenth validates); none: no fine-tuning.
        finetune_epochs, finetune_batch_size: fine-tuning passes and rows per step.
        eval: test data for AUC before and after; none: no evaluation.
        batch_size: rows per statistics batch.
    """

    checkpoint: Path
    calibration: DataRef
    out: Path
    name: str = ""
    model_config: Path | None = None
    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    policy: str | None = None
    table_format: str = "auto"
    serve_device: str = "cuda"
    probe: DataRef | None = None
    table_multiple: int = 4
    dense_ratio: float | None = None
    method: str = "afm"
    activation: str | None = None
    finetune: DataRef | None = None
    finetune_epochs: int = 1
    finetune_batch_size: int = 1024
    eval: DataRef | None = None
    batch_size: int = 4096

    def __post_init__(self) -> None:
        # Plain strings are accepted from Python callers; a manifest's cells are converted.
        for attr in ("checkpoint", "out", "model_config"):
            if isinstance(getattr(self, attr), str):
                object.__setattr__(self, attr, Path(getattr(self, attr)))
        for attr in ("calibration", "finetune", "eval", "probe"):
            if isinstance(getattr(self, attr), str):
                object.__setattr__(self, attr, DataRef.parse(getattr(self, attr)))
        if not self.name:
            object.__setattr__(self, "name", self.out.name)
        if self.method not in ("afm", "svd"):
            raise InputError(f"method must be 'afm' or 'svd', got {self.method!r}")
        if min(self.finetune_epochs, self.finetune_batch_size, self.batch_size) < 1:
            raise InputError("finetune_epochs, finetune_batch_size and batch_size must be >= 1")
        # their own checks (exactly one of ratio, energy, rank...), before any job starts
        self.rank_config(), self.compress_config()

    def rank_config(self) -> RankConfig:
        return RankConfig.from_policy(self.policy, ratio=self.ratio, energy=self.energy, rank=self.rank,
                                      table_format=self.table_format, serve_device=self.serve_device,
                                      table_multiple=self.table_multiple, dense_ratio=self.dense_ratio)

    def compress_config(self) -> CompressConfig:
        return CompressConfig(activation=self.activation)


# --------------------------------------------------------------------- reading it


def _read_table(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except pa.ArrowInvalid as e:
            raise InputError(f"{path}: not a Parquet table ({e})") from None
    if path.suffix != ".csv":
        raise InputError(f"{path}: a manifest is a .csv or .parquet file")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _is_blank(value: Any) -> bool:
    """Empty CSV cells, Parquet nulls, and the NaN that pandas writes for missing floats."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _convert(kind: type, value: Any, base: Path) -> Any:
    """A cell as the field's type; paths relative to ``base`` (the manifest's folder)."""
    if kind is Path:
        return base / str(value).strip()
    if kind is DataRef:
        ref = DataRef.parse(str(value).strip())
        return dataclasses.replace(ref, path=base / ref.path)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    converted = kind(value.strip() if isinstance(value, str) else value)
    if kind is float and not math.isfinite(converted):  # "nan" and "inf" parse as floats
        raise ValueError(value)
    return converted


@functools.cache
def _row_hints() -> dict[str, Any]:
    return typing.get_type_hints(BatchRow)


def _row(record: Mapping[str, Any], base: Path, where: str) -> BatchRow:
    hints = _row_hints()
    values = {}
    for column, value in record.items():
        if _is_blank(value):
            continue
        kind = scalar_type(hints[column])
        try:
            values[column] = _convert(kind, value, base)
        except InputError as e:  # a malformed DIR@START:STOP says what is wrong itself
            raise InputError(f"{where}, column {column!r}: {e}") from None
        except ValueError:
            raise InputError(f"{where}, column {column!r}: expected {kind.__name__}, got {value!r}") from None
    for f in dataclasses.fields(BatchRow):
        if f.default is dataclasses.MISSING and f.name not in values:
            raise InputError(f"{where}: column {f.name!r} is empty")
    try:
        return BatchRow(**values)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def read_manifest(path: str | os.PathLike[str]) -> list[BatchRow]:
    """The rows of a CSV or Parquet manifest, validated before any job starts.

    Raises:
        InputError: the file is missing or not CSV/Parquet; a column is unknown or a
            required one is absent; a cell has the wrong type; a row's settings are
            invalid; two rows share a name or an ``out`` folder. The message names the
            file, the row (1 = the first after the header) and the column.
    """
    path = Path(path)
    records = _read_table(path)
    columns = list(records[0]) if records else []
    known = [f.name for f in dataclasses.fields(BatchRow)]
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {unknown} (known: {', '.join(known)})")
    if not records:
        raise InputError(f"{path}: the manifest has no rows")
    required = [f.name for f in dataclasses.fields(BatchRow) if f.default is dataclasses.MISSING]
    absent = [c for c in required if c not in columns]
    if absent:
        raise InputError(f"{path}: no column(s) {absent}")
    base = path.resolve().parent
    rows = [_row(r, base, f"{path}, row {i + 1}") for i, r in enumerate(records)]
    for attr in ("name", "out"):
        seen: dict[Any, int] = {}
        for i, row in enumerate(rows):
            j = seen.setdefault(getattr(row, attr), i)
            if j != i:
                raise InputError(f"{path}: rows {j + 1} and {i + 1} have the same {attr} "
                                 f"({getattr(row, attr)})")
    return rows
