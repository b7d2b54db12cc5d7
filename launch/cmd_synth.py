"""Generate a synthetic CTR dataset shaped like production data, with learnable labels.

Writes OUT/train (and OUT/test with --test-rows): folders of Parquet parts with dense
features I1..IN (--dense) and one sparse field C1..CF per table, plus a _dataset.json
summary. Id frequencies follow a power law (--zipf). Labels come from a hidden
factorisation model; each split's _dataset.json records the AUC of its true logits
(oracle_auc, about 0.8), the ceiling a trained model can approach. The default tables are
Criteo Kaggle's 26 cardinalities capped at 200k rows; --tables criteo keeps them uncapped
(up to 10M rows: about 1 GB of memory for the hidden model). The output is a function of
the options, --seed included.

Examples:
  afmrec synth --out data/synth --rows 1000000 --test-rows 100000
  afmrec synth --out data/bags --tables 1000,50000 --multi-hot 3,5 --missing-rate 0.1
"""

from __future__ import annotations

import argparse

from ..pipeline.data import (
    CRITEO_KAGGLE_TABLE_SIZES,
    SynthConfig,
    describe_dataset,
    read_info,
    synthesize,
)
from .args import add_output, int_list, setup_logging

HELP = "generate a production-shaped synthetic CTR dataset (Parquet)"

_DEFAULT = SynthConfig()


def _tables(text: str) -> tuple[int, ...]:
    return CRITEO_KAGGLE_TABLE_SIZES if text == "criteo" else int_list(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_output(parser, "the dataset folder (OUT/train, OUT/test)")
    parser.add_argument(
        "--rows", type=int, default=_DEFAULT.num_rows, help="train rows (default: %(default)s)"
    )
    parser.add_argument(
        "--test-rows", type=int, default=0, help="test rows; 0 writes no test split (default: 0)"
    )
    parser.add_argument(
        "--tables",
        type=_tables,
        default=_DEFAULT.table_sizes,
        metavar="N,N,...|criteo",
        help="rows of each table, or 'criteo' for Criteo Kaggle's 26 (default: those, capped "
        "at 200k)",
    )
    parser.add_argument(
        "--dense", type=int, default=_DEFAULT.num_dense, help="dense features (default: 13)"
    )
    parser.add_argument(
        "--multi-hot",
        type=int_list,
        metavar="M|M,M,...",
        help="largest bag of every table (one value) or of each table (default: one-hot)",
    )
    parser.add_argument(
        "--missing-rate",
        type=float,
        default=_DEFAULT.missing_rate,
        help="probability of an empty bag, with --multi-hot (default: 0)",
    )
    parser.add_argument(
        "--positive-rate",
        type=float,
        default=_DEFAULT.positive_rate,
        help="fraction of positive labels (default: %(default)s)",
    )
    parser.add_argument(
        "--zipf",
        type=float,
        default=_DEFAULT.zipf_exponent,
        help="id frequencies go as rank^-ZIPF; 0 is uniform (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=_DEFAULT.seed, help="(default: 0)")


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.artifacts import SPLITS, check_replaceable

    setup_logging(args.quiet)
    check_replaceable(args.out, args.overwrite, kind=SPLITS)  # before generating anything
    multi_hot = args.multi_hot
    if multi_hot is not None and len(multi_hot) == 1:
        multi_hot = multi_hot * len(args.tables)
    config = SynthConfig(
        num_rows=args.rows,
        num_dense=args.dense,
        table_sizes=args.tables,
        zipf_exponent=args.zipf,
        multi_hot=multi_hot,
        missing_rate=args.missing_rate,
        positive_rate=args.positive_rate,
        seed=args.seed,
    )
    out = synthesize(
        config,
        args.out,
        test_rows=args.test_rows,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    for split in ("train", "test"):
        if (out / split).exists():
            oracle_auc = read_info(out / split)["oracle_auc"]
            print(f"{describe_dataset(out / split)}; oracle AUC {oracle_auc:.4f}")
    return 0
