"""Evaluate models on a test set: AUC, logloss, parameters, bytes, CPU batch latency.

Models are given as NAME=DIR; the first is the reference for the ratio and delta-AUC
columns. Latency is the median of timed forward passes of --latency-batch rows
(torch.utils.benchmark, after warm-up passes), with the thread count printed under the
table. Writes a Parquet report (columns variant, params, bytes, auc, logloss,
latency_ms, ratio, delta_auc, model_dir, samples_per_s over all ranks, peak_memory_gib
of the fullest GPU, throughput: the per-rank record as JSON) and prints it as a table,
then (unless --quiet) one line of samples/s and peak memory per rank for each model.

Example:
  afmrec evaluate --data runs/demo/data/test --out runs/demo/report.parquet \\
      original=runs/demo/original afm=runs/demo/afm
"""

from __future__ import annotations

import argparse
from pathlib import Path

from afmrec.pipeline.errors import InputError

from .args import add_data, add_distributed, job

HELP = "measure AUC, logloss, size and latency of models; write report.parquet"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="NAME=DIR", help="models to evaluate")
    add_data(parser, what="test data")
    parser.add_argument("--out", type=Path, help="report file (.parquet); printed only if absent")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows per forward pass")
    parser.add_argument("--latency-batch", type=int, default=2048, help="batch size of the latency measurement")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    add_distributed(parser)


def parse_models(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"expected NAME=DIR, got {item!r}")
        if name in out:
            raise InputError(f"model name {name!r} given twice")
        out[name] = Path(path)
    return out


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.evaluate import latency_note
    from afmrec.pipeline.report import format_report
    from afmrec.pipeline.runinfo import RunInfo
    from afmrec.pipeline.stages import DataRef, evaluate_stage

    with job(args) as (env, sharding):
        rows = evaluate_stage(parse_models(args.models), DataRef.parse(args.data), args.out,
                              env=env, sharding=sharding, batch_size=args.batch_size,
                              latency_batch=args.latency_batch, progress=not args.quiet)
        if env.rank == 0:
            print(format_report(rows))
            print(latency_note(args.latency_batch) + ", on rank 0")
            if not args.quiet:
                for row in rows:
                    print(RunInfo.from_json(row["throughput"]).summary(f"evaluate {row['variant']}"))
            if args.out:
                print(f"report written to {args.out}")
    return 0
