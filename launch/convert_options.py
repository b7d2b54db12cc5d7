"""Options of ``afmrec convert``: splits, vocabularies, and the layout and columns of CSV."""

from __future__ import annotations

import argparse
from pathlib import Path

from afmrec.pipeline.data import CsvColumns, CsvFormat, SplitConfig, VocabConfig
from afmrec.pipeline.errors import InputError


def names(text: str) -> tuple[str, ...]:
    """``a,b,c`` -> ``("a", "b", "c")``."""
    out = tuple(n.strip() for n in text.split(","))
    if not all(out):
        raise argparse.ArgumentTypeError(f"empty column name in {text!r}")
    return out


def add_split_options(parser: argparse.ArgumentParser, order: str) -> None:
    """--val-fraction / --test-fraction: the split into train/, val/ and test/."""
    g = parser.add_argument_group(f"split (the last rows in {order})")
    g.add_argument("--val-fraction", type=float, default=SplitConfig.val_fraction,
                   help="validation rows, just before the test rows (default: %(default)s)")
    g.add_argument("--test-fraction", type=float, default=SplitConfig.test_fraction,
                   help="test rows, the last ones (default: %(default)s)")


def add_vocab_options(parser: argparse.ArgumentParser, apply: bool = False) -> None:
    """--min-count / --max-table-size (and --vocab): how the vocabularies are built."""
    g = parser.add_argument_group("vocabularies (built from the training rows only)")
    g.add_argument("--min-count", type=int, default=VocabConfig.min_count,
                   help="values seen fewer times go to the out-of-vocabulary row 0 "
                   "(default: %(default)s)")
    g.add_argument("--max-table-size", action="append", default=[], metavar="N|FIELD=N",
                   help="at most N rows per table, the OOV row included: the N-1 most "
                   "frequent values keep a row; FIELD=N caps one field (repeat, or join with "
                   "commas; default: no cap)")
    if apply:
        g.add_argument("--vocab", type=Path, metavar="FILE",
                       help="map with the vocabularies (and settings) of an earlier conversion, "
                       "its OUT/vocab.parquet, into one dataset OUT (test data, later days)")


def split_config(args: argparse.Namespace) -> SplitConfig:
    return SplitConfig(val_fraction=args.val_fraction, test_fraction=args.test_fraction)


def vocab_config(args: argparse.Namespace) -> VocabConfig:
    """``--min-count`` and ``--max-table-size`` as a :class:`VocabConfig`."""
    cap, fields = None, []
    for item in (i.strip() for spec in args.max_table_size for i in spec.split(",")):
        name, _, size = item.rpartition("=")
        if not size.strip().isdigit():
            raise InputError(f"--max-table-size {item!r}: expected N or FIELD=N")
        if name:
            fields.append((name.strip(), int(size)))
        else:
            cap = int(size)
    return VocabConfig(min_count=args.min_count, max_size=cap, field_max_sizes=tuple(fields))


def add_csv_options(parser: argparse.ArgumentParser) -> None:
    """The layout (--delimiter, --no-header, --names, ...) and column roles of a CSV file."""
    f = parser.add_argument_group("file layout")
    f.add_argument("--delimiter", help="field separator: one character, or tab (default: tab "
                   "for .tsv files, else a comma)")
    f.add_argument("--no-header", action="store_true", help="the files have no header line (give --names)")
    f.add_argument("--names", type=names, metavar="A,B,...", help="column names, in file order "
                   "(with a header: instead of its names)")
    f.add_argument("--encoding", default="utf-8", help="text encoding, e.g. latin-1 (default: %(default)s)")
    f.add_argument("--no-quote", action="store_true", help='the files do not quote fields with "')
    c = parser.add_argument_group("columns (every column gets one role)")
    c.add_argument("--label", help="the label column: 0 or 1")
    c.add_argument("--categorical", type=names, metavar="A,B,...",
                   help="categorical columns (default: every column given no other role)")
    c.add_argument("--dense", type=names, default=(), metavar="A,B,...", help="numeric columns")
    c.add_argument("--log-dense", action="store_true", help="dense values become log(1 + max(x, 0))")
    c.add_argument("--multi-hot", action="append", default=[], metavar="COL:SEP",
                   help="a column of values joined by SEP, e.g. genres:| (repeat for several)")
    c.add_argument("--drop", type=names, default=(), metavar="A,B,...", help="columns to leave out")
    c.add_argument("--time-column", metavar="COL", help="split by this column's order (numbers or "
                   "ISO dates) instead of the files' row order; a feature only if also named "
                   "in --categorical or --dense")


def csv_format(args: argparse.Namespace) -> CsvFormat:
    delimiter = args.delimiter
    if delimiter is None:
        tsv = all(".tsv" in Path(p).suffixes for p in args.inputs)
        delimiter = "\t" if tsv else ","
    delimiter = {"tab": "\t", "\\t": "\t", "TAB": "\t"}.get(delimiter, delimiter)
    return CsvFormat(delimiter=delimiter, header=not args.no_header, names=args.names,
                     quote_char=None if args.no_quote else '"', encoding=args.encoding)


_COLUMN_OPTIONS = ("label", "categorical", "dense", "multi_hot", "drop", "time_column", "log_dense")


def csv_columns(args: argparse.Namespace) -> CsvColumns | None:
    """The column roles; ``None`` with --vocab (they come from its file).

    Raises:
        InputError: no --label without --vocab; column options with --vocab.
    """
    if args.vocab is not None:
        given = [f"--{o.replace('_', '-')}" for o in _COLUMN_OPTIONS if getattr(args, o)]
        if given:
            raise InputError(f"--vocab takes the column roles from its file; leave out {', '.join(given)}")
        return None
    if not args.label:
        raise InputError("--label is required (the 0/1 label column)")
    multi_hot = []
    for spec in args.multi_hot:
        column, _, separator = spec.partition(":")
        if not column or not separator:
            raise InputError(f"--multi-hot {spec!r}: expected COL:SEP, e.g. genres:|")
        multi_hot.append((column, separator))
    return CsvColumns(label=args.label, categorical=args.categorical, dense=args.dense,
                      multi_hot=tuple(multi_hot), drop=args.drop, time=args.time_column,
                      log_dense=args.log_dense)
