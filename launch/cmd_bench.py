"""Benchmarks, each measured side by side with its baseline in one run.

  afmrec bench stats --model DIR --data DIR     statistics pass vs forward-only pass
  afmrec bench speed [--small]                  train / stats / compress / inference speed
                                                at the MLPerf DLRMv2 shape vs baselines
  afmrec bench quality --data FRAPPE_DIR --out FILE
                                                AUC of every variant vs the original

Each benchmark lives in its own module ``afmrec.launch.bench_<name>`` defining ``HELP``,
``add_arguments(parser)`` and ``run(args)``. `afmrec bench NAME --help` explains each.
"""

from __future__ import annotations

import argparse
import importlib

HELP = "benchmarks: a stage measured against its baseline in one run"

# bench name -> module of afmrec.launch
BENCHES = {"stats": "bench_stats", "speed": "bench_speed", "quality": "bench_quality"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module in BENCHES.items():
        mod = importlib.import_module(f"afmrec.launch.{module}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    return args._bench_run(args)
