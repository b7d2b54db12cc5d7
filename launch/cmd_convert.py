"""Convert raw Criteo TSV or libFM/libSVM text to afmrec's Parquet dataset layout.

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

Examples:
  afmrec convert criteo --out data/criteo --table-size 1000000 day_0.gz day_1.gz
  afmrec convert libfm --out data/frappe_train --preset frappe frappe.train.libfm
  afmrec convert libfm --out data/mine --fields user:0-99,item:100-599 mine.libfm
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
    parse_fields,
)
from .args import add_output, setup_logging

HELP = "convert raw Criteo TSV or libFM/libSVM text to the Parquet layout"

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


def run(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    common = dict(overwrite=args.overwrite, progress=not args.quiet)
    if args.format == "criteo":
        out = convert_criteo(
            args.inputs, args.out, table_size=args.table_size, max_rows=args.max_rows, **common
        )
    else:
        fields = parse_fields(args.fields) if args.fields else PRESETS[args.preset]
        out = convert_libfm(args.inputs, args.out, fields=fields, **common)
    print(describe_dataset(out))
    return 0
