"""Statistics pass vs forward-only pass, samples/s, over the same in-memory batches.

Prints a JSON record (and writes it with --json FILE). Under torchrun for several ranks:
  torchrun --nproc_per_node 2 -m afmrec.launch.cli bench stats --model DIR --data DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import add_data, add_distributed, job

HELP = "statistics pass vs forward-only pass"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="an uncompressed model folder")
    add_data(parser, what="data to run over (read into memory first)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass per rank")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each")
    parser.add_argument("--precision", choices=("auto", "float64", "float32", "bfloat16"), default="auto",
                        help="the statistics' Gram products (as `afmrec stats --precision`; "
                        "default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the record to this file")
    parser.add_argument("--quiet", action="store_true", help="no info logs")
    add_distributed(parser)


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.artifacts import write_json
    from afmrec.pipeline.benchmarks.stats_pass import time_stats_vs_forward
    from afmrec.pipeline.stages import DataRef

    with job(args) as (env, sharding):
        timing = time_stats_vs_forward(args.model, DataRef.parse(args.data), env=env,
                                       sharding=sharding, batch_size=args.batch_size,
                                       repeats=args.repeats, precision=args.precision)
        if env.rank == 0:
            record = {"bench": "stats_vs_forward", **timing.to_dict()}
            print(json.dumps(record, indent=2))
            if args.json:
                write_json(args.json, record, overwrite=True)
    return 0
