"""Delimited files (CSV, TSV; Avazu-style click logs) to train / validation / test datasets.

Every column has one role: the label (0 or 1), a dense feature (a number; empty -> 0),
a categorical field (its string value; the empty string is a value like any other), a
multi-hot field (a list of values joined by a separator; empty values are dropped), the
split's time column, or dropped. Categorical and multi-hot fields get vocabularies built
from the training rows (see :mod:`.vocab`, :mod:`.encode`), saved as ``vocab.parquet``
with the conversion's settings: :func:`apply_csv_vocab` maps later files (test data,
later days) the same way.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .delimited import CsvBlock, CsvFormat, CsvReader
from .encode import Fields, RawBlock, apply_vocabularies, convert_with_vocabularies
from .splits import SplitConfig
from .textio import DEFAULT_BLOCK_BYTES, Where, cast_or_fail, check_inputs, progress_bar, split_bags
from .vocab import VocabConfig, load_vocabularies


@dataclass(frozen=True)
class CsvColumns:
    """The role of every column.

    Args:
        label: the label column: 0 or 1 (also ``true``/``false``).
        categorical: the categorical columns; ``None``: every column given no other role.
        dense: the dense (numeric) columns.
        multi_hot: ``(column, separator)`` of each multi-hot column.
        drop: columns to leave out.
        time: the column whose order splits the rows by time (numbers or ISO dates); it
            is a feature only if also named in ``categorical`` or ``dense``.
        log_dense: dense values become ``log(1 + max(x, 0))`` (for counts), as Criteo's.
    """

    label: str
    categorical: tuple[str, ...] | None = None
    dense: tuple[str, ...] = ()
    multi_hot: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    time: str | None = None
    log_dense: bool = False

    def __post_init__(self) -> None:
        for name in ("categorical", "dense", "drop"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "multi_hot", tuple((c, s) for c, s in self.multi_hot))
        for column, separator in self.multi_hot:
            if not separator:
                raise InputError(f"multi-hot column {column!r}: empty separator")
        roles = [self.label, *(self.categorical or ()), *self.dense,
                 *(c for c, _ in self.multi_hot), *self.drop]
        twice = sorted({c for c in roles if roles.count(c) > 1})
        if twice:
            raise InputError(f"column(s) {twice} are given more than one role")
        if self.time is not None and self.time in self.drop:
            raise InputError(f"the time column {self.time!r} cannot be dropped")

    def resolve(self, names: Sequence[str]) -> "CsvColumns":
        """The same roles with ``categorical`` explicit: every column of ``names`` that has
        no other role (the time column excepted).

        Raises:
            InputError: a named column is not in ``names``; with an explicit
                ``categorical``, a column of ``names`` has no role.
        """
        named = [self.label, *(self.categorical or ()), *self.dense,
                 *(c for c, _ in self.multi_hot), *self.drop]
        named += [self.time] if self.time else []
        missing = [c for c in named if c not in names]
        if missing:
            raise InputError(f"no column(s) {missing} in the input (its columns: {list(names)})")
        rest = [n for n in names if n not in named]
        if self.categorical is not None and rest:
            raise InputError(f"column(s) {rest} have no role: name them in --categorical, "
                             "--dense, --multi-hot or --drop")
        categorical = self.categorical if self.categorical is not None else tuple(rest)
        if not categorical and not self.multi_hot:
            raise InputError("no categorical or multi-hot column: a dataset needs at least one")
        return CsvColumns(**{**asdict(self), "categorical": categorical})

    def fields(self) -> Fields:
        multi_hot = dict.fromkeys(self.categorical or (), False) | {c: True for c, _ in self.multi_hot}
        return Fields(label=self.label, dense=self.dense, multi_hot=multi_hot)

    def read(self) -> list[str]:
        """The columns to parse."""
        wanted = [self.label, *self.dense, *(self.categorical or ()), *(c for c, _ in self.multi_hot)]
        if self.time and self.time not in wanted:
            wanted.append(self.time)
        return wanted

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CsvColumns":
        return cls(**{**d, "multi_hot": tuple(tuple(x) for x in d.get("multi_hot", ()))})


def convert_csv(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    columns: CsvColumns,
    *,
    fmt: CsvFormat = CsvFormat(),
    split: SplitConfig = SplitConfig(),
    vocab: VocabConfig = VocabConfig(),
    overwrite: bool = False,
    progress: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> dict[str, Path]:
    """Converts delimited files to ``out/train``, ``out/val``, ``out/test`` and
    ``out/vocab.parquet``.

    The rows of all ``inputs`` (in order) are split in file order, or by
    ``columns.time`` (ties in file order; each part keeps file order). Three passes
    over the inputs: the split, the vocabularies of the training rows, the writing.

    Args:
        inputs: the files (gzip or not), read in order.
        out: the folder to create.
        columns: the role of every column.
        fmt: the files' layout (delimiter, header, encoding).
        split: validation and test fractions.
        vocab: the vocabularies' settings (minimum count, caps).
        overwrite: replace an existing ``out``.
        progress: show progress bars (on a terminal).
        block_bytes: bytes of text parsed at a time (bounds memory).

    Returns:
        The dataset folder of each part, by name (``"train"``, ``"val"``, ``"test"``).

    Raises:
        InputError: a missing or unknown column, a malformed line or value (naming the
            file and line), damaged gzip data, text not in ``fmt.encoding``.

    Example::

        convert_csv(["train.gz"], "data/avazu", CsvColumns(label="click", drop=("id",),
                    time="hour"), vocab=VocabConfig(min_count=5))
    """
    out = Path(out)
    paths = check_inputs(inputs, out)
    reader = CsvReader(paths, fmt, block_bytes)
    columns = columns.resolve(reader.names)
    recipe = {"format": "csv", "columns": asdict(columns)}
    info = {"source": {"format": "csv", "inputs": [str(p) for p in paths], "columns": asdict(columns)}}
    return convert_with_vocabularies(
        _raw_blocks(reader, columns, progress), out, columns.fields(), split=split, vocab=vocab,
        order_name=columns.time or "rows", info=info, recipe=recipe, overwrite=overwrite,
    )


def apply_csv_vocab(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    vocab_file: str | os.PathLike[str],
    *,
    fmt: CsvFormat = CsvFormat(),
    overwrite: bool = False,
    progress: bool = True,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Path:
    """Converts delimited files into one dataset ``out`` with the vocabularies (and column
    roles) of an earlier :func:`convert_csv`: the same schema, values unseen then map
    to the OOV row. Columns the earlier conversion did not use are ignored.
    """
    out = Path(out)
    paths = check_inputs(inputs, out)
    vocabularies, recipe = load_vocabularies(vocab_file, ("csv", "CSV"))
    columns = CsvColumns.from_dict({**recipe["columns"], "time": None})
    reader = CsvReader(paths, fmt, block_bytes)
    reader.check_columns(columns.read(), f"{vocab_file} was built from them")
    info = {"source": {"format": "csv", "inputs": [str(p) for p in paths],
                       "columns": asdict(columns)}, "vocabulary": str(Path(vocab_file).resolve())}
    return apply_vocabularies(_raw_blocks(reader, columns, progress), out, columns.fields(),
                              vocabularies, info=info, overwrite=overwrite)


def _raw_blocks(reader: CsvReader, columns: CsvColumns, progress: bool):
    def blocks(desc: str) -> Iterator[RawBlock]:
        with progress_bar(reader.paths, f"csv ({desc})", progress) as bar:
            for block in reader.blocks(columns.read(), bar):
                yield _raw_block(block, columns)

    return blocks


def _raw_block(block: CsvBlock, columns: CsvColumns) -> RawBlock:
    table, where = block.table, block.where
    categorical = {name: table.column(name).combine_chunks() for name in columns.categorical or ()}
    categorical |= {name: split_bags(table.column(name).combine_chunks(), separator)
                    for name, separator in columns.multi_hot}
    return RawBlock(
        source=str(where.path),
        label=_labels(table.column(columns.label).combine_chunks(), columns.label, where),
        dense={name: _dense(table.column(name).combine_chunks(), name, where, columns.log_dense)
               for name in columns.dense},
        categorical=categorical,
        order=_order(table.column(columns.time).combine_chunks(), columns.time, where)
        if columns.time else None,
    )


_TRUE, _FALSE = ("1", "true", "True", "TRUE"), ("0", "false", "False", "FALSE")


def _labels(strings: pa.Array, name: str, where: Where) -> np.ndarray:
    strings = pc.utf8_trim_whitespace(strings)
    positive = pc.is_in(strings, value_set=pa.array(_TRUE)).to_numpy(zero_copy_only=False)
    negative = pc.is_in(strings, value_set=pa.array(_FALSE)).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~(positive | negative))
    if bad.size:
        raise where.error(bad[0], f"label {name!r} must be 0 or 1, got {strings[bad[0]].as_py()!r}")
    return positive.astype(np.int8)


def _dense(strings: pa.Array, name: str, where: Where, log: bool) -> np.ndarray:
    strings = pc.utf8_trim_whitespace(strings)
    empty = pc.equal(strings, "")
    strings = pc.if_else(empty, "0", strings)

    def bad(row: int) -> InputError:
        return where.error(row, f"dense column {name!r} must be a number, got {strings[row].as_py()!r}")

    values = cast_or_fail(strings, pa.float64(), bad).to_numpy()
    if not np.all(np.isfinite(values)):
        raise bad(np.flatnonzero(~np.isfinite(values))[0])
    if log:
        values = np.log1p(np.maximum(values, 0))
    return values.astype(np.float32)


def _order(strings: pa.Array, name: str, where: Where) -> np.ndarray:
    """The time column as sortable numbers: integers, decimals, or ISO-8601 dates."""
    strings = pc.utf8_trim_whitespace(strings)
    for to_type in (pa.int64(), pa.float64(), pa.timestamp("us")):
        try:
            values = pc.cast(strings, to_type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return values.cast(pa.int64()).to_numpy() if to_type == pa.timestamp("us") else values.to_numpy()

    def bad(row: int) -> InputError:
        return where.error(row, f"time column {name!r} must be a number or an ISO date, "
                           f"got {strings[row].as_py()!r}")

    cast_or_fail(strings, pa.float64(), bad)
    raise bad(0)  # pragma: no cover (cast_or_fail raises)
