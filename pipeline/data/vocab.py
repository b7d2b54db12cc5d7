"""Per-field vocabularies: categorical values (strings) to embedding-table rows.

A vocabulary is built from the values of a field in the *training* rows only: validation
and test rows, and later days converted with the same vocabularies, map a value the
training rows never showed to the out-of-vocabulary row, as a served model would.

Row :data:`OOV_ID` (0) of every table is the out-of-vocabulary row. The kept values get
rows 1, 2, ... in order of decreasing training count (ties by value), so a cap keeps the
most frequent ones. A value is kept if it appears at least ``min_count`` times and it is
among the ``max_size - 1`` most frequent (the OOV row counts towards the cap).

The vocabularies of a conversion are saved in one Parquet file, :data:`VOCAB_FILE`, beside
the datasets: columns ``field, id, value, count``, and the fields' settings as JSON in the
file's metadata under :data:`VOCAB_KEY`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..artifacts import atomic_file
from ..errors import InputError

OOV_ID = 0
VOCAB_FILE = "vocab.parquet"
VOCAB_KEY = b"afmrec.vocab"
# The conversion's settings, stored beside the vocabularies so that later data is read the
# same way (see convert_csv's ``vocab`` argument).
RECIPE_KEY = b"afmrec.recipe"


@dataclass(frozen=True)
class VocabConfig:
    """How the vocabulary of a field is built from its training values.

    Args:
        min_count: values seen fewer times than this in the training rows go to the
            out-of-vocabulary row.
        max_size: at most this many table rows, the out-of-vocabulary row included (the
            ``max_size - 1`` most frequent values keep a row); ``None``: no cap.
        field_max_sizes: ``(field, cap)`` pairs: a cap of its own for a field.
    """

    min_count: int = 1
    max_size: int | None = None
    field_max_sizes: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.min_count) or self.min_count < 1:
            raise InputError(f"min_count must be an integer >= 1, got {self.min_count!r}")
        object.__setattr__(self, "field_max_sizes", tuple((f, n) for f, n in self.field_max_sizes))
        for cap in (self.max_size, *(n for _, n in self.field_max_sizes)):
            if cap is not None and (not _is_int(cap) or cap < 2):
                raise InputError(
                    f"a table cap must be an integer >= 2 (the OOV row and one value), got {cap!r}"
                )

    def for_field(self, name: str) -> "VocabConfig":
        """The settings of field ``name``: its own cap, if it has one."""
        caps = dict(self.field_max_sizes)
        return VocabConfig(self.min_count, caps.get(name, self.max_size))

    def check_fields(self, names: Iterable[str]) -> None:
        """Refuses a field cap for a field that is not among ``names``."""
        unknown = sorted(set(dict(self.field_max_sizes)) - set(names))
        if unknown:
            raise InputError(f"table cap for {unknown}, which are not categorical fields")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Vocabulary:
    """The rows of one field's table.

    Attributes:
        field: the field (column) name.
        values: the kept values; ``values[i]`` is row ``i + 1`` (row 0 is the OOV row).
        counts: the training count of each kept value, decreasing.
        multi_hot: the field holds a bag of values per row.
        config: how it was built.
        num_values: distinct values in the training rows (kept or not).
        oov_count: training occurrences that map to the OOV row (rare or beyond the cap).
    """

    field: str
    values: pa.Array
    counts: np.ndarray
    multi_hot: bool
    config: VocabConfig
    num_values: int
    oov_count: int

    @property
    def num_embeddings(self) -> int:
        """Table rows: the kept values and the OOV row."""
        return len(self.values) + 1

    def lookup(self, values: pa.Array) -> np.ndarray:
        """Row of each of ``values`` (strings): int64, :data:`OOV_ID` for unknown ones."""
        index = pc.index_in(values, value_set=self.values)
        return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1

    def encode(self, column: pa.Array | pa.ChunkedArray) -> pa.Array:
        """The id column of ``column``: ``int64`` ids, or ``list<int64>`` bags if multi-hot."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not self.multi_hot:
            return pa.array(self.lookup(column), pa.int64())
        ids = pa.array(self.lookup(pc.list_flatten(column)), pa.int64())
        offsets = pc.subtract(column.offsets, column.offsets[0])
        return pa.ListArray.from_arrays(offsets, ids)

    def settings(self) -> dict[str, Any]:
        """What the vocabulary file's metadata records for the field."""
        return {
            "num_embeddings": self.num_embeddings,
            "multi_hot": self.multi_hot,
            "num_values": self.num_values,
            "oov_count": self.oov_count,
            "min_count": self.config.min_count,
            "max_size": self.config.max_size,
        }


