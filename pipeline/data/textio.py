"""Reading raw text inputs for the converters: blocks of whole lines, gzip, encodings.

Every converter reads its inputs through :func:`line_blocks` (or :func:`read_bytes` for
small side files), so damaged input is reported the same way everywhere, as one
:class:`InputError` line naming the file (and the line, where there is one):

* gzip is recognised by its magic bytes (whatever the file is called) and decompressed
  on the fly; a stream cut short, a bad CRC or corrupt deflate data is an error;
* text must be in the declared encoding (UTF-8 unless a converter says otherwise): a byte
  sequence that does not decode names its line, and UTF-16/32 text (NUL bytes) is
  recognised and refused with the way out.
"""

from __future__ import annotations

import codecs
import gzip
import os
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from ..errors import InputError

DEFAULT_BLOCK_BYTES = 1 << 25
GZIP_MAGIC = b"\x1f\x8b"
# What Python's gzip and zlib raise on a damaged stream.
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


class Where:
    """Makes :class:`InputError` s that name a file and the line of a block's row."""

    def __init__(self, path: Path, first_line: int) -> None:
        self.path, self.first_line = path, first_line

    def error(self, row: int, problem: str) -> InputError:
        return InputError(f"{self.path}:{self.first_line + int(row)}: {problem}")


def check_inputs(inputs: Sequence[str | os.PathLike[str]], out_dir: Path) -> list[Path]:
    """The inputs as paths; refuses missing inputs and an output that would clobber one."""
    if not inputs:
        raise InputError("no input files given")
    paths = [Path(p) for p in inputs]
    out = out_dir.resolve()
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: input file not found")
        if out == path.resolve() or out in path.resolve().parents:
            raise InputError(f"{out_dir}: the output folder would contain the input {path}")
    return paths


def is_gzip(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _gzip_error(path: Path, e: BaseException) -> InputError:
    return InputError(f"{path}: damaged gzip data ({e}); the file is truncated or corrupt")


def _read(path: Path, stream: BinaryIO, size: int) -> bytes:
    try:
        return stream.read(size)
    except _GZIP_ERRORS as e:
        raise _gzip_error(path, e) from None


ENCODING_HINT = "pass --encoding (e.g. latin-1)"


def line_blocks(
    path: Path,
    bar: tqdm,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    encoding: str = "utf-8",
    hint: str = ENCODING_HINT,
) -> Iterator[tuple[int, bytes]]:
    """Yields ``(number of the first line, block)``: whole lines in UTF-8, each ending with ``\\n``.

    A gzip file is decompressed on the fly; text in another ``encoding`` is transcoded
    to UTF-8 (it must be ASCII-compatible: UTF-16/32 is refused). ``bar`` advances by
    bytes read of ``path``; ``hint`` ends the error of text not in ``encoding``.

    Raises:
        InputError: damaged gzip data, or text that is not in ``encoding`` (naming the line).
    """
    line, carry, done = 1, b"", 0
    with open(path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if is_gzip(path) else raw
        while data := _read(path, stream, block_bytes):
            bar.update(raw.tell() - done)
            done = raw.tell()
            data = carry + data
            cut = data.rfind(b"\n") + 1
            block, carry = data[:cut], data[cut:]
            if block:
                yield line, decode_block(block, Where(path, line), encoding, hint)
                line += block.count(b"\n")
    if carry:  # a last line without its newline
        yield line, decode_block(carry + b"\n", Where(path, line), encoding, hint)


def read_bytes(path: Path, encoding: str = "utf-8", hint: str = ENCODING_HINT) -> bytes:
    """The whole text of ``path`` (gzip or not) as UTF-8, checked as :func:`line_blocks` does."""
    with tqdm(disable=True) as bar:
        return b"".join(block for _, block in line_blocks(path, bar, encoding=encoding, hint=hint))


def decode_block(block: bytes, where: Where, encoding: str, hint: str = ENCODING_HINT) -> bytes:
    """``block`` (whole lines in ``encoding``) as UTF-8; an error names the first bad line."""
    if b"\x00" in block:
        row = block.count(b"\n", 0, block.index(b"\x00"))
        raise where.error(
            row, "NUL bytes: this looks like UTF-16 or UTF-32 text (or binary data); convert "
            "it to UTF-8 first, e.g. `iconv -f UTF-16 -t UTF-8`"
        )
    try:
        text = block.decode(encoding)
    except UnicodeDecodeError as e:
        row = block.count(b"\n", 0, e.start)
        bad = block[e.start : e.start + 4]
        raise where.error(row, f"not valid {encoding} text (bytes {bad!r}); {hint}") from None
    except LookupError:
        raise InputError(f"unknown text encoding {encoding!r}") from None
    return block if codecs.lookup(encoding).name == "utf-8" else text.encode("utf-8")


def progress_bar(paths: Sequence[Path], desc: str, show: bool) -> tqdm:
    """A bar over the bytes of ``paths``; shown on a terminal only (``disable=None``)."""
    total = sum(p.stat().st_size for p in paths)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if show else True)


def cast_or_fail(
    strings: pa.Array, to_type: pa.DataType, fail: Callable[[int], InputError]
) -> pa.Array:
    """``strings`` cast to ``to_type``; else ``fail(index of the first bad string)``."""
    try:
        return pc.cast(strings, to_type)
    except pa.ArrowInvalid:
        pass
    # Arrow does not say which string failed: bisect for the first one.
    lo, hi = 0, len(strings)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(strings.slice(lo, mid - lo), to_type)
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    raise fail(lo)


def check_field_counts(
    block: bytes, expected: int, where: Where, delimiter: bytes = b"\t", name: str = "tab"
) -> None:
    """Vectorised check that every line of ``block`` has ``expected`` fields.

    Only for formats without quoting: every ``delimiter`` byte separates two fields.
    ``name`` names the delimiter in the error.
    """
    text = np.frombuffer(block, dtype=np.uint8)
    separators = np.flatnonzero(text == delimiter[0])
    separators_before_eol = np.searchsorted(separators, np.flatnonzero(text == ord("\n")))
    fields = np.diff(separators_before_eol, prepend=0) + 1
    bad = np.flatnonzero(fields != expected)
    if bad.size:
        row = bad[0]
        raise where.error(row, f"expected {expected} {name}-separated fields, got {fields[row]}")


def split_bags(strings: pa.Array, separator: str) -> pa.ListArray:
    """Each string split at ``separator`` into a bag (``list<string>``) of its values.

    Values are stripped of surrounding white space; empty values are dropped, so an
    empty string (or a null) is an empty bag.
    """
    lists = pc.split_pattern(strings, separator)
    values = pc.utf8_trim_whitespace(pc.list_flatten(lists))
    rows = pc.list_parent_indices(lists).to_numpy()
    keep = pc.not_equal(values, "").to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(strings) + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows[keep], minlength=len(strings)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(pa.array(keep)))
