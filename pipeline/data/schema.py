"""The on-disk dataset layout: Parquet parts with a declared schema, and its validation.

A dataset is a folder of ``part-00000.parquet``, ``part-00001.parquet``... files read in
name order. Every part has the columns of its :class:`DataSchema` (label, dense, sparse, in
that order) and carries the schema as JSON in its key-value metadata under
:data:`SCHEMA_KEY`, so a part is self-describing. ``_dataset.json`` beside the parts repeats
the schema with the row count and the positive rate for humans; readers never need it.
Its leading underscore makes Parquet tools (``pyarrow.parquet.read_table(folder)``,
pandas, Spark) skip it, so the folder stays readable as a plain Parquet dataset.

Column types (:meth:`DataSchema.arrow_schema`):

* label: ``int8``, 0 or 1;
* dense: ``float32``;
* sparse: ``int64`` (one id per row) or, for a multi-hot field, ``list<int64>`` (a bag of
  0 or more ids per row), every id in ``[0, num_embeddings)``.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..artifacts import atomic_dir, read_json, write_json
from ..errors import InputError

SCHEMA_KEY = b"afmrec.schema"
INFO_FILE = "_dataset.json"

# 64k-row groups are the unit of reading and of the reader's rank split and shuffling:
# small enough to split a dataset fairly across ranks, large enough to read efficiently.
DEFAULT_ROW_GROUP_SIZE = 1 << 16
DEFAULT_ROWS_PER_FILE = 1 << 21

LABEL_TYPE = pa.int8()
DENSE_TYPE = pa.float32()
ID_TYPE = pa.int64()


@dataclass(frozen=True)
class SparseField:
    """One sparse (categorical) field and its embedding table.

    Args:
        name: column name, also the ``KeyedJaggedTensor`` key and the table's feature name.
        num_embeddings: table size; ids are in ``[0, num_embeddings)``.
        multi_hot: the column is ``list<int64>`` and a row holds a bag of 0 or more ids;
            otherwise it is ``int64`` with exactly one id per row.
    """

    name: str
    num_embeddings: int
    multi_hot: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"sparse field name must be a non-empty string, got {self.name!r}")
        if not _is_int(self.num_embeddings) or self.num_embeddings <= 0:
            raise InputError(
                f"sparse field {self.name!r}: num_embeddings must be a positive integer, "
                f"got {self.num_embeddings!r}"
            )
        object.__setattr__(self, "num_embeddings", int(self.num_embeddings))  # numpy ints
        if not isinstance(self.multi_hot, bool):
            raise InputError(f"sparse field {self.name!r}: multi_hot must be a bool")

    def arrow_type(self) -> pa.DataType:
        return pa.list_(ID_TYPE) if self.multi_hot else ID_TYPE


@dataclass(frozen=True)
class DataSchema:
    """Columns of a CTR dataset: a binary label, N dense features and F sparse fields.

    Args:
        dense: names of the dense (float) columns, in model input order; may be empty.
        sparse: the sparse fields, in ``KeyedJaggedTensor`` key order; at least one.
        label: name of the label column.

    Example::

        schema = DataSchema(dense=("I1",), sparse=(SparseField("C1", 10),))
        assert DataSchema.from_dict(schema.to_dict()) == schema
    """

    dense: tuple[str, ...]
    sparse: tuple[SparseField, ...]
    label: str = "label"

    def __post_init__(self) -> None:
        # Lists are accepted (JSON has no tuples); stored as tuples so the schema is hashable.
        object.__setattr__(self, "dense", tuple(self.dense))
        object.__setattr__(self, "sparse", tuple(self.sparse))
        if not self.sparse:
            raise InputError("a dataset schema needs at least one sparse field")
        if not all(isinstance(f, SparseField) for f in self.sparse):
            raise InputError("DataSchema.sparse must hold SparseField objects")
        names = self.column_names()
        if not all(isinstance(n, str) and n for n in names):
            raise InputError(f"column names must be non-empty strings, got {list(names)}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise InputError(f"duplicate column names in the dataset schema: {duplicates}")

    def column_names(self) -> tuple[str, ...]:
        """Label, dense and sparse column names, in storage order."""
        return (self.label, *self.dense, *(f.name for f in self.sparse))

    def table_sizes(self) -> dict[str, int]:
        """``num_embeddings`` by sparse field name, in schema order."""
        return {f.name: f.num_embeddings for f in self.sparse}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataSchema":
        """Inverse of :meth:`to_dict`; an :class:`InputError` says what is malformed."""
        try:
            return cls(
                dense=tuple(d["dense"]),
                sparse=tuple(SparseField(**f) for f in d["sparse"]),
                label=d["label"],
            )
        except (KeyError, TypeError) as e:
            raise InputError(f"malformed dataset schema {dict(d)!r} ({e!r})") from None

    def arrow_schema(self) -> pa.Schema:
        """The Parquet schema of a part, with this schema as JSON in its metadata."""
        fields = [
            pa.field(self.label, LABEL_TYPE, nullable=False),
            *(pa.field(n, DENSE_TYPE, nullable=False) for n in self.dense),
            *(pa.field(f.name, f.arrow_type(), nullable=False) for f in self.sparse),
        ]
        return pa.schema(fields, metadata={SCHEMA_KEY: json.dumps(self.to_dict())})


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# --- validation -------------------------------------------------------------------------

def validate_table(table: pa.Table | pa.RecordBatch, schema: DataSchema, source: str) -> None:
    """Checks that ``table`` holds valid rows of ``schema``.

    Columns must be exactly the schema's (in any order), without nulls. Types need only be
    of the right kind, :func:`conform_table` casts them to the stored ones
    (:meth:`DataSchema.arrow_schema`): integer, boolean or floating labels, integer or
    floating dense values, integer ids (in lists for multi-hot fields). Values: labels 0 or
    1, finite dense values, ids in ``[0, num_embeddings)``. Every check is a vectorised pass
    (``pyarrow.compute``), cheap enough to run on every row group read.

    Args:
        table: the rows.
        schema: what they must be.
        source: where they come from (a path, a row group), for the error message.

    Raises:
        InputError: naming ``source`` and the column at fault.
    """
    present = set(table.column_names)
    missing = [n for n in schema.column_names() if n not in present]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing} of the dataset schema")
    extra = sorted(present - set(schema.column_names()))
    if extra:
        raise InputError(f"{source}: column(s) {extra} are not in the dataset schema")
    _check_label(table.column(schema.label), schema.label, source)
    for name in schema.dense:
        _check_dense(table.column(name), name, source)
    for field in schema.sparse:
        _check_sparse(table.column(field.name), field, source)


def conform_table(table: pa.Table, schema: DataSchema, source: str) -> pa.Table:
    """Validates ``table`` and returns it with the stored column order and types."""
    validate_table(table, schema, source)
    return table.select(list(schema.column_names())).cast(schema.arrow_schema())


def _fail(source: str, name: str, problem: str) -> InputError:
    return InputError(f"{source}: column {name!r} {problem}")


def _check_no_nulls(column: Any, name: str, source: str) -> None:
    if column.null_count:
        raise _fail(source, name, f"has {column.null_count} null value(s)")


def _check_label(column: Any, name: str, source: str) -> None:
    t = column.type
    if not (pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_floating(t)):
        raise _fail(source, name, f"has type {t}; a label must be an integer 0 or 1")
    _check_no_nulls(column, name, source)
    values = pc.cast(column, pa.float64())
    binary = pc.is_in(values, value_set=pa.array([0.0, 1.0]))
    if not pc.all(binary, min_count=0).as_py():
        bad = pc.filter(column, pc.invert(binary))[0].as_py()
        raise _fail(source, name, f"must hold 0 or 1, found {bad!r}")


def _check_dense(column: Any, name: str, source: str) -> None:
    t = column.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise _fail(source, name, f"has type {t}; a dense feature must be a number")
    _check_no_nulls(column, name, source)
    if pa.types.is_floating(t) and not pc.all(pc.is_finite(column), min_count=0).as_py():
        raise _fail(source, name, "has NaN or infinite values")


def _check_sparse(column: Any, field: SparseField, source: str) -> None:
    t, name = column.type, field.name
    expected = "a list of integer ids" if field.multi_hot else "an integer id"
    is_list = pa.types.is_list(t) or pa.types.is_large_list(t)
    if is_list != field.multi_hot or not pa.types.is_integer(t.value_type if is_list else t):
        raise _fail(source, name, f"has type {t}; field {name!r} holds {expected} per row")
    _check_no_nulls(column, name, source)
    ids = pc.list_flatten(column) if is_list else column
    _check_no_nulls(ids, name, source)  # null ids inside bags
    lo, hi = pc.min_max(ids).values()
    if lo.is_valid and lo.as_py() < 0:
        raise _fail(source, name, f"has a negative id {lo.as_py()}")
    if hi.is_valid and hi.as_py() >= field.num_embeddings:
        raise _fail(
            source, name, f"has id {hi.as_py()} >= its table size {field.num_embeddings}"
        )


# --- reading metadata -------------------------------------------------------------------


def list_parts(path: str | os.PathLike[str]) -> list[Path]:
    """The Parquet files of the dataset folder ``path``, in reading order (by name)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: dataset not found")
    if not path.is_dir():
        raise InputError(f"{path}: not a dataset folder (expected a folder of .parquet parts)")
    parts = sorted(path.glob("*.parquet"))
    if not parts:
        raise InputError(f"{path}: not a dataset (no .parquet files in the folder)")
    return parts


