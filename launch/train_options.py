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
    "patience": "stop after this many evaluations without a better validation logloss "
    "(needs validation rows)",
    "eval_every": "evaluate on the validation rows every N steps (default: every epoch)",
    "seed": "random seed (initialisation and data order)",
    "distill_temperature": "temperature T of the teacher's soft labels (finetune --teacher)",
    "eval_at_start": "evaluate before the first step, so the starting model can be kept",
    "fused_sparse": "in one process, update the tables with TorchRec's fused Adagrad (FBGEMM, "
    "only the rows looked up) instead of dense gradients",
}

# The command line trains until the validation rows stop improving: --epochs is a maximum,
# and the state with the best validation logloss is kept (and named in the log).
# Fine-tuning also scores its starting model, so it is kept, and said to be, when no step
# beats it. (TrainConfig's own defaults, for the Python API, are one epoch.)
# Patience applies only with validation rows (see train_config).
CLI_DEFAULTS = {"epochs": 20}
FINETUNE_DEFAULTS = {**CLI_DEFAULTS, "eval_at_start": True}
DEFAULT_PATIENCE = 2


def add_train_options(parser: argparse.ArgumentParser, finetune: bool = False) -> None:
    """--batch-size, the validation rows, and the options of ``TrainConfig`` (with the
    command line's defaults, :data:`CLI_DEFAULTS` or :data:`FINETUNE_DEFAULTS`)."""
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per step (default: %(default)s)")
    v = parser.add_mutually_exclusive_group()
    v.add_argument("--val-fraction", type=float, default=0.1,
                   help="hold out this last fraction of the training rows for early stopping "
                   "(default: %(default)s; 0 disables validation)")
    v.add_argument("--val", metavar="DIR[@START:STOP]", help="a separate validation dataset")
    defaults = FINETUNE_DEFAULTS if finetune else CLI_DEFAULTS
    helps = {**TRAIN_HELP, "epochs": "passes over the training data at most (early stopping ends "
             "training when --patience evaluations in a row bring no lower validation logloss)"}
    extra = {name: {"default": value} for name, value in defaults.items()}
    for name, value in defaults.items():
        if not isinstance(value, bool):
            extra[name]["help"] = f"{helps[name]} (default: {value})"
    extra["patience"] = {"help": f"{helps['patience']} (default: {DEFAULT_PATIENCE} when there "
                         "are validation rows)"}
    add_dataclass_options(parser, _train_config_cls(), helps, extra=extra)


def _train_config_cls() -> type:
    from afmrec.pipeline.train import TrainConfig

    return TrainConfig


def train_config(args: argparse.Namespace):
    """The ``TrainConfig`` of the options; early stopping (``DEFAULT_PATIENCE``) unless
    --patience is given or there are no validation rows (--val-fraction 0 and no --val)."""
    patience = args.patience
    if patience is None and (args.val or args.val_fraction > 0):
        patience = DEFAULT_PATIENCE
    return dataclass_from_args(_train_config_cls(), args, patience=patience)


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
