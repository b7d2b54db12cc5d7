"""Training, statistics, compression and inference speed at production shape, each
measured side by side with its baseline in one run.

The model is a DLRM-DCNv2 in the MLPerf DLRMv2 shape (26 tables of width 128, Criteo-1TB
cardinalities capped at --table-cap rows, multi-hot bags of MLPerf's sizes, dense arch
512-256-128, over arch 1024-1024-512-256-1, 3 cross layers of rank 512), power-law ids;
training batch 8192, inference batch 65536, TF32 dense math on CUDA for every variant.
--small is the same structure scaled down for a CPU (about a minute on 2 cores).

The served model is first trained for --fit-steps steps on labels from a hidden model of
its ids and dense features (the synthetic data's), so that its variants are a trained
model's and every served artifact's AUC is measured on held-out labelled rows in the
same run (auc_*, delta_auc_* against the original, auc_oracle: the hidden model's own).
The AFM variants are made as a user makes them: `afmrec stats` (a statistics pass of
--stats-batches batches, then loss probes over --probe-rows rows, both on synthetic
batches held out from the timed ones) and `afmrec compress` under the default rank policy
(loss) at 4x and 8x fewer served bytes, and at 4x with --dense-ratio 2 or 4 (the Linear
layers' multiply-adds capped too: afm4x_dense2, afm4x_dense4, afm4x_int8_dense4). Equal
treatment: every variant, the original included, gets our lookup kernel and our fused
cross network where measured faster on the device; the headline ratio
(infer_*_vs_original) compares the variants' faster artifacts, infer_*_vs_stock_torchrec
compares with the original's TorchScript artifact (FBGEMM tables, no kernel of ours).

Prints and (with --json FILE) writes the ratios, the absolute samples/s behind each, every
variant's rank plan and kernels, peak device memory per stage, and the run's provenance
(git commit, device, driver, versions, precision). --profile adds each served artifact's
device time by kernel class and the lookups' achieved bandwidth against the device's peak.

Runs in one process (it starts a one-rank process group on a free port when there is
none), or under torchrun on several GPUs.

--stages runs a subset (e.g. --stages inference,cpu: the served artifacts alone).

Example:
  afmrec bench speed --json speed.json              # on a GPU host
  afmrec bench speed --small --device cpu           # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Iterator
from pathlib import Path

from .args import job

HELP = "training / statistics / compression / inference speed vs their baselines"
# the SpeedShape fields a flag of the same name (dashes for underscores) overrides
SHAPE_FLAGS = ("table_cap", "steps", "stats_batches", "train_batch", "infer_batch", "eval_batches", "fit_steps",
               "probe_rows")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--small", action="store_true", help="the CPU-sized shape")
    parser.add_argument("--table-cap", type=int, help="cap on rows per table (default: 4M; small: 20k)")
    parser.add_argument("--steps", type=int, help="timed training steps (default: 50; small: 6)")
    parser.add_argument("--stats-batches", type=int,
                        help="the statistics pass, in batches of the training batch size: the AFM "
                        "variants' calibration and the timed pass against a forward-only one (default: 200; small: 6)")
    parser.add_argument("--train-batch", type=int,
                        help="rows of a training and statistics batch (default: 8192; small: 1024)")
    parser.add_argument("--infer-batch", type=int,
                        help="rows of a served batch, timed and scored (default: 65536; small: 4096)")
    parser.add_argument("--eval-batches", type=int,
                        help="held-out labelled batches of --infer-batch rows that score every served "
                        "variant's AUC (default: 8; small: 4)")
    parser.add_argument("--fit-steps", type=int,
                        help="steps of training (batches of the training batch size, labels from a "
                        "hidden model) before the served model is calibrated, compressed and scored "
                        "(default: 300; 0: served untrained, no AUC)")
    parser.add_argument("--probe-rows", type=int,
                        help="rows of the loss probes that calibrate the AFM variants (default: 16384; small: 256)")
    parser.add_argument("--stages", default="train,stats,compress,inference,cpu",
                        help="comma-separated subset of train, stats, compress, inference (the "
                        "served artifacts), cpu (CPU latency); default: all")
    parser.add_argument("--workdir", type=Path, help="where the timed checkpoints go (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the record to this file")
    parser.add_argument("--profile", action="store_true",
                        help="each served artifact's device time by kernel class (lookup, GEMM, cross, "
                        "element-wise) and its lookups' bandwidth against the device's peak, in the record")
    parser.add_argument("--profile-dir", type=Path,
                        help="write torch.profiler tables (training step, forward vs statistics "
                        "pass, each served artifact) here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    parser.add_argument("--aoti", action="store_true",
                        help="on CUDA, also time AOTInductor artifacts (export --format aoti, with the "
                        "kernels of ours measured faster for each variant); each compiles for about a minute")
    parser.add_argument("--variants",
                        help="comma-separated served variants the inference stage times (of original, "
                        "afm4x, afm8x, int8, afm4x_int8, fp16, afm4x_fp16, afm4x_dense2, afm4x_dense4, "
                        "afm4x_int8_dense4: 4x with --dense-ratio 2 or 4; the original always); default: all")
    parser.add_argument("--quiet", action="store_true", help="no info logs")


@contextlib.contextmanager
def one_rank_unless_launched() -> Iterator[None]:
    """DistributedModelParallel needs a process group: the variables of a job of one rank
    of our own where no launcher set them, on a port free now (two runs side by side must
    not meet), removed again afterwards (a caller in the same process must not take itself
    for a rank of a job that is over)."""
    added = {key: value for key, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                                           ("MASTER_ADDR", "127.0.0.1"))
             if key not in os.environ}
    if "MASTER_PORT" not in os.environ:
        from afmrec.sharding.env import free_port

        added["MASTER_PORT"] = str(free_port())
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.artifacts import write_json
    from afmrec.pipeline.benchmarks.speed import SpeedShape, run_speed

    shape = SpeedShape.small() if args.small else SpeedShape()
    changes = {k: getattr(args, k) for k in SHAPE_FLAGS if getattr(args, k) is not None}
    if changes:
        import dataclasses

        shape = dataclasses.replace(shape, **changes)
    with one_rank_unless_launched(), job(args) as (env, _):
        if args.profile_dir:
            args.profile_dir.mkdir(parents=True, exist_ok=True)

        def write(record: dict) -> None:  # after each stage: a run cut short keeps its numbers
            if args.json and env.rank == 0:
                write_json(args.json, record, overwrite=True)

        stages = [x for x in args.stages.split(",") if x]
        record = run_speed(shape, env, stages=stages, workdir=args.workdir,
                           profile_dir=args.profile_dir, aoti=args.aoti, profile=args.profile,
                           variants=args.variants.split(",") if args.variants else None, on_stage=write)
        if env.rank == 0:
            print(json.dumps(record, indent=2, default=str))
            if args.json:
                write_json(args.json, record, overwrite=True)
    return 0
