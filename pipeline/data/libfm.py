"""libFM / libSVM text with binary features to the dataset layout.

Each line is ``label id:value id:value ...``; one global id space is split into fields by
declared id ranges (:func:`parse_fields`), by a ``field:value<TAB>id`` index file
(:func:`read_feature_index`), or by a preset (:data:`FRAPPE_FIELDS`). Inputs are streamed
in blocks of whole lines; a malformed line is an :class:`InputError` naming file and line.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterable, Sequence

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
    read_bytes,
)

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

# The end of the error about bytes that are not UTF-8.
_ASCII = "libFM text is ASCII: the file may be damaged"


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


def read_feature_index(path: str | os.PathLike[str]) -> list[tuple[str, int, int]]:
    """The fields of a libFM feature index: lines ``field:value<TAB>id``.

    Such a file (written by most libFM exporters) names the feature behind every global
    id; the field is what comes before the first ``:``. Each field's id range is
    ``[min id, max id]`` of its lines; fields come in the order of their first ids, and
    their ranges must not overlap.

    Raises:
        InputError: a malformed line (naming the file and line), overlapping fields.

    Example::

        # index.txt:  user:alice<TAB>0  user:bob<TAB>1  item:42<TAB>2
        assert read_feature_index("index.txt") == [("user", 0, 1), ("item", 2, 2)]
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: feature index not found")
    text = read_bytes(path)
    where = Where(path, 1)
    check_field_counts(text, 2, where)
    table = pa_csv.read_csv(
        pa.py_buffer(text),
        read_options=pa_csv.ReadOptions(column_names=["feature", "id"]),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, ignore_empty_lines=False),
        convert_options=pa_csv.ConvertOptions(column_types={"feature": pa.string(), "id": pa.string()},
                                              strings_can_be_null=False),
    )
    if table.num_rows == 0:
        raise InputError(f"{path}: empty feature index")
    features = table.column("feature").combine_chunks()
    parts = pc.split_pattern(features, ":", max_splits=1)
    names = pc.list_element(parts, 0)
    bad = np.flatnonzero(((pc.list_value_length(parts).to_numpy() != 2)
                          | pc.equal(names, "").to_numpy(zero_copy_only=False)))
    if bad.size:
        raise where.error(bad[0], f"{features[bad[0]].as_py()!r} is not field:value")
    ids_text = pc.utf8_trim_whitespace(table.column("id").combine_chunks())
    ids = cast_or_fail(ids_text, pa.int64(), lambda row: where.error(
        row, f"id must be an integer, got {ids_text[row].as_py()!r}")).to_numpy()
    ranges = pa.table({"name": names, "id": ids}).group_by("name").aggregate([("id", "min"), ("id", "max")])
    fields = sorted(zip(ranges.column("id_min").to_pylist(), ranges.column("id_max").to_pylist(),
                        ranges.column("name").to_pylist()))
    out = [(name, first, last) for first, last, name in fields]
    try:
        _check_fields(out)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    return out


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
            for first_line, block in line_blocks(path, bar, block_bytes=block_bytes, hint=_ASCII):
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
