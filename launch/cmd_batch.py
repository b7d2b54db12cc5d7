"""Compress many checkpoints from a manifest, one job per checkpoint (a job array).

The manifest (CSV or Parquet, one row per checkpoint; relative paths are relative to
the manifest's folder) has the columns:
  checkpoint     model folder (model.json + checkpoint/), or a DCP checkpoint folder
  model_config   (optional) architecture JSON, for a checkpoint without model.json
  calibration    statistics data, DIR or DIR@START:STOP
  out            the row's folder (stats.pt, compressed/, finetuned/, report.parquet)
  ratio | energy | rank   the rank policy, one of them (as `afmrec compress`)
  table_multiple, method, activation   (optional) as `afmrec compress`
  finetune       (optional) fine-tuning data (its last tenth validates), with
                 finetune_epochs (default 1) and finetune_batch_size (default 1024)
  eval           (optional) test data: AUC before and after
  name           (optional) the row's name (default: the name of out)
  batch_size     (optional) rows per statistics batch (default 4096)

Each job runs stats -> compress -> (finetune) -> (evaluate) in its row's folder, on
every task of the job (one rank per GPU), and is requeued on preemption or timeout; the
statistics pass resumes from its last save. The results, one row per checkpoint
(status, ratio, AUC before/after, wall time, error), are written to OUT (Parquet).
Rerunning the same manifest skips the finished rows and redoes the stages whose
settings or inputs changed. A failing row fails alone (exit status 1, its error in OUT).

Example:
  afmrec batch --manifest nightly.csv --out nightly_results.parquet \\
      --partition gpu --gpus-per-node 8 --time-min 240 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from submitit.helpers import Checkpointable

from afmrec.pipeline.errors import InputError

from .args import add_distributed, setup_logging
from .slurm import add_slurm_arguments, distributed_task, run_array, slurm_config_from_args

if TYPE_CHECKING:  # for the annotation only: `afmrec batch --help` imports no torch
    from afmrec.pipeline.batch import BatchRow

HELP = "compress many checkpoints listed in a manifest, as a job array (SLURM or local)"


@dataclass(frozen=True)
class RowOptions:
    """What every row's job shares (the row itself brings the rest)."""

    checkpoint_every: int | None = 1000
    device: str = "auto"
    sharding: tuple[str, ...] = ("*=table_wise",)


class RowJob(Checkpointable):
    """One manifest row, run by every task of its job.

    On preemption or timeout submitit pickles it again (with the same row) and requeues
    it; the rerun skips the finished stages and resumes the statistics pass.
    """

    def __init__(self, options: RowOptions) -> None:
        self.options = options

    def __call__(self, row: BatchRow) -> dict[str, Any]:
        from afmrec.pipeline.batch import run_row

        with distributed_task(self.options.device, self.options.sharding) as (env, sharding):
            return run_row(row, env=env, sharding=sharding,
                           checkpoint_every=self.options.checkpoint_every)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="the manifest (.csv or .parquet)")
    parser.add_argument("--out", type=Path, required=True,
                        help="results table (.parquet), rebuilt by every run of the manifest")
    parser.add_argument("--checkpoint-every", type=int, default=RowOptions.checkpoint_every,
                        help="save the statistics pass every N batches (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="print only the results")
    add_distributed(parser)
    add_slurm_arguments(parser)


def _print_results(results: list[dict[str, Any]]) -> None:
    from afmrec.pipeline.report import format_report

    # format_report's table, with a manifest row in place of a model variant.
    rows = [{"variant": r["name"], "params": r.get("params_after"), "bytes": None, "auc": None,
             "logloss": None, "latency_ms": None, "ratio": r.get("ratio"),
             "status": r["status"] + (" (earlier run)" if r["skipped"] else ""),
             "auc_before": r.get("auc_before"), "auc_after": r.get("auc_after"),
             "delta_auc": r.get("delta_auc"),
             "wall_s": None if r.get("wall_s") is None else round(r["wall_s"])} for r in results]
    print(format_report(rows, hide=("bytes", "auc", "logloss", "latency_ms")))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['name']}: {r['error']}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.artifacts import BATCH_RESULTS, check_not_input, check_replaceable
    from afmrec.pipeline.batch import failed_result, finished_result, read_manifest, write_results

    setup_logging(args.quiet)
    check_not_input(args.out, args.manifest)
    check_replaceable(args.out, True, kind=BATCH_RESULTS)  # an earlier table, never another file
    if args.checkpoint_every < 1:
        raise InputError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    config = slurm_config_from_args(args)
    rows = read_manifest(args.manifest)
    earlier = {row.name: finished_result(row) for row in rows}
    pending = [row for row in rows if earlier[row.name] is None]
    if not args.quiet:
        print(f"{len(rows) - len(pending)} of {len(rows)} rows finished earlier; "
              f"{len(pending)} to run ({config.describe()})", flush=True)
    options = RowOptions(args.checkpoint_every, args.device, tuple(args.sharding))

    def announce(jobs: list[Any]) -> None:
        if not args.quiet and config.executor != "debug":
            print(f"submitted jobs {', '.join(str(j.job_id) for j in jobs)}", flush=True)

    outcomes = run_array(config, RowJob(options), pending, announce) if pending else []
    fresh = {row.name: o.result if o.error is None else failed_result(row, o.error)
             for row, o in zip(pending, outcomes)}
    results = [earlier[row.name] or fresh[row.name] for row in rows]
    write_results(results, args.out)
    _print_results(results)
    print(f"results of {len(rows)} rows written to {args.out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1
