"""Raw Criteo TSV (Kaggle / Terabyte layout, optionally gzip) to the dataset layout.

Each line is ``label \\t I1..I13 \\t C1..C26``: a 0/1 label, 13 integer counts and 26
categorical values (hex strings); any field but the label may be empty. Inputs are
streamed in blocks of whole lines (memory is bounded by ``block_bytes``) and parsed with
Arrow's CSV reader and vectorised ``pyarrow.compute`` / numpy operations. A malformed line
is an :class:`InputError` naming the file and line.

Two ways to give the categorical values table rows:

* :func:`convert_criteo` hashes them (hex value modulo a table size), into one dataset;
* :func:`convert_criteo_vocab` builds a vocabulary per field from the training rows
  (minimum count, cap, out-of-vocabulary row) and splits the rows in file order into
  train / validation / test parts (:mod:`.encode`); :func:`apply_criteo_vocab` maps
  later days with those vocabularies.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ..errors import InputError
from .encode import BlockSource, Fields, RawBlock, apply_vocabularies, convert_with_vocabularies
from .schema import DataSchema, SparseField, create_dataset, sparse_column
from .splits import SplitConfig
from .textio import (
    DEFAULT_BLOCK_BYTES,
    Where,
    cast_or_fail,
    check_field_counts,
    check_inputs,
    line_blocks,
    progress_bar,
)
from .vocab import VocabConfig, load_vocabularies

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

# The end of the error about bytes that are not UTF-8.
_ASCII = "Criteo TSV is ASCII text: the file may be damaged"


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
    blocks = _criteo_blocks(paths, block_bytes, progress, max_rows)
    with create_dataset(schema, out_dir, overwrite=overwrite) as writer:
        for block in blocks("criteo"):
            columns = {"label": block.label, **block.dense}
            for field in schema.sparse:
                bags = block.categorical[field.name]
                ids = _hash_categorical(pc.list_flatten(bags)) % np.uint64(field.num_embeddings)
                lengths = pc.list_value_length(bags).to_numpy()
                columns[field.name] = sparse_column(ids.astype(np.int64), lengths, multi_hot=True)
            writer.write(pa.table(columns), source=block.source)
        if writer.num_rows == 0:
            raise InputError(f"{', '.join(map(str, paths))}: no data lines")
    return out_dir


def convert_criteo_vocab(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    vocab: VocabConfig = VocabConfig(),
    split: SplitConfig = SplitConfig(),
    max_rows: int | None = None,
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = True,
) -> dict[str, Path]:
    """Converts raw Criteo TSV with a vocabulary per field, into train / val / test parts.

    Dense values as :func:`convert_criteo`. Every categorical field C1..C26 gets a
    vocabulary of its values (as written: the hex strings) in the training rows, with the
    out-of-vocabulary row 0, ``vocab.min_count`` and the caps of ``vocab``; an empty value is
    an empty bag. The rows are split in file order (Criteo's files are in time order):
    the last ``split.test_fraction`` are the test part, the ``split.val_fraction`` before
    them the validation part. Writes ``out/train``, ``out/val``, ``out/test`` and
    ``out/vocab.parquet``; three passes over the inputs.

    Args:
        inputs: the TSV files, concatenated in this order.
        out: the folder to create.
        vocab: minimum count and caps of the vocabularies.
        split: validation and test fractions.
        max_rows: use only the first this many rows.
        overwrite: replace an existing ``out``.
        block_bytes: bytes of text parsed at a time (bounds memory).
        progress: show progress bars (on a terminal).

    Returns:
        The dataset folder of each part, by name.

    Example::

        convert_criteo_vocab(["day_0.gz"], "data/criteo", vocab=VocabConfig(min_count=10))
    """
    out = Path(out)
    paths = check_inputs(inputs, out)
    fields = Fields(label="label", dense=CRITEO_DENSE, multi_hot=dict.fromkeys(CRITEO_SPARSE, True))
    info = {"source": {"format": "criteo", "inputs": [str(p) for p in paths], "max_rows": max_rows}}
    return convert_with_vocabularies(
        _criteo_blocks(paths, block_bytes, progress, max_rows), out, fields, split=split,
        vocab=vocab, order_name="rows", info=info, recipe={"format": "criteo"}, overwrite=overwrite,
    )


def apply_criteo_vocab(
    inputs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    vocab_file: str | os.PathLike[str],
    *,
    max_rows: int | None = None,
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = True,
) -> Path:
    """Converts raw Criteo TSV into one dataset ``out`` with the vocabularies of an earlier
    :func:`convert_criteo_vocab` (``vocab_file``, its ``vocab.parquet``): later days get
    the same schema and map values unseen then to the OOV row."""
    out = Path(out)
    paths = check_inputs(inputs, out)
    vocabularies, recipe = load_vocabularies(vocab_file, ("criteo", "Criteo"))
    fields = Fields(label="label", dense=CRITEO_DENSE, multi_hot=dict.fromkeys(CRITEO_SPARSE, True))
    info = {"source": {"format": "criteo", "inputs": [str(p) for p in paths], "max_rows": max_rows},
            "vocabulary": str(Path(vocab_file).resolve())}
    return apply_vocabularies(_criteo_blocks(paths, block_bytes, progress, max_rows), out, fields,
                              vocabularies, info=info, overwrite=overwrite)


def _criteo_blocks(paths: Sequence[Path], block_bytes: int, progress: bool,
                   max_rows: int | None) -> BlockSource:
    """The rows of ``paths`` (the first ``max_rows``), once per call, as :class:`RawBlock` s."""
    if max_rows is not None and max_rows <= 0:
        raise InputError(f"max_rows must be positive, got {max_rows}")

    def blocks(desc: str) -> Iterator[RawBlock]:
        left = max_rows if max_rows is not None else -1
        with progress_bar(paths, f"criteo ({desc})" if desc != "criteo" else desc, progress) as bar:
            for path in paths:
                for first_line, text in line_blocks(path, bar, block_bytes=block_bytes, hint=_ASCII):
                    block = _parse_criteo_block(text, Where(path, first_line))
                    if 0 <= left < block.num_rows:
                        block = block.select(np.arange(block.num_rows) < left)
                    left -= block.num_rows
                    yield block
                    if left == 0:
                        return

    return blocks


def _parse_criteo_block(block: bytes, where: Where) -> RawBlock:
    """A block's labels, log counts, and values as bags of 0 (empty field) or 1 string."""
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
    categorical = {}
    for name in CRITEO_SPARSE:
        values = raw.column(name).combine_chunks()
        offsets = np.zeros(len(values) + 1, dtype=np.int32)
        np.cumsum(values.is_valid().to_numpy(zero_copy_only=False), out=offsets[1:])
        categorical[name] = pa.ListArray.from_arrays(pa.array(offsets), pc.drop_null(values))
    return RawBlock(
        source=str(where.path),
        label=_criteo_labels(raw.column("label").combine_chunks(), where),
        dense={name: _log_counts(raw.column(name).combine_chunks(), name, where) for name in CRITEO_DENSE},
        categorical=categorical,
    )


def _criteo_labels(strings: pa.Array, where: Where) -> np.ndarray:
    valid = pc.fill_null(pc.is_in(strings, value_set=pa.array(["0", "1"])), False)
    if not pc.all(valid).as_py():
        row = pc.index(valid, False).as_py()
        raise where.error(row, f"label must be 0 or 1, got {strings[row].as_py()!r}")
    return pc.cast(strings, pa.int8()).to_numpy()


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


