"""Converters from raw text formats to the dataset layout of :mod:`.schema`.

Both stream their inputs in blocks of whole lines (memory is bounded by ``block_bytes``,
whatever the file sizes), parse each block with vectorised ``pyarrow.compute`` / numpy
operations, and write through :func:`~.schema.create_dataset` (atomic: the output appears
only when complete). A malformed line is an :class:`InputError` naming the file and line.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
from ..errors import InputError
from .schema import DataSchema, SparseField, create_dataset, sparse_column
from .textio import (
    DEFAULT_BLOCK_BYTES,
    Where,
    cast_or_fail,
    check_field_counts,
    check_inputs,
    line_blocks,
    progress_bar,
)

# --- Criteo -----------------------------------------------------------------------------

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))
_CRITEO_COLUMNS = ("label", *CRITEO_DENSE, *CRITEO_SPARSE)

# TorchRec's DLRM example hashes every Criteo feature into 100k rows by default; pass
# larger sizes (e.g. 40M, as for Criteo 1TB in MLPerf) for fewer collisions.
DEFAULT_CRITEO_TABLE_SIZE = 100_000

# ASCII byte -> hex digit value, 255 for a non-hex byte.
_HEX_DIGITS = np.full(256, 255, dtype=np.uint8)
_HEX_DIGITS[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16)
_HEX_DIGITS[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)


def criteo_schema(table_size: int | Mapping[str, int] = DEFAULT_CRITEO_TABLE_SIZE) -> DataSchema:
    """The schema of converted Criteo data: 13 dense, 26 multi-hot sparse fields C1..C26.

    Args:
        table_size: one size for every table, or the size of each of C1..C26 by name.
    """
    if isinstance(table_size, Mapping):
        missing = sorted(set(CRITEO_SPARSE) - set(table_size), key=CRITEO_SPARSE.index)
        unknown = sorted(set(table_size) - set(CRITEO_SPARSE))
        if missing or unknown:
            raise InputError(
                f"Criteo table sizes must name exactly C1..C26 (missing {missing}, "
                f"unknown {unknown})"
            )
        sizes = dict(table_size)
    else:
        sizes = dict.fromkeys(CRITEO_SPARSE, table_size)
    return DataSchema(
        dense=CRITEO_DENSE,
        sparse=tuple(SparseField(name, sizes[name], multi_hot=True) for name in CRITEO_SPARSE),
    )


def convert_criteo(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    table_size: int | Mapping[str, int] = DEFAULT_CRITEO_TABLE_SIZE,
    max_rows: int | None = None,
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = True,
) -> Path:
    """Converts raw Criteo TSV (Kaggle / Terabyte layout, optionally ``.gz``) to a dataset.

    Each line is ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer counts and 26
    categorical values (hex strings); any field but the label may be empty.

    * Dense: empty -> 0, value ``x`` -> ``log(1 + max(x, 0))`` (counts are heavy-tailed; the
      few negative values in Criteo are clipped).
    * Sparse: a hex value ``h`` -> ``int(h, 16) % table_size`` (the reference DLRM
      preprocessing); a value that is not 1 to 16 hex digits -> its 64-bit BLAKE2b hash
      modulo the table size. An empty value is an empty bag, so the sparse columns are
      multi-hot with bags of 0 or 1 id.

    Args:
        inputs: the TSV files, concatenated in this order.
        out_dir: the dataset folder to create.
        table_size: rows of every table, or of each of C1..C26 by name.
        max_rows: stop after this many rows.
        overwrite: replace an existing ``out_dir``.
        block_bytes: bytes of text parsed at a time (bounds memory).
        progress: show a progress bar (on a terminal).

    Returns:
        ``out_dir``.

    Raises:
        InputError: a malformed line (wrong number of fields, non-integer dense value, label
            not 0/1), naming the file and line; ``out_dir`` exists or holds an input.

    Example::

        convert_criteo(["day_0.gz"], "data/criteo_day0", table_size=1_000_000)
    """
    out_dir = Path(out_dir)
    paths = check_inputs(inputs, out_dir)
    schema = criteo_schema(table_size)
    if max_rows is not None and max_rows <= 0:
        raise InputError(f"max_rows must be positive, got {max_rows}")
    with (
        create_dataset(schema, out_dir, overwrite=overwrite) as writer,
        progress_bar(paths, "criteo", progress) as bar,
    ):
        for path in paths:
            for first_line, block in line_blocks(path, bar, block_bytes=block_bytes):
                table = _parse_criteo_block(block, Where(path, first_line), schema)
                if max_rows is not None:
                    table = table.slice(0, max_rows - writer.num_rows)
                writer.write(table, source=str(path))
                if writer.num_rows == max_rows:
                    return out_dir
        if writer.num_rows == 0:
            raise InputError(f"{', '.join(map(str, paths))}: no data lines")
    return out_dir


def _parse_criteo_block(block: bytes, where: Where, schema: DataSchema) -> pa.Table:
    check_field_counts(block, len(_CRITEO_COLUMNS), where)
    raw = pa_csv.read_csv(
        pa.py_buffer(block),
        read_options=pa_csv.ReadOptions(column_names=_CRITEO_COLUMNS),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(_CRITEO_COLUMNS, pa.string()),
            # only an empty field is missing: "NA" or "null" are values like any other
            strings_can_be_null=True,
            null_values=[""],
        ),
    )
    columns = {"label": _criteo_labels(raw.column("label").combine_chunks(), where)}
    for name in CRITEO_DENSE:
        columns[name] = _log_counts(raw.column(name).combine_chunks(), name, where)
    for field in schema.sparse:
        values = raw.column(field.name).combine_chunks()
        ids = _hash_categorical(pc.drop_null(values)) % np.uint64(field.num_embeddings)
        present = values.is_valid().to_numpy(zero_copy_only=False)
        columns[field.name] = sparse_column(ids.astype(np.int64), present, multi_hot=True)
    return pa.table(columns)


def _criteo_labels(strings: pa.Array, where: Where) -> pa.Array:
    valid = pc.fill_null(pc.is_in(strings, value_set=pa.array(["0", "1"])), False)
    if not pc.all(valid).as_py():
        row = pc.index(valid, False).as_py()
        raise where.error(row, f"label must be 0 or 1, got {strings[row].as_py()!r}")
    return pc.cast(strings, pa.int8())


def _log_counts(strings: pa.Array, name: str, where: Where) -> np.ndarray:
    """``log(1 + max(x, 0))`` of integer strings ``x``, 0 for a missing one."""

    def bad(row: int) -> InputError:
        return where.error(row, f"{name} must be an integer, got {strings[row].as_py()!r}")

    counts = pc.fill_null(cast_or_fail(strings, pa.int64(), bad), 0).to_numpy()
    return np.log1p(np.maximum(counts, 0)).astype(np.float32)


def _hash_categorical(values: pa.StringArray) -> np.ndarray:
    """Stable uint64 hash of each string: its value if hex (1-16 digits), else BLAKE2b."""
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset :][: n + 1]
    text = np.frombuffer(values.buffers()[2] or b"", dtype=np.uint8)
    lengths = np.diff(offsets)
    hashed = np.zeros(n, dtype=np.uint64)
    is_hex = (lengths >= 1) & (lengths <= 16)
    # Horner's rule over character positions: one vectorised step per digit, not per row.
    for j in range(min(int(lengths.max()), 16)):
        rows = np.flatnonzero(lengths > j)
        digits = _HEX_DIGITS[text[offsets[rows] + j]]
        is_hex[rows] &= digits != 255
        hashed[rows] = hashed[rows] * np.uint64(16) + digits
    others = np.flatnonzero(~is_hex)
    if others.size:  # rare in Criteo: hashed one by one
        strings = values.take(pa.array(others)).to_pylist()
        hashed[others] = [_blake2b64(s) for s in strings]
    return hashed


def _blake2b64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


# --- libFM / libSVM ---------------------------------------------------------------------

# Frappe (Baltrunas et al. 2015) as distributed in libFM format by He & Chua (2017).
FRAPPE_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("user", 0, 956),
    ("item", 957, 5038),
    ("daytime", 5039, 5045),
    ("weekday", 5046, 5052),
    ("isweekend", 5053, 5054),
    ("homework", 5055, 5057),
    ("cost", 5058, 5059),
    ("weather", 5060, 5068),
    ("country", 5069, 5148),
    ("city", 5149, 5381),
)


def parse_fields(spec: str) -> list[tuple[str, int, int]]:
    """Parses ``name:first-last,name:first-last,...`` (inclusive id ranges).

    Example::

        assert parse_fields("user:0-9,item:10-19") == [("user", 0, 9), ("item", 10, 19)]
    """
    fields = []
    for item in spec.split(","):
        name, _, ids = item.strip().partition(":")
        first, _, last = ids.partition("-")
        if not (name and first.strip().isdigit() and last.strip().isdigit()):
            raise InputError(f"field {item!r} of {spec!r} is not name:first-last")
        fields.append((name, int(first), int(last)))
    return fields


def _check_fields(fields: Sequence[tuple[str, int, int]]) -> None:
    names = [name for name, _, _ in fields]
    if not fields or len(set(names)) != len(names):
        raise InputError(f"libFM fields must be non-empty with unique names, got {names}")
    ranges = sorted((first, last, name) for name, first, last in fields)
    for first, last, name in ranges:
        if not 0 <= first <= last:
            raise InputError(f"libFM field {name!r}: bad id range {first}-{last}")
    for (_, last, name), (first, _, other) in zip(ranges, ranges[1:]):
        if first <= last:
            raise InputError(f"libFM fields {name!r} and {other!r} have overlapping id ranges")


def convert_libfm(
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    fields: Sequence[tuple[str, int, int]],
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = True,
) -> Path:
    """Converts libFM / libSVM text with binary features to a dataset.

    Each line is ``label id:value id:value ...``: labels -1/1 or 0/1 (-1 -> 0), values 1
    (only binary one-hot features are supported), LF or CRLF line ends. The global id space
    is split into fields by ``fields``: an id in ``[first, last]`` of field ``name`` becomes
    id ``id - first`` of table ``name`` (``last - first + 1`` rows). A row with no id in a
    field gets an empty bag there, with several a bag of several; a field is declared
    multi-hot only if some row has other than exactly one id in it. That needs a first pass
    over the inputs (to decide) before the second one (to write).

    Args:
        inputs: the text files, concatenated in this order.
        out_dir: the dataset folder to create.
        fields: ``(name, first_id, last_id)`` of every field, e.g. :data:`FRAPPE_FIELDS`.
        overwrite: replace an existing ``out_dir``.
        block_bytes: bytes of text parsed at a time (bounds memory).
        progress: show progress bars (on a terminal).

    Returns:
        ``out_dir``.

    Raises:
        InputError: a malformed line (bad label, token not ``id:value``, value not 1, id in
            no field), naming the file and line; ``out_dir`` exists or holds an input.

    Example::

        convert_libfm(["frappe.train.libfm"], "data/frappe_train", fields=FRAPPE_FIELDS)
    """
    out_dir = Path(out_dir)
    paths = check_inputs(inputs, out_dir)
    _check_fields(fields)
    multi_hot = dict.fromkeys((name for name, _, _ in fields), False)
    blocks = functools.partial(_libfm_blocks, paths, fields, block_bytes, progress)
    for _, bags in blocks("libfm (scan)"):
        for name, (_, lengths) in bags.items():
            multi_hot[name] |= bool(np.any(lengths != 1))
    schema = DataSchema(
        dense=(),
        sparse=tuple(SparseField(n, last - first + 1, multi_hot[n]) for n, first, last in fields),
    )
    with create_dataset(schema, out_dir, overwrite=overwrite) as writer:
        for labels, bags in blocks("libfm (write)"):
            columns = {schema.label: labels}
            for field in schema.sparse:
                ids, lengths = bags[field.name]
                columns[field.name] = sparse_column(ids, lengths, field.multi_hot)
            writer.write(pa.table(columns))
        if writer.num_rows == 0:
            raise InputError(f"{', '.join(map(str, paths))}: no data lines")
    return out_dir


_Bags = dict[str, tuple[np.ndarray, np.ndarray]]


def _libfm_blocks(
    paths: Sequence[Path],
    fields: Sequence[tuple[str, int, int]],
    block_bytes: int,
    progress: bool,
    desc: str,
) -> Iterable[tuple[np.ndarray, _Bags]]:
    """Parses every block of ``paths``: (labels (B,) int8, {field: (ids, lengths (B,))})."""
    with progress_bar(paths, desc, progress) as bar:
        for path in paths:
            for first_line, block in line_blocks(path, bar, block_bytes=block_bytes):
                yield _parse_libfm_block(block, Where(path, first_line), fields)


def _parse_libfm_block(
    block: bytes, where: Where, fields: Sequence[tuple[str, int, int]]
) -> tuple[np.ndarray, _Bags]:
    lines = pa.array(block.split(b"\n")[:-1], type=pa.binary()).cast(pa.string())
    lines = pc.utf8_trim_whitespace(lines)  # also drops the \r of CRLF line ends
    blank = np.flatnonzero(pc.equal(lines, "").to_numpy(zero_copy_only=False))
    if blank.size:
        raise where.error(blank[0], "empty line")
    tokens = pc.utf8_split_whitespace(lines)
    labels = _libfm_labels(pc.list_element(tokens, 0), where)
    ids, rows = _libfm_ids(tokens, where)
    return labels, _split_fields(ids, rows, len(lines), fields, where)


def _libfm_ids(tokens: pa.ListArray, where: Where) -> tuple[np.ndarray, np.ndarray]:
    """The ids of the ``id:1`` tokens after each line's label, and the row of each."""
    num_features = pc.list_value_length(tokens).to_numpy() - 1
    rows = np.repeat(np.arange(len(tokens)), num_features)
    features = pc.list_flatten(pc.list_slice(tokens, 1))

    def bad(i: int, problem: str) -> InputError:
        return where.error(rows[i], f"feature {features[i].as_py()!r}: {problem}")

    pairs = pc.split_pattern(features, ":", max_splits=1)
    not_pairs = np.flatnonzero(pc.list_value_length(pairs).to_numpy() != 2)
    if not_pairs.size:
        raise bad(not_pairs[0], "not id:value")
    ids = cast_or_fail(pc.list_element(pairs, 0), pa.int64(), lambda i: bad(i, "id not an integer"))
    values = cast_or_fail(pc.list_element(pairs, 1), pa.float64(), lambda i: bad(i, "value not a number"))
    not_one = np.flatnonzero(values.to_numpy() != 1)
    if not_one.size:
        raise bad(not_one[0], "only binary features (value 1) are supported")
    return ids.to_numpy(), rows


