"""Run any stage as a submitit job: on SLURM (several nodes, one task per GPU) or locally.

Everything after `--` is the stage's own command line. Every task of the job is one
rank: it exports the env:// variables (submitit's TorchDistributedEnvironment) and runs
the same `afmrec STAGE ...` that torchrun would start, without torchrun. On preemption
or timeout the job is requeued and the stage runs again.

Example:
  afmrec submit --partition gpu --nodes 2 --gpus-per-node 8 --time-min 120 -- \\
      stats --model RUN/original --data DATA/train --out RUN/stats.pt --device cuda
"""

from __future__ import annotations

import argparse
import sys

from submitit.helpers import Checkpointable

from afmrec.pipeline.errors import InputError

from .slurm import StageError, add_slurm_arguments, export_env, make_executor, outcome, slurm_config_from_args

HELP = "run a stage (stats, compress, ...) as a SLURM job through submitit"

# Sub-commands that submit jobs themselves, or need a terminal, are not jobs.
NOT_JOBS = ("submit", "batch")


class CliJob(Checkpointable):
    """``afmrec ARGV`` in every task of a job; requeued (same argv) on preemption or timeout."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = list(argv)

    def __call__(self) -> int:
        from .cli import execute

        export_env()
        outcome = execute(self.argv)
        if outcome.error is not None:  # bad input: `afmrec submit` reports the stage's line
            raise StageError(outcome.error)
        if outcome.status:  # so that the job counts as failed
            raise RuntimeError(f"afmrec {self.argv[0]} exited with status {outcome.status}")
        return outcome.status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job and return its exit status")
    add_slurm_arguments(parser)
    parser.add_argument("stage", nargs=argparse.REMAINDER, metavar="-- STAGE ARGS",
                        help="the stage's command line, after --")


def _stage_argv(argv: list[str]) -> list[str]:
    from .cli import COMMANDS

    argv = argv[1:] if argv[:1] == ["--"] else argv
    if not argv or argv[0] not in COMMANDS or argv[0] in NOT_JOBS:
        jobs = ", ".join(c for c in COMMANDS if c not in NOT_JOBS)
        raise InputError(f"expected `-- STAGE ARGS...` after the job options, STAGE one of {jobs}")
    return argv


def run(args: argparse.Namespace) -> int:
    from submitit.helpers import clean_env

    argv = _stage_argv(args.stage)
    config = slurm_config_from_args(args)
    executor = make_executor(config)
    with clean_env():  # the job must not inherit this shell's SLURM or torchrun variables
        job = executor.submit(CliJob(argv))
    print(f"job {job.job_id}: afmrec {' '.join(argv)} ({config.describe()})", flush=True)
    if not args.wait and config.executor != "debug":  # a debug job runs when waited for
        return 0
    result = outcome(job)
    if result.bad_input and config.executor == "debug":
        return 2  # the stage ran in this process and printed its line
    if result.bad_input:
        print(f"afmrec submit: error: {result.error}", file=sys.stderr)
        return 2
    if result.error is not None:
        print(f"afmrec submit: {result.error}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished")
    return 0
