"""Convert raw Criteo TSV or libFM/libSVM text to afmrec's Parquet dataset layout.

Writes OUT as a folder of Parquet parts whose metadata declares the schema (label, dense
and sparse columns, each table's size), plus a dataset.json summary. The output appears
only once complete, never overwrites OUT unless --overwrite, and a malformed line stops
the conversion with its file and line number.

criteo: lines of label, 13 integer counts I1..I13 and 26 hex categorical values C1..C26,
tab-separated (.gz files are read as they are). Counts x become log(1 + max(x, 0)), empty
ones 0; a categorical value h becomes int(h, 16) modulo --table-size, an empty one an
empty bag.

libfm: lines of "label id:1 id:1 ...", labels -1/1 or 0/1. One global id space is split
into fields by --fields (or a --preset), each field's ids becoming rows 0.. of its table.

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

HELP = "convert raw Criteo TSV or libFM/libSVM text to the Parquet layout"

PRESETS = {"frappe": FRAPPE_FIELDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)

    criteo = formats.add_parser("criteo", help="raw Criteo TSV (Kaggle or Terabyte layout)")
    criteo.add_argument(
        "--table-size",
        type=int,
        default=DEFAULT_CRITEO_TABLE_SIZE,
        help="rows of every table; categorical values are hashed modulo it (default: %(default)s)",
    )
    criteo.add_argument("--max-rows", type=int, help="stop after this many rows")

    libfm = formats.add_parser("libfm", help="libFM / libSVM text with binary features")
    fields = libfm.add_mutually_exclusive_group(required=True)
    fields.add_argument(
        "--fields", type=parse_fields, metavar="NAME:FIRST-LAST,...", help="id range of each field"
    )
    fields.add_argument("--preset", choices=sorted(PRESETS), help="the fields of a known dataset")

    for sub in (criteo, libfm):
        sub.add_argument("--out", type=Path, required=True, help="dataset folder to create")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        sub.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="text files, in order")


def run(args: argparse.Namespace) -> int:
    if args.format == "criteo":
        out = convert_criteo(
            args.inputs,
            args.out,
            table_size=args.table_size,
            max_rows=args.max_rows,
            overwrite=args.overwrite,
        )
    else:
        out = convert_libfm(
            args.inputs,
            args.out,
            fields=args.fields or PRESETS[args.preset],
            overwrite=args.overwrite,
        )
    print(describe_dataset(out))
    return 0