def read_part_schema(part: Path) -> DataSchema:
    """The :class:`DataSchema` stored in one Parquet file's metadata."""
    try:
        metadata = pq.read_schema(part).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise InputError(f"{part}: not a readable Parquet file ({e})") from None
    if SCHEMA_KEY not in metadata:
        raise InputError(
            f"{part}: no {SCHEMA_KEY.decode()} metadata; write datasets with "
            "`afmrec convert` or afmrec.pipeline.data.write_dataset"
        )
    try:
        return DataSchema.from_dict(json.loads(metadata[SCHEMA_KEY]))
    except (json.JSONDecodeError, InputError) as e:
        raise InputError(f"{part}: invalid {SCHEMA_KEY.decode()} metadata: {e}") from None


def read_schema(path: str | os.PathLike[str]) -> DataSchema:
    """The schema of the dataset folder ``path`` (all its parts must agree).

    Raises:
        InputError: the folder is missing, holds no parts, or its parts lack or disagree on
            the schema.
    """
    parts = list_parts(path)
    schema = read_part_schema(parts[0])
    for part in parts[1:]:
        if read_part_schema(part) != schema:
            raise InputError(f"{part}: its schema differs from that of {parts[0].name}")
    return schema


def read_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The contents of a dataset's ``_dataset.json`` (schema, counts, producer's notes)."""
    return read_json(Path(path) / INFO_FILE)


def describe_dataset(path: str | os.PathLike[str]) -> str:
    """A one-line human summary of a dataset folder, from its ``_dataset.json``."""
    info = read_info(path)
    schema = DataSchema.from_dict(info["schema"])
    sizes = schema.table_sizes().values()
    spread = f"{min(sizes):,}" if min(sizes) == max(sizes) else f"{min(sizes):,} to {max(sizes):,}"
    return (
        f"{path}: {info['num_rows']:,} rows ({info['positive_rate']:.1%} positive), "
        f"{len(schema.dense)} dense, {len(sizes)} sparse fields (tables of {spread} rows)"
    )


# --- writing ----------------------------------------------------------------------------


def sparse_column(ids: np.ndarray, lengths: np.ndarray, multi_hot: bool) -> pa.Array:
    """The Arrow column of one sparse field from flat ids and per-row bag sizes.

    Args:
        ids: all rows' ids concatenated, row-major; int64.
        lengths: (B,) bag size of each row; all 1 when not ``multi_hot``.
        multi_hot: build ``list<int64>`` bags, else one ``int64`` id per row.
    """
    ids = pa.array(ids, type=ID_TYPE)
    if not multi_hot:
        return ids
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), ids)


class DatasetWriter:
    """Appends validated tables to the Parquet parts of a folder (see :func:`create_dataset`).

    Rows are buffered into row groups of exactly ``row_group_size`` rows (except the last
    one) whatever the sizes of the written tables, and a new part starts every
    ``rows_per_file`` rows.

    Attributes:
        num_rows: rows written so far.
        num_positives: rows with label 1 so far.
        info: extra entries for ``_dataset.json``; may be filled until the writer closes.
    """

    def __init__(
        self, schema: DataSchema, folder: Path, *, rows_per_file: int, row_group_size: int
    ) -> None:
        if rows_per_file <= 0 or row_group_size <= 0:
            raise InputError("rows_per_file and row_group_size must be positive")
        self.schema = schema
        self.folder = folder
        self.rows_per_file = rows_per_file
        self.row_group_size = row_group_size
        self.num_rows = 0
        self.num_positives = 0
        self.info: dict[str, Any] = {}
        self._arrow_schema = schema.arrow_schema()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._file: pq.ParquetWriter | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, table: pa.Table, source: str = "table") -> None:
        """Validates ``table`` (see :func:`validate_table`) and appends its rows."""
        table = conform_table(table, self.schema, source)
        self.num_rows += table.num_rows
        self.num_positives += pc.sum(table.column(self.schema.label)).as_py() or 0
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= self._next_group_rows():
            self._write_group()

    def close(self, flush: bool = True) -> None:
        """Closes the current part, after writing the buffered rows if ``flush``."""
        while flush and self._pending_rows:
            self._write_group()
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict[str, Any]:
        """The contents of ``_dataset.json``."""
        return {
            "schema": self.schema.to_dict(),
            "num_rows": self.num_rows,
            "num_positives": self.num_positives,
            "positive_rate": self.num_positives / max(self.num_rows, 1),
            "parts": self._parts,
            **self.info,
        }

    def _next_group_rows(self) -> int:
        room_in_file = self.rows_per_file - (self._parts[-1]["num_rows"] if self._file else 0)
        return min(self.row_group_size, room_in_file)

    def _write_group(self) -> None:
        n = min(self._next_group_rows(), self._pending_rows)
        pending = pa.concat_tables(self._pending)
        if self._file is None:
            name = f"part-{len(self._parts):05d}.parquet"
            # Page CRCs: the reader verifies them, so a damaged part is an error, not
            # silently different features.
            self._file = pq.ParquetWriter(self.folder / name, self._arrow_schema,
                                          write_page_checksum=True)
            self._parts.append({"name": name, "num_rows": 0})
        self._file.write_table(pending.slice(0, n), row_group_size=n)
        self._parts[-1]["num_rows"] += n
        rest = pending.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
        if self._parts[-1]["num_rows"] == self.rows_per_file:
            self._file.close()
            self._file = None


@contextlib.contextmanager
def create_dataset(
    schema: DataSchema,
    out_dir: str | os.PathLike[str],
    *,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> Iterator[DatasetWriter]:
    """Writes a dataset folder atomically, table by table (for data larger than memory).

    The folder appears at ``out_dir`` only when the ``with`` block completes without error,
    with its parts and ``_dataset.json``.

    Raises:
        InputError: ``out_dir`` exists and not ``overwrite``; a table is invalid; no rows
            were written.

    Example::

        with create_dataset(schema, "data/train") as writer:
            for table in tables:
                writer.write(table)
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writer = DatasetWriter(
            schema, tmp, rows_per_file=rows_per_file, row_group_size=row_group_size
        )
        try:
            yield writer
        except BaseException:
            writer.close(flush=False)  # the folder is discarded: only release the file
            raise
        writer.close()
        if writer.num_rows == 0:
            raise InputError(f"{out_dir}: no rows to write")
        write_json(tmp / INFO_FILE, writer.summary())


def write_dataset(
    table: pa.Table,
    schema: DataSchema,
    out_dir: str | os.PathLike[str],
    *,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    overwrite: bool = False,
) -> Path:
    """Validates ``table`` against ``schema`` and writes it as a dataset folder, atomically.

    Args:
        table: the rows; columns as :func:`validate_table` accepts.
        schema: the dataset schema, stored in every part.
        out_dir: the dataset folder to create.
        rows_per_file: rows per Parquet part.
        row_group_size: rows per row group (the unit of reading, splitting and shuffling).
        overwrite: replace an existing ``out_dir`` (only once the new one is complete).

    Returns:
        ``out_dir``.

    Example::

        table = pa.table({"label": [0, 1], "C1": [3, 7]})
        write_dataset(table, DataSchema((), (SparseField("C1", 10),)), "data/tiny")
    """
    with create_dataset(
        schema,
        out_dir,
        rows_per_file=rows_per_file,
        row_group_size=row_group_size,
        overwrite=overwrite,
    ) as writer:
        writer.write(table)
    return Path(out_dir)
