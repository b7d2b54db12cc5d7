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
import os
import sys
from types import ModuleType

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


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afmrec", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen sub-command's module is imported (and only it adds its arguments).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name in COMMANDS:
        mod = _module(name) if name == chosen else None
        help_line = mod.HELP if mod else _HELP_LINES.get(name, "")
        p = sub.add_parser(
            name,
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``afmrec`` console script."""
    from afmrec.pipeline.errors import InputError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except InputError as e:
        if args.debug:
            raise
        print(f"afmrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"afmrec {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout piped to a reader that stopped, e.g. `| head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
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
