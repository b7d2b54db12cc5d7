"""Train a CTR model (DLRM, DLRM-DCNv2 or DeepFM) on a Parquet dataset.

The model gets one embedding table per sparse field of the data (sizes from the dataset's
schema) and the dense features of the data. A fraction of the training rows (or --val) is
held out for early stopping: training ends when --patience epochs in a row bring no lower
validation logloss (--epochs is a maximum), the best epoch is kept, and the log names it.

Writes OUT/model.json (architecture and provenance) and OUT/checkpoint (DCP).

Example:
  afmrec train --data runs/demo/data/train --arch dlrm --epochs 3 --out runs/demo/original
  torchrun --nproc_per_node 2 -m afmrec.launch.cli train --data ... --sharding '*=row_wise' --out ...

With --batch-size B under torchrun each rank takes B rows per step (global batch B x ranks).
"""

from __future__ import annotations

import argparse

from afmrec.models import ARCHS, ModelConfig

from .args import add_data, add_distributed, add_output, int_list, job, print_throughput
from .train_options import add_train_options, train_config, validation_split

HELP = "train a DLRM / DLRM-DCNv2 / DeepFM model on a Parquet dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data(parser, what="training data")
    add_output(parser, "the model folder")
    m = parser.add_argument_group("model")
    m.add_argument("--arch", choices=ARCHS, default="dlrm", help="model family (default: dlrm)")
    m.add_argument("--embedding-dim", type=int, default=ModelConfig.embedding_dim,
                   help="width D of every table (default: %(default)s)")
    m.add_argument("--over-arch", type=int_list, default=ModelConfig.over_arch,
                   help="top MLP sizes of dlrm/dcn, ending in 1 (default: 128,64,1)")
    m.add_argument("--deep-arch", type=int_list, default=ModelConfig.deep_arch,
                   help="hidden sizes of DeepFM's deep tower (default: 256,128)")
    m.add_argument("--dcn-num-layers", type=int, default=ModelConfig.dcn_num_layers,
                   help="DCNv2 cross layers (default: %(default)s)")
    m.add_argument("--dcn-low-rank-dim", type=int, default=ModelConfig.dcn_low_rank_dim,
                   help="rank of the DCNv2 cross layers (default: %(default)s)")
    add_train_options(parser)
    add_distributed(parser)


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.stages import model_config_from_schema, train_stage

    train, val = validation_split(args)
    model_config = model_config_from_schema(
        train.schema(),
        args.arch,
        embedding_dim=args.embedding_dim,
        over_arch=args.over_arch,
        deep_arch=args.deep_arch,
        dcn_num_layers=args.dcn_num_layers,
        dcn_low_rank_dim=args.dcn_low_rank_dim,
    )
    with job(args) as (env, sharding):
        train_stage(args.out, model_config, train, val, train_config(args), env=env,
                    sharding=sharding, batch_size=args.batch_size, overwrite=args.overwrite,
                    progress=not args.quiet)
        if env.rank == 0:
            print(f"model written to {args.out}")
            if not args.quiet:
                print_throughput(args.out)
    return 0
