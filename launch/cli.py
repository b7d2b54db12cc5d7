"""The ``afmrec`` command line: one sub-command per pipeline stage.

Each stage lives in its own module of ``afmrec.launch`` that defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Bad input raises
:class:`~afmrec.pipeline.errors.InputError`, printed here as one line (exit 2); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import NoReturn

# sub-command -> module of afmrec.launch that implements it (imported lazily: torch and
# torchrec take seconds to import, `afmrec --help` should not).
COMMANDS: dict[str, str] = {
    "synth": "cmd_synth",
    "convert": "cmd_convert",
    "train": "cmd_train",
    "stats": "cmd_stats",
    "compress": "cmd_compress",
    "finetune": "cmd_finetune",
    "evaluate": "cmd_evaluate",
    "export": "cmd_export",
    "demo": "cmd_demo",
    "bench": "cmd_bench",
    "batch": "cmd_batch",
    "submit": "cmd_submit",
}

DESCRIPTION = """\
Compress TorchRec CTR models (DLRM, DLRM-DCNv2, DeepFM) with low-rank factors computed
from the principal components of every embedding table's and Linear layer's outputs
(Atomic Feature Mimicking, arXiv 2405.18146).

A run directory holds one artifact per stage; each stage reads the previous one:
  synth/convert -> DATA   train -> RUN/original   stats -> RUN/stats.pt
  compress -> RUN/<name>  finetune -> RUN/<name>_ft  evaluate -> RUN/report.parquet
  export -> a TorchScript file that serves without afmrec

`afmrec demo` runs all of it on generated data. `afmrec COMMAND --help` explains each stage.
"""


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"afmrec.launch.{COMMANDS[name]}")


def finite_float(text: str) -> float:
    """argparse's ``float``, without ``nan`` and ``inf``: no option of ours can use them,
    and they pass every ``x > 0`` or ``x <= 1`` check that a range test makes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """The CLI's parser: a bad command line is one line on stderr and exit status 2, as
    any other bad input is (argparse prints the whole usage block first), and every
    ``type=float`` option is a :func:`finite_float`.

    Attributes:
        command: the sub-command the line names, if any: errors that argparse raises on
            the top-level parser (``unrecognized arguments``) are about its options.
        errors: the lines of its errors (printed on rank 0 of a job only), shared with
            its sub-parsers.
    """

    command: str | None = None

    def __init__(self, *args, errors: list[str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.errors = [] if errors is None else errors
        # argparse looks each option's type up in this registry first (sub-parsers and
        # argument groups share their parser's class and registry).
        self.register("type", float, finite_float)

    def error(self, message: str) -> NoReturn:
        prog = f"afmrec {self.command}" if self.command else self.prog
        self.errors.append(f"{prog}: error: {message} (`{prog} --help` lists the options)")
        self.exit(2, self.errors[-1] + "\n" if _speaks_for_the_job() else None)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(
        prog="afmrec", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen sub-command's module is imported (and only it adds its arguments).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser.command = chosen if chosen in COMMANDS else None
    for name in COMMANDS:
        mod = _module(name) if name == chosen else None
        help_line = mod.HELP if mod else _HELP_LINES.get(name, "")
        p = sub.add_parser(
            name,
            errors=parser.errors,
            help=help_line,
            description=(mod.__doc__ if mod else help_line),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        if mod:
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


_HELP_LINES = {
    "synth": "generate a production-shaped synthetic CTR dataset (Parquet)",
    "convert": "convert Criteo TSV, CSV/TSV, libFM/libSVM text or MovieLens to the Parquet layout",
    "train": "train a DLRM / DLRM-DCNv2 / DeepFM model on a Parquet dataset",
    "stats": "collect output statistics of every table and Linear layer over data",
    "compress": "compute PCA bases, pick ranks and write the low-rank model",
    "finetune": "fine-tune a compressed model with labels or by distillation",
    "evaluate": "measure AUC, logloss, size and latency of models; write report.parquet",
    "export": "write a compressed model as a TorchScript serving artifact (fp32/fp16/int8/int4 tables)",
    "demo": "generate data, train, compress, fine-tune and evaluate, end to end",
    "bench": "benchmarks: statistics pass, speed at production shape, quality grid",
    "batch": "compress many checkpoints listed in a manifest, as a job array (SLURM or local)",
    "submit": "run a stage (stats, compress, ...) as a SLURM job through submitit",
}


def _speaks_for_the_job() -> bool:
    """Whether this process reports an error that every rank of its job meets alike (the
    command line, the options: what is checked before the job's process group exists):
    rank 0 does, and a process outside a job of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) < 2 or os.environ.get("RANK", "0") == "0"


def _reports(error: Exception) -> bool:
    """Whether this process prints ``error``: in a job of several ranks, one rank does;
    an error that stopped the job's stage says which (``JobFailure.report``)."""
    from afmrec.sharding.env import JobFailure

    if isinstance(error, JobFailure):
        return error.report
    return _speaks_for_the_job()


@dataclass(frozen=True)
class Outcome:
    """How a command ended: its exit status and, for bad input, its one-line error (on
    every rank of a job, also those that leave the printing to another)."""

    status: int
    error: str | None = None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``afmrec`` console script."""
    return execute(argv).status


def execute(argv: list[str] | None = None) -> Outcome:
    """Runs one ``afmrec`` command line, printing what :func:`main` prints."""
    from afmrec.pipeline.errors import InputError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad command line (2, its line printed)
        return Outcome(e.code if isinstance(e.code, int) else 2, (parser.errors or [None])[-1])
    if not getattr(args, "_run", None):
        parser.print_help()
        return Outcome(2)
    try:
        return Outcome(int(args._run(args) or 0))
    except InputError as e:
        if args.debug:
            raise
        line = f"afmrec {args.command}: error: {e}"
        if _reports(e):
            print(line, file=sys.stderr)
        return Outcome(2, line)
    except KeyboardInterrupt:
        print(f"afmrec {args.command}: interrupted", file=sys.stderr)
        return Outcome(130)
    except BrokenPipeError:  # stdout piped to a reader that stopped, e.g. `| head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return Outcome(1)
    finally:
        # Objects in reference cycles are freed here, while the interpreter is whole, not
        # by its final collection as it is torn down, when freeing C++ objects can abort
        # the process ("terminate called without an active exception"): a finished rank's
        # sharded modules keeping gloo's process group alive (1 `make demo` in 10), and
        # the frames of an error's traceback holding Arrow tables (a converter's bad
        # input, 2 exits in 5).
        gc.collect()


if __name__ == "__main__":
    sys.exit(main())
