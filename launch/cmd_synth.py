"""Generate a synthetic CTR dataset shaped like production data, with learnable labels.

Writes OUT/train (and OUT/test with --test-rows): folders of Parquet parts with 13 dense
features I1..I13 and one sparse field C1..CF per table, plus a dataset.json summary. Id
frequencies follow a power law (--zipf); labels come from a hidden factorisation model,
and each split's dataset.json records the AUC of its true logits (oracle_auc, about 0.8),
the ceiling a trained model can approach. The default tables are Criteo Kaggle's 26
cardinalities capped at 200k rows; --tables criteo keeps them uncapped (up to 10M rows,
about 1 GB of memory for the hidden model). The output is a function of the options,
--seed included.

Example:
  afmrec synth --out data/synth --rows 1000000 --test-rows 100000
  afmrec synth --out data/bags --tables 1000,50000 --multi-hot 3,5 --missing-rate 0.1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pipeline.data import CRITEO_KAGGLE_TABLE_SIZES, SynthConfig, describe_dataset, read_info, synthesize

HELP = "generate a production-shaped synthetic CTR dataset (Parquet)"

_DEFAULTS = SynthConfig()


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _tables(text: str) -> tuple[int, ...]:
    return CRITEO_KAGGLE_TABLE_SIZES if text == "criteo" else _int_list(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--rows", type=int, default=_DEFAULTS.num_rows, help="train rows (default: %(default)s)")
    parser.add_argument("--test-rows", type=int, default=0, help="test rows; 0 writes no test split (default: %(default)s)")
    parser.add_argument(
        "--tables",
        type=_tables,
        default=_DEFAULTS.table_sizes,
        metavar="N,N,...|criteo",
        help="rows of each table, or 'criteo' for Criteo Kaggle's 26 (default: those capped at 200k)",
    )
    parser.add_argument("--dense", type=int, default=_DEFAULTS.num_dense, help="dense features (default: %(default)s)")
    parser.add_argument(
        "--multi-hot",
        type=_int_list,
        metavar="M|M,M,...",
        help="largest bag of every table (one value) or of each table; default: one-hot",
    )
    parser.add_argument("--missing-rate", type=float, default=0.0, help="probability of an empty bag (multi-hot only)")
    parser.add_argument("--positive-rate", type=float, default=_DEFAULTS.positive_rate, help="(default: %(default)s)")
    parser.add_argument("--zipf", type=float, default=_DEFAULTS.zipf_exponent, help="id frequency exponent (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
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
    out = synthesize(config, args.out, test_rows=args.test_rows, overwrite=args.overwrite)
    for split in ("train", "test"):
        if (out / split).exists():
            oracle_auc = read_info(out / split)["oracle_auc"]
            print(f"{describe_dataset(out / split)}; oracle AUC {oracle_auc:.4f}")
    return 0
