"""Reading delimited text (CSV, TSV, ...) in blocks with Arrow's CSV reader.

Files are read in blocks of whole lines (:func:`~.textio.line_blocks`: gzip, encodings),
and each block is parsed by ``pyarrow.csv.read_csv`` with every column as a string, so
that errors can name the file and line: a record is one line (quoted fields may hold the
delimiter, not a line break). An empty field is the empty string.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm import tqdm

from ..errors import InputError
from .textio import DEFAULT_BLOCK_BYTES, Where, line_blocks


@dataclass(frozen=True)
class CsvFormat:
    """How a delimited file is laid out.

    Args:
        delimiter: the one-character field separator (``","``, ``"\\t"``, ...).
        header: the first line of every file names the columns.
        names: the column names, for files without a header (or to rename the
            header's); ``None``: the header's.
        quote_char: the quoting character, ``None`` for none.
        encoding: the text encoding (any ASCII-compatible codec Python knows).
    """

    delimiter: str = ","
    header: bool = True
    names: tuple[str, ...] | None = None
    quote_char: str | None = '"'
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        if len(self.delimiter) != 1 or self.delimiter in "\r\n":
            raise InputError(f"the delimiter must be one character, got {self.delimiter!r}")
        if self.quote_char is not None and len(self.quote_char) != 1:
            raise InputError(f"the quote character must be one character, got {self.quote_char!r}")
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
        if not self.header and not self.names:
            raise InputError("a file without a header needs its column names (--names)")


@dataclass(frozen=True)
class CsvBlock:
    """One block's rows: string columns, and where its first row is."""

    where: Where
    table: pa.Table


class CsvReader:
    """Reads the columns ``columns`` of delimited files, block by block.

    Args:
        paths: the files, read in order; with a header, all must have the same one.
        fmt: their layout.
        block_bytes: bytes of text parsed at a time (bounds memory).

    Attributes:
        names: the columns of the files.
    """

    def __init__(self, paths: Sequence[Path], fmt: CsvFormat, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self.paths, self.fmt, self.block_bytes = list(paths), fmt, block_bytes
        self.names = fmt.names or self._header(self.paths[0])
        duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
        if duplicates:
            raise InputError(f"{self.paths[0]}: duplicate column names {duplicates}")

    def _header(self, path: Path) -> tuple[str, ...]:
        with tqdm(disable=True) as bar:
            for _, block in line_blocks(path, bar, block_bytes=1 << 16, encoding=self.fmt.encoding):
                first = block[: block.index(b"\n") + 1]
                table = pa_csv.read_csv(pa.py_buffer(first), read_options=pa_csv.ReadOptions(
                    autogenerate_column_names=True), parse_options=self._parse_options(),
                    convert_options=pa_csv.ConvertOptions(strings_can_be_null=False))
                names = tuple(str(table.column(i)[0]).strip() for i in range(table.num_columns))
                if any(not n for n in names):
                    raise InputError(f"{path}:1: the header has an empty column name")
                return names
        raise InputError(f"{path}: empty file (no header line)")

    def _parse_options(self, invalid=None) -> pa_csv.ParseOptions:
        return pa_csv.ParseOptions(
            delimiter=self.fmt.delimiter,
            quote_char=self.fmt.quote_char if self.fmt.quote_char is not None else False,
            ignore_empty_lines=False,
            invalid_row_handler=invalid,
        )

    def check_columns(self, wanted: Sequence[str], what: str = "named") -> None:
        """Refuses ``wanted`` columns that the files do not have."""
        missing = [c for c in wanted if c not in self.names]
        if missing:
            raise InputError(f"{self.paths[0]}: no column(s) {missing} (it has {list(self.names)}); "
                             f"{what}")

    def blocks(self, columns: Sequence[str], bar: tqdm) -> Iterator[CsvBlock]:
        """The string columns ``columns`` of every block of every file."""
        for path in self.paths:
            first_block = True
            for first_line, block in line_blocks(path, bar, block_bytes=self.block_bytes,
                                                 encoding=self.fmt.encoding):
                if first_block and self.fmt.header:
                    cut = block.index(b"\n") + 1
                    self._check_header(path, block[:cut])
                    block, first_line = block[cut:], first_line + 1
                first_block = False
                if block:
                    where = Where(path, first_line)
                    yield CsvBlock(where, self._parse(block, columns, where))

    def _check_header(self, path: Path, line: bytes) -> None:
        if self.fmt.names is None and path != self.paths[0] and self._header_of(line) != self.names:
            raise InputError(f"{path}:1: its header differs from that of {self.paths[0]}")

    def _header_of(self, line: bytes) -> tuple[str, ...]:
        table = pa_csv.read_csv(pa.py_buffer(line), read_options=pa_csv.ReadOptions(
            autogenerate_column_names=True), parse_options=self._parse_options())
        return tuple(str(table.column(i)[0]).strip() for i in range(table.num_columns))

    def _parse(self, block: bytes, columns: Sequence[str], where: Where) -> pa.Table:
        invalid: list = []

        def handler(row) -> str:
            invalid.append(row)
            return "skip"

        table = pa_csv.read_csv(
            pa.py_buffer(block),
            read_options=pa_csv.ReadOptions(column_names=list(self.names), block_size=1 << 24),
            parse_options=self._parse_options(handler),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.string()),
                include_columns=list(columns),
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        if invalid:
            row = invalid[0]
            at = block.find(row.text.encode()) if row.text else -1
            line = block.count(b"\n", 0, at) if at >= 0 else 0
            raise where.error(line, f"expected {row.expected_columns} fields, got {row.actual_columns}")
        return table