def _split_fields(
    ids: np.ndarray,
    rows: np.ndarray,
    num_rows: int,
    fields: Sequence[tuple[str, int, int]],
    where: Where,
) -> _Bags:
    """Per field: its ids, made relative to its range, in row order, and its bag sizes."""
    firsts = np.array([first for _, first, _ in fields])
    lasts = np.array([last for _, _, last in fields])
    order = np.argsort(firsts)  # fields may be declared in any order; search them sorted
    position = np.searchsorted(firsts[order], ids, side="right") - 1
    known = (position >= 0) & (ids <= lasts[order][np.maximum(position, 0)])
    if not np.all(known):
        i = np.flatnonzero(~known)[0]
        raise where.error(rows[i], f"feature id {ids[i]} is in no declared field's id range")
    field_of = order[position]
    bags = {}
    for f, (name, first, _) in enumerate(fields):
        mine = field_of == f
        bags[name] = (ids[mine] - first, np.bincount(rows[mine], minlength=num_rows))
    return bags


def _libfm_labels(strings: pa.Array, where: Where) -> np.ndarray:
    positive = pc.is_in(strings, value_set=pa.array(["1", "+1"])).to_numpy(zero_copy_only=False)
    negative = pc.is_in(strings, value_set=pa.array(["0", "-1"])).to_numpy(zero_copy_only=False)
    if not np.all(positive | negative):
        row = np.flatnonzero(~(positive | negative))[0]
        raise where.error(row, f"label must be -1, 0 or 1, got {strings[row].as_py()!r}")
    return positive.astype(np.int8)
