"""Compress a trained model with low-rank factors (AFM) or the weight-SVD baseline.

From the statistics of `afmrec stats`, computes the principal components of every
block's outputs, chooses a rank per block, and replaces each block y = W x + b by two
factors: tables become K-wide tables plus a projection back to D; Linear layers become
n -> K -> m pairs.

A ratio counts bytes: the original's fp32 checkpoint against the compressed model with
its tables in the row format they will be served in (--table-format; auto: of the plans
in fp32, fp16 and int8, the one that drops the least estimated loss: a narrower format
holds higher ranks in the same bytes), rows padded as the serving kernels pad
them (--serve-device cuda: FBGEMM rounds rows up to 16 bytes; cpu: unpadded). The plan
lands within 10% of the ratio, or the command says which ratios each format reaches.

Rank policies (--policy):
  loss      (default with --ratio) the whole model R times smaller; ranks go where a byte
            saves the most estimated calibration loss: retained variance weighted by each
            block's measured loss sensitivity (the probes `afmrec stats` runs)
  variance  the same budget, greedy on retained variance alone
  uniform   every block the same ratio smaller, the whole model R times smaller
  energy    (--energy P) per block, the smallest rank keeping fraction P of the variance
  rank      (--rank K) the same rank everywhere
  --rank-pattern GLOB=K  per-block overrides (e.g. '*.embedding_bag_collection.*=8')

Writes OUT/model.json + OUT/checkpoint (the compressed model; model.json's "plan" holds
the policy, table format, bytes and ratio), OUT/bases.pt and OUT/ranks.parquet (per
block: rank, variance kept, loss weight, parameters and bytes before and after).

Example:
  afmrec compress --model runs/demo/original --stats runs/demo/stats.pt --ratio 5 --out runs/demo/afm
"""

from __future__ import annotations

import argparse
from pathlib import Path

from afmrec.pipeline.errors import InputError

from afmrec.pipeline.budget import POLICIES, SERVE_DEVICES, TABLE_FORMATS

from .args import add_distributed, add_output, job, print_throughput

HELP = "compute PCA bases, pick ranks and write the low-rank model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="the original model folder")
    parser.add_argument("--stats", type=Path, required=True, help="statistics of that model (`afmrec stats`)")
    add_output(parser, "the compressed model folder")
    parser.add_argument("--policy", choices=POLICIES,
                        help="rank policy (default: loss with --ratio, energy with --energy, "
                        "rank with --rank)")
    policy = parser.add_mutually_exclusive_group(required=True)
    policy.add_argument("--ratio", type=float, help="target whole-model compression ratio in bytes (> 1)")
    policy.add_argument("--energy", type=float, help="variance fraction to keep per block (0-1]")
    policy.add_argument("--rank", type=int, help="one rank for every block")
    parser.add_argument("--dense-ratio", type=float,
                        help="with --ratio (loss or variance policy): the Linear layers together "
                        "at least this many times smaller, which is as many times fewer "
                        "multiply-adds per sample (a budget of their own inside the byte "
                        "budget). Without it the byte budget alone decides, which can leave the "
                        "Linears of a table-dominated model whole")
    parser.add_argument("--rank-pattern", nargs="+", default=[], metavar="GLOB=K",
                        help="per-block rank overrides by block-name glob")
    parser.add_argument("--table-format", choices=TABLE_FORMATS, default="auto",
                        help="row format the tables will be served in, which the ratio counts "
                        "(default: auto, of the plans in fp32, fp16 and int8 the one that keeps "
                        "the most: a narrower format holds higher ranks in the same bytes); "
                        "`afmrec export` uses it unless told otherwise")
    parser.add_argument("--serve-device", choices=SERVE_DEVICES, default="cuda",
                        help="where the model will be served: cuda pads every table row to 16 "
                        "bytes (FBGEMM's inference kernels), cpu does not (default: %(default)s)")
    parser.add_argument("--table-multiple", type=int, default=4,
                        help="round table ranks up to a multiple of this (default: 4, what "
                        "FBGEMM's fused kernels need to shard the compressed tables; 1 for "
                        "models that stay in one process)")
    parser.add_argument("--linear-multiple", type=int, default=1,
                        help="round Linear ranks up to a multiple of this (default: 1; 8 for "
                        "models served on GPUs: tensor-core GEMMs want aligned widths)")
    parser.add_argument("--table-rank-rounding", choices=("round", "error"), default="round",
                        help="a --rank or --rank-pattern rank of a table that is not a multiple "
                        "of --table-multiple: round it up with a warning (default) or stop")
    parser.add_argument("--method", choices=("afm", "svd"), default="afm",
                        help="afm: PCA of the outputs (default); svd: truncated SVD of the weights")
    parser.add_argument("--activation", choices=("relu", "gelu"),
                        help="put an activation between the factors of Linear layers (fine-tune after)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="keep table projections even where a linear consumer could absorb them")
    add_distributed(parser)


def _rank_pattern(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        glob, sep, k = item.rpartition("=")
        if not sep or not k.isdigit():
            raise InputError(f"--rank-pattern expects GLOB=K, got {item!r}")
        out[glob] = int(k)
    return out


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.compress import CompressConfig
    from afmrec.pipeline.ranks import RankConfig
    from afmrec.pipeline.stages import compress_stage, summary_line

    rank_config = RankConfig.from_policy(
        args.policy, ratio=args.ratio, energy=args.energy, rank=args.rank,
        table_format=args.table_format, serve_device=args.serve_device,
        rank_pattern=_rank_pattern(args.rank_pattern), table_multiple=args.table_multiple,
        linear_multiple=args.linear_multiple, dense_ratio=args.dense_ratio,
        table_rounding=args.table_rank_rounding,
    )
    with job(args) as (env, sharding):
        record, rows = compress_stage(
            args.model, args.stats, args.out, rank_config,
            CompressConfig(activation=args.activation, fuse=not args.no_fuse),
            env=env, sharding=sharding, method=args.method, overwrite=args.overwrite,
        )
        if env.rank != 0:
            return 0
    print(summary_line(record.plan, rows))
    print(f"model written to {args.out}")
    if not args.quiet:
        print_throughput(args.out)
    return 0
