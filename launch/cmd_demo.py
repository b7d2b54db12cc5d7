"""The whole pipeline on generated data, in one command.

  1. synth     production-shaped synthetic data (power-law ids, a hidden model), first
               run only                                             -> OUT/data/{train,test}
  2. train     the original model on the first 60% of the training rows, early
               stopping on the last 10%                                -> OUT/original
  3. stats     output statistics over its training rows                -> OUT/stats.pt
  4. compress  AFM at the target ratio, no fine-tuning                  -> OUT/afm
  5. finetune  one pass over the next 30% of the rows (as production fine-tunes on
               the next day's traffic: a second pass over the same rows overfits the
               tables at once)                                          -> OUT/afm_finetuned
  6. evaluate  all three on the test rows                               -> OUT/report.parquet

A finished stage is skipped when the demo is run again (delete its folder, or pass
--overwrite, to redo it).

Example:
  afmrec demo --out runs/demo
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from .args import add_distributed, job

HELP = "generate data, train, compress, fine-tune and evaluate, end to end"


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes: chosen to finish in a few minutes on 2 CPU cores."""

    arch: str = "dlrm"
    train_rows: int = 500_000
    test_rows: int = 100_000
    embedding_dim: int = 32
    epochs: int = 3
    ratio: float = 5.0
    batch_size: int = 2048
    seed: int = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: %(default)s)")
    parser.add_argument("--arch", choices=("dlrm", "dcn", "deepfm"), default=d.arch, help="model family")
    parser.add_argument("--ratio", type=float, default=d.ratio, help="target compression ratio (default: %(default)s)")
    parser.add_argument("--train-rows", type=int, default=d.train_rows, help="synthetic training rows")
    parser.add_argument("--test-rows", type=int, default=d.test_rows, help="synthetic test rows")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="training epochs of the original")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data and the training")
    parser.add_argument("--overwrite", action="store_true", help="redo every stage")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    add_distributed(parser)


LATENCY_BATCH = 2048


def _stage(name: str, out: Path, overwrite: bool, rank: int) -> bool:
    """Whether to run a stage: its output is absent, or --overwrite."""
    run = overwrite or not out.exists()
    if rank == 0:
        print(f"[{name}] -> {out}" if run else f"[{name}] {out} exists, skipped", flush=True)
    return run


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.compress import CompressConfig
    from afmrec.pipeline.evaluate import latency_note
    from afmrec.pipeline.data import SynthConfig, synthesize
    from afmrec.pipeline.ranks import RankConfig
    from afmrec.pipeline.report import format_report
    from afmrec.pipeline.stages import (
        DataRef, compress_stage, evaluate_stage, finetune_stage, model_config_from_schema,
        stats_stage, train_stage,
    )
    from afmrec.pipeline.train import TrainConfig
    from afmrec.sharding.env import barrier

    d = DemoConfig(arch=args.arch, train_rows=args.train_rows, test_rows=args.test_rows,
                   epochs=args.epochs, ratio=args.ratio, seed=args.seed)
    out: Path = args.out
    ow = args.overwrite
    with job(args) as (env, sharding):
        progress = not args.quiet
        common = dict(env=env, sharding=sharding)
        data = out / "data"
        if _stage("synth", data, ow, env.rank) and env.rank == 0:
            synthesize(SynthConfig(num_rows=d.train_rows, seed=d.seed), data,
                       test_rows=d.test_rows, overwrite=ow, progress=progress)
        barrier()
        rows = DataRef(data / "train")
        train, fresh, val = (DataRef(rows.path, a, b) for a, b in ((0, 0.6), (0.6, 0.9), (0.9, 1)))
        test = DataRef(data / "test")
        original, afm, tuned = out / "original", out / "afm", out / "afm_finetuned"
        # Each of the world's ranks takes batch_size / world rows per step: the same global
        # batch, whatever the number of ranks.
        batch = d.batch_size // env.world_size
        if _stage("train", original, ow, env.rank):
            config = model_config_from_schema(train.schema(), d.arch, embedding_dim=d.embedding_dim)
            train_stage(original, config, train, val,
                        TrainConfig(epochs=d.epochs, eval_every=50, patience=2, seed=d.seed),
                        batch_size=batch, overwrite=ow, progress=progress, **common)
        stats = out / "stats.pt"
        if _stage("stats", stats, ow, env.rank):
            stats_stage(original, train, stats, probe_data=val, overwrite=ow, progress=progress,
                        **common)
        if _stage("compress", afm, ow, env.rank):
            compress_stage(original, stats, afm,
                           RankConfig(ratio=d.ratio),
                           CompressConfig(), overwrite=ow, **common)
        if _stage("finetune", tuned, ow, env.rank):
            # Frequent validation, and the starting model is kept if nothing beats it.
            finetune = TrainConfig(epochs=1, eval_every=25, patience=3, eval_at_start=True,
                                   seed=d.seed)
            finetune_stage(afm, tuned, fresh, val, finetune, batch_size=batch, overwrite=ow,
                           progress=progress, **common)
        if env.rank == 0:
            print("[evaluate] -> " + str(out / "report.parquet"))
        report = evaluate_stage({"original": original, "afm": afm, "afm_finetuned": tuned}, test,
                                out / "report.parquet", latency_batch=LATENCY_BATCH,
                                progress=progress, **common)
        if env.rank == 0:
            print(format_report(report))
            print(latency_note(LATENCY_BATCH) + ", on rank 0")
    return 0
