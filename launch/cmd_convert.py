"""Convert raw Criteo TSV, libFM/libSVM text or MovieLens-1M to afmrec's Parquet dataset layout.

Writes OUT as a folder of Parquet parts whose metadata declares the schema (label, dense
and sparse columns, each table's size), plus a _dataset.json summary. OUT appears only
once complete and is never overwritten unless --overwrite; a malformed line stops the
conversion with its file and line number.

criteo: lines of a 0/1 label, 13 integer counts I1..I13 and 26 hex categorical values
C1..C26, tab-separated, any but the label possibly empty (.gz files are read as they are).
A count x becomes log(1 + max(x, 0)), an empty one 0; a categorical value h becomes
int(h, 16) modulo --table-size, an empty one an empty bag.

libfm: lines of "label id:1 id:1 ...", labels -1/1 or 0/1. One global id space is split
into fields by --fields (or a --preset): field NAME:FIRST-LAST gets a table of
LAST-FIRST+1 rows, and id i of the range becomes row i-FIRST.

movielens: the MovieLens-1M folder (ratings.dat[.gz], users.dat, movies.dat). Ratings of 3
are dropped, 1-2 give label 0 and 4-5 label 1; the fields are user_id, movie_id, gender,
age, occupation, zip and the movie's genres (multi-hot). Rows are split by time (the last
--test-fraction test, the --val-fraction before it validation) into OUT/train, OUT/val and
OUT/test; every field's vocabulary is built from OUT/train only (row 0: out of vocabulary)
and saved as OUT/vocab.parquet.

Examples:
  afmrec convert criteo --out data/criteo --table-size 1000000 day_0.gz day_1.gz
  afmrec convert libfm --out data/frappe_train --preset frappe frappe.train.libfm
  afmrec convert libfm --out data/mine --fields user:0-99,item:100-599 mine.libfm
  afmrec convert movielens --out data/ml1m ../shared/data/movielens1m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pipeline.data import (
    DEFAULT_CRITEO_TABLE_SIZE,
    FRAPPE_FIELDS,
    convert_criteo,
    convert_libfm,
    describe_dataset,
    SplitConfig,
    VocabConfig,
    convert_movielens,
    parse_fields,
)
from .args import add_output, setup_logging

HELP = "convert raw Criteo TSV, libFM/libSVM text or MovieLens to the Parquet layout"

PRESETS = {"frappe": FRAPPE_FIELDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)

    criteo = formats.add_parser("criteo", help="raw Criteo TSV (Kaggle or Terabyte layout)")
    criteo.add_argument(
        "--table-size",
        type=int,
        default=DEFAULT_CRITEO_TABLE_SIZE,
        help="rows of every table, values are hashed modulo it (default: %(default)s)",
    )
    criteo.add_argument("--max-rows", type=int, help="stop after this many rows")

    libfm = formats.add_parser("libfm", help="libFM / libSVM text with binary features")
    fields = libfm.add_mutually_exclusive_group(required=True)
    fields.add_argument("--fields", metavar="NAME:FIRST-LAST,...", help="id range of each field")
    fields.add_argument("--preset", choices=sorted(PRESETS), help="the fields of a known dataset")

    for sub in (criteo, libfm):
        add_output(sub, "the dataset folder")
        sub.add_argument(
            "inputs", nargs="+", type=Path, metavar="INPUT", help="text files, read in order"
        )

    movielens = formats.add_parser("movielens", help="MovieLens-1M: ratings + users + movies")
    add_output(movielens, "the folder of train/, val/, test/ and vocab.parquet")
    add_split_options(movielens)
    add_vocab_options(movielens)
    movielens.add_argument("src", type=Path, metavar="SRC_DIR", help="the MovieLens-1M folder")


def add_split_options(parser: argparse.ArgumentParser) -> None:
    """--val-fraction / --test-fraction: the split into train/, val/ and test/."""
    g = parser.add_argument_group("split (the last rows in time order)")
    g.add_argument("--val-fraction", type=float, default=SplitConfig.val_fraction,
                   help="validation rows, just before the test rows (default: %(default)s)")
    g.add_argument("--test-fraction", type=float, default=SplitConfig.test_fraction,
                   help="test rows, the last ones (default: %(default)s)")


def add_vocab_options(parser: argparse.ArgumentParser) -> None:
    """--min-count / --max-table-size: how every field's vocabulary is built."""
    g = parser.add_argument_group("vocabularies (built from the training rows only)")
    g.add_argument("--min-count", type=int, default=VocabConfig.min_count,
                   help="values seen fewer times go to the out-of-vocabulary row 0 "
                   "(default: %(default)s)")
    g.add_argument("--max-table-size", type=int, metavar="N",
                   help="at most N rows per table, the OOV row included: the N-1 most frequent "
                   "values keep a row (default: no cap)")


def split_config(args: argparse.Namespace) -> SplitConfig:
    return SplitConfig(val_fraction=args.val_fraction, test_fraction=args.test_fraction)


def vocab_config(args: argparse.Namespace) -> VocabConfig:
    return VocabConfig(min_count=args.min_count, max_size=args.max_table_size)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    common = dict(overwrite=args.overwrite, progress=not args.quiet)
    if args.format == "movielens":
        parts = convert_movielens(args.src, args.out, split=split_config(args),
                                  vocab=vocab_config(args), **common)
        for path in parts.values():
            print(describe_dataset(path))
        return 0
    if args.format == "criteo":
        out = convert_criteo(
            args.inputs, args.out, table_size=args.table_size, max_rows=args.max_rows, **common
        )
    else:
        fields = parse_fields(args.fields) if args.fields else PRESETS[args.preset]
        out = convert_libfm(args.inputs, args.out, fields=fields, **common)
    print(describe_dataset(out))
    return 0
