"""Collect output statistics of a trained model over calibration data.

Runs the model forward over the data (no labels needed) and accumulates, for every
embedding table (its pooled outputs, empty bags excluded) and every Linear layer (its
outputs), n, sum y and sum y y^T in float64. The statistics of disjoint data shards add
up, so large calibration sets can be split across jobs.

Then, over rows of --probe-data (default: the last tenth of --data), every block
is truncated alone at a few ranks and the loss it adds against the original's own
predictions measured (no labels needed): the input of the
default rank policy of `afmrec compress` (loss). Give held-out rows (a validation split)
when --data is the model's training data: the probes should see rows the model was not
fitted to. Costs one forward pass over the probe rows per probe (about 4 per block).

Writes OUT (a .pt file): moments by block name, the probes, and the model's and the
data's fingerprints, so `afmrec compress` refuses statistics of another model.

Example:
  afmrec stats --model runs/demo/original --data runs/demo/data/train --out runs/demo/stats.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import add_data, add_distributed, add_output, job

HELP = "collect output statistics of every table and Linear layer over data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="a model folder (from `afmrec train`)")
    add_data(parser, what="calibration data")
    add_output(parser, "the statistics file (.pt)")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per forward pass (default: %(default)s)")
    parser.add_argument("--target", nargs="+", default=["*"], metavar="GLOB",
                        help="blocks to observe, by name glob (default: all)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="blocks to skip")
    parser.add_argument("--precision", choices=("auto", "float64", "float32", "bfloat16"), default="auto",
                        help="precision of each batch's Gram product (default: %(default)s, "
                        "bfloat16 on CUDA, float32 on a CPU): float64 products; or a GEMM of the "
                        "centred rows in float32 (TF32 on CUDA) or bfloat16 (float32 "
                        "accumulation; the pass 10%% faster than float32 on an H100, slower on "
                        "a CPU), error relative to each batch's spread (bfloat16: the moments "
                        "of rows each within 2^-8 |y - centre| of the true ones). Sums over "
                        "batches are float64")
    parser.add_argument("--probe-data", metavar="DIR[@START:STOP]",
                        help="rows for the loss probes, ideally held out from training (default: the last tenth of --data)")
    parser.add_argument("--probe-rows", type=int, default=16384,
                        help="at most this many probe rows (default: %(default)s; each probe is a "
                        "forward pass over them)")
    parser.add_argument("--no-probes", action="store_true",
                        help="skip the loss probes (compress then needs --policy other than loss)")
    parser.add_argument("--checkpoint-every", type=int, metavar="N",
                        help="save the running moments every N batches; a rerun after a kill or "
                        "a requeue resumes from the last save (same result as one pass)")
    add_distributed(parser)


def run(args: argparse.Namespace) -> int:
    from afmrec.pipeline.runinfo import RunInfo
    from afmrec.pipeline.sensitivity import SensitivityConfig
    from afmrec.pipeline.stages import DataRef, stats_stage

    data = DataRef.parse(args.data)
    probe_data = None
    if not args.no_probes:
        probe_data = DataRef.parse(args.probe_data) if args.probe_data else data.probe_slice()
    with job(args) as (env, sharding):
        stats = stats_stage(
            args.model, data, args.out, env=env, sharding=sharding,
            probe_data=probe_data, sensitivity=SensitivityConfig(rows=args.probe_rows),
            batch_size=args.batch_size, target=tuple(args.target), exclude=tuple(args.exclude),
            precision=args.precision, checkpoint_every=args.checkpoint_every,
            overwrite=args.overwrite, progress=not args.quiet,
        )
        if env.rank == 0:
            n = max(int(m.n) for m in stats.moments.values())
            print(f"statistics of {len(stats.moments)} blocks over {n:,} rows written to {args.out}")
            probes = stats.meta["sensitivity"]
            if probes:
                print(f"{len(probes['probes'])} loss probes over {probes['rows']:,} rows of {probes['data']}")
            if not args.quiet:
                print(RunInfo.from_dict(stats.meta["throughput"]).summary())
    return 0
