"""Convert raw data (Criteo TSV, CSV/TSV, libFM/libSVM, MovieLens-1M) to afmrec's Parquet layout.

A dataset is a folder of Parquet parts whose metadata declares the schema (label, dense
and sparse columns, each table's size), plus a _dataset.json summary. Outputs appear only
once complete and are never overwritten unless --overwrite; a malformed line stops the
conversion with its file and line number. Inputs may be gzip-compressed.

With vocabularies (csv, movielens, criteo without --table-size), OUT is a folder of
OUT/train, OUT/val and OUT/test (the last --test-fraction of the rows, in time or file
order, is the test part, the --val-fraction before it validation) and OUT/vocab.parquet:
every field's values in the training rows get table rows 1, 2, ... by decreasing count,
and row 0 is the out-of-vocabulary row (unseen, rarer than --min-count, or beyond the
--max-table-size cap). --vocab OUT/vocab.parquet maps later files the same way, into one
dataset.

criteo: lines of a 0/1 label, 13 integer counts I1..I13 and 26 categorical values C1..C26,
tab-separated, any but the label possibly empty. A count x becomes log(1 + max(x, 0)), an
empty one 0; an empty categorical value an empty bag. --table-size N hashes the values
instead (int(h, 16) modulo N) into one dataset, without vocabularies.

csv: a delimited file with a header (or --names); every column is the --label, --dense,
--multi-hot, --drop, the --time-column, or (by default) categorical.

libfm: lines of "label id:1 id:1 ...", labels -1/1 or 0/1. One global id space is split
into fields by --fields, by a --feature-index file (lines field:value<TAB>id) or by a
--preset: field NAME:FIRST-LAST gets a table of LAST-FIRST+1 rows.

movielens: the MovieLens-1M folder (ratings.dat[.gz], users.dat, movies.dat). Ratings of 3
are dropped, 1-2 give label 0 and 4-5 label 1; the fields are user_id, movie_id, gender,
age, occupation, zip and the movie's genres (multi-hot); split by time.

Examples:
  afmrec convert criteo --out data/criteo --min-count 5 day_0.gz
  afmrec convert criteo --out data/criteo_day1 --vocab data/criteo/vocab.parquet day_1.gz
  afmrec convert criteo --out data/criteo_hashed --table-size 1000000 day_0.gz day_1.gz
  afmrec convert csv --out data/avazu --label click --drop id --time-column hour train.gz
  afmrec convert libfm --out data/frappe_train --preset frappe frappe.train.libfm
  afmrec convert libfm --out data/mine --feature-index mine.index mine.libfm
  afmrec convert movielens --out data/ml1m ../shared/data/movielens1m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pipeline.data import (
    FRAPPE_FIELDS,
    VOCAB_FILE,
    apply_criteo_vocab,
    apply_csv_vocab,
    convert_criteo,
    convert_criteo_vocab,
    convert_csv,
    convert_libfm,
    convert_movielens,
    describe_dataset,
    describe_vocabularies,
    parse_fields,
    read_feature_index,
)
from .args import add_output, setup_logging
from .convert_options import (
    add_csv_options,
    add_split_options,
    add_vocab_options,
    csv_columns,
    csv_format,
    split_config,
    vocab_config,
)

HELP = "convert Criteo TSV, CSV/TSV, libFM/libSVM text or MovieLens to the Parquet layout"

PRESETS = {"frappe": FRAPPE_FIELDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)

    criteo = formats.add_parser("criteo", help="raw Criteo TSV (Kaggle or Terabyte layout)")
    criteo.add_argument("--table-size", type=int, metavar="N",
                        help="hash every value into N rows (int(h, 16) mod N) instead of "
                        "vocabularies, into one dataset")
    criteo.add_argument("--max-rows", type=int, help="use only the first this many rows")
    add_split_options(criteo, "file order")
    add_vocab_options(criteo, apply=True)

    csv = formats.add_parser("csv", help="delimited text (CSV, TSV; Avazu-style click logs)")
    add_csv_options(csv)
    add_split_options(csv, "file order, or by --time-column")
    add_vocab_options(csv, apply=True)

    libfm = formats.add_parser("libfm", help="libFM / libSVM text with binary features")
    fields = libfm.add_mutually_exclusive_group(required=True)
    fields.add_argument("--fields", metavar="NAME:FIRST-LAST,...", help="id range of each field")
    fields.add_argument("--feature-index", type=Path, metavar="FILE",
                        help="the field of every id, from lines field:value<TAB>id")
    fields.add_argument("--preset", choices=sorted(PRESETS), help="the fields of a known dataset")

    for sub in (criteo, csv, libfm):
        add_output(sub, "the dataset folder (or folder of train/, val/, test/ and vocab.parquet)")
        sub.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                         help="files, read in order (gzip or not)")

    movielens = formats.add_parser("movielens", help="MovieLens-1M: ratings + users + movies")
    add_output(movielens, "the folder of train/, val/, test/ and vocab.parquet")
    add_split_options(movielens, "time order")
    add_vocab_options(movielens)
    movielens.add_argument("src", type=Path, metavar="SRC_DIR", help="the MovieLens-1M folder")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.quiet)
    common = dict(overwrite=args.overwrite, progress=not args.quiet)
    if args.format == "libfm":
        if args.feature_index:
            fields = read_feature_index(args.feature_index)
        else:
            fields = parse_fields(args.fields) if args.fields else PRESETS[args.preset]
        return _report(convert_libfm(args.inputs, args.out, fields=fields, **common))
    if args.format == "movielens":
        return _report(convert_movielens(args.src, args.out, split=split_config(args),
                                         vocab=vocab_config(args), **common))
    if args.format == "criteo":
        if args.table_size is not None:
            return _report(convert_criteo(args.inputs, args.out, table_size=args.table_size,
                                          max_rows=args.max_rows, **common))
        if args.vocab is not None:
            return _report(apply_criteo_vocab(args.inputs, args.out, args.vocab,
                                              max_rows=args.max_rows, **common))
        return _report(convert_criteo_vocab(args.inputs, args.out, vocab=vocab_config(args),
                                            split=split_config(args), max_rows=args.max_rows,
                                            **common))
    columns, fmt = csv_columns(args), csv_format(args)
    if columns is None:
        return _report(apply_csv_vocab(args.inputs, args.out, args.vocab, fmt=fmt, **common))
    return _report(convert_csv(args.inputs, args.out, columns, fmt=fmt, split=split_config(args),
                               vocab=vocab_config(args), **common))


def _report(out: Path | dict[str, Path]) -> int:
    """Prints one line per dataset written (and one for the vocabularies)."""
    if isinstance(out, Path):
        print(describe_dataset(out))
        return 0
    for path in out.values():
        print(describe_dataset(path))
    print(describe_vocabularies(next(iter(out.values())).parent / VOCAB_FILE))
    return 0