class VocabCounter:
    """Counts the values of one field, block by block, in bounded work.

    Per-block counts are kept as they come and merged (summed by value) only when they
    outgrow the last merge, so merging costs O(values) amortised.
    """

    def __init__(self, field: str, multi_hot: bool) -> None:
        self.field = field
        self.multi_hot = multi_hot
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._merged_rows = 0

    def add(self, column: pa.Array | pa.ChunkedArray) -> None:
        """Counts the values of ``column`` (strings; lists of strings if multi-hot)."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        values = pc.list_flatten(column) if self.multi_hot else column
        counts = pc.value_counts(values.cast(pa.string()))
        table = pa.table(
            {"value": counts.field("values"), "count": counts.field("counts").cast(pa.int64())}
        )
        self._tables.append(table)
        self._rows += table.num_rows
        if self._rows > 2 * max(self._merged_rows, 1 << 16):
            self._merge()

    def _merge(self) -> pa.Table:
        if not self._tables:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        table = pa.concat_tables(self._tables)
        if len(self._tables) > 1:
            summed = table.group_by("value").aggregate([("count", "sum")])
            table = summed.rename_columns(["value", "count"]).select(["value", "count"])
        self._tables, self._rows = [table], table.num_rows
        self._merged_rows = table.num_rows
        return table

    def build(self, config: VocabConfig) -> Vocabulary:
        """The vocabulary of the values counted so far."""
        table = self._merge()
        table = table.filter(pc.is_valid(table.column("value")))
        order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("value", "ascending")])
        table = table.take(order)
        counts = table.column("count").to_numpy()
        keep = int(np.count_nonzero(counts >= config.min_count))
        if config.max_size is not None:
            keep = min(keep, config.max_size - 1)
        return Vocabulary(
            field=self.field,
            values=table.column("value").combine_chunks().slice(0, keep),
            counts=counts[:keep].copy(),
            multi_hot=self.multi_hot,
            config=config,
            num_values=table.num_rows,
            oov_count=int(counts[keep:].sum()),
        )


def save_vocabularies(
    path: str | os.PathLike[str],
    vocabularies: Iterable[Vocabulary],
    *,
    recipe: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``vocabularies`` to one Parquet file, atomically.

    Args:
        path: the file to write (usually ``OUT/vocab.parquet``).
        vocabularies: the fields' vocabularies, in schema order.
        recipe: JSON-serialisable settings of the conversion, stored with them.
        overwrite: replace an existing file.
    """
    vocabularies = list(vocabularies)
    columns: dict[str, list[pa.Array]] = {"field": [], "id": [], "value": [], "count": []}
    for v in vocabularies:
        n = len(v.values)
        columns["field"].append(pa.array([v.field] * n, pa.string()))
        columns["id"].append(pa.array(np.arange(1, n + 1), pa.int64()))
        columns["value"].append(v.values.cast(pa.string()))
        columns["count"].append(pa.array(v.counts, pa.int64()))
    metadata = {VOCAB_KEY: json.dumps({v.field: v.settings() for v in vocabularies})}
    if recipe is not None:
        metadata[RECIPE_KEY] = json.dumps(recipe)
    schema = pa.schema(
        [("field", pa.string()), ("id", pa.int64()), ("value", pa.string()), ("count", pa.int64())],
        metadata=metadata,
    )
    table = pa.table(
        {k: pa.chunked_array(v, type=schema.field(k).type) for k, v in columns.items()},
        schema=schema,
    )
    with atomic_file(path, overwrite=overwrite) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def load_vocabularies(
    path: str | os.PathLike[str], conversion: tuple[str, str] | None = None
) -> tuple[dict[str, Vocabulary], dict[str, Any]]:
    """The vocabularies of a file written by :func:`save_vocabularies`, and its recipe.

    Args:
        path: the ``vocab.parquet`` file.
        conversion: ``(format, name)`` the recipe must be of (``("csv", "CSV")``), or
            ``None`` for any.

    Raises:
        InputError: the file is missing, unreadable, not a vocabulary file, or of another
            conversion.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: vocabulary file not found")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from None
    metadata = table.schema.metadata or {}
    if VOCAB_KEY not in metadata:
        raise InputError(f"{path}: not a vocabulary file (no {VOCAB_KEY.decode()} metadata)")
    try:
        settings = json.loads(metadata[VOCAB_KEY])
        recipe = json.loads(metadata.get(RECIPE_KEY, b"{}"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid vocabulary metadata ({e})") from None
    if conversion is not None and recipe.get("format") != conversion[0]:
        raise InputError(f"{path}: not the vocabularies of a {conversion[1]} conversion "
                         f"(format {recipe.get('format')!r})")
    fields = table.column("field")
    out = {}
    for name, s in settings.items():
        rows = table.filter(pc.equal(fields, name)).sort_by("id")
        if rows.num_rows != s["num_embeddings"] - 1:
            raise InputError(f"{path}: field {name!r} has {rows.num_rows} values, its "
                             f"metadata says {s['num_embeddings'] - 1}")
        out[name] = Vocabulary(
            field=name,
            values=rows.column("value").combine_chunks(),
            counts=rows.column("count").to_numpy(),
            multi_hot=bool(s["multi_hot"]),
            config=VocabConfig(min_count=s["min_count"], max_size=s["max_size"]),
            num_values=s["num_values"],
            oov_count=s["oov_count"],
        )
    return out, recipe


def describe_vocabularies(path: str | os.PathLike[str]) -> str:
    """A one-line human summary of a vocabulary file."""
    vocabularies, _ = load_vocabularies(path)
    v = list(vocabularies.values())
    kept, seen = sum(len(x.values) for x in v), sum(x.num_values for x in v)
    oov = sum(x.oov_count for x in v)
    caps = sorted({x.config.max_size for x in v if x.config.max_size is not None})
    cap = f", caps {', '.join(f'{c:,}' for c in caps)}" if caps else ""
    return (f"{path}: {len(v)} vocabularies from the training rows, {kept:,} of {seen:,} distinct "
            f"values kept (min count {v[0].config.min_count if v else 1}{cap}), {oov:,} training "
            "occurrences mapped to the OOV row")
