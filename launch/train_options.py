"""Training options shared by ``afmrec train`` and ``afmrec finetune``."""

from __future__ import annotations

import argparse

from afmrec.pipeline.errors import InputError

from .args import add_dataclass_options, dataclass_from_args

TRAIN_HELP = {
    "epochs": "passes over the training data",
    "max_steps": "stop after this many optimizer steps",
    "dense_lr": "Adam learning rate of the dense layers",
    "sparse_lr": "Adagrad learning rate of the embedding tables",
    "weight_decay": "Adam weight decay of the dense layers",
    "patience": "stop after this many evaluations without a better validation logloss",
    "eval_every": "evaluate on the validation rows every N steps (default: every epoch)",
    "seed": "random seed (initialisation and data order)",
    "distill_temperature": "temperature T of the teacher's soft labels (finetune --teacher)",
    "eval_at_start": "evaluate before the first step, so the starting model can be kept",
}


def add_train_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per step (default: %(default)s)")
    v = parser.add_mutually_exclusive_group()
    v.add_argument("--val-fraction", type=float, default=0.1,
                   help="hold out this last fraction of the training rows for early stopping "
                   "(default: %(default)s; 0 disables validation)")
    v.add_argument("--val", metavar="DIR[@START:STOP]", help="a separate validation dataset")
    add_dataclass_options(parser, _train_config_cls(), TRAIN_HELP)


def _train_config_cls() -> type:
    from afmrec.pipeline.train import TrainConfig

    return TrainConfig


def train_config(args: argparse.Namespace):
    return dataclass_from_args(_train_config_cls(), args)


def validation_split(args: argparse.Namespace):
    """(training rows, validation rows or None) from --data, --val and --val-fraction."""
    from afmrec.pipeline.stages import DataRef

    data = DataRef.parse(args.data)
    if args.val:
        return data, DataRef.parse(args.val)
    if not 0 <= args.val_fraction < 1:
        raise InputError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.val_fraction == 0:
        return data, None
    return data.split(args.val_fraction)
