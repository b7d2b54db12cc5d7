"""Quality of compressed models against the original, paired by seed, on any dataset.

The command line of the harness in :mod:`afmrec.pipeline.benchmarks.quality`.

  afmrec bench quality --data ../shared/data/frappe --data ../shared/data/movielens1m \
      --data synth --out bench/quality.parquet

For each --data (a folder of Frappe's libFM files; a folder of MovieLens-1M's .dat files;
any dataset converted by `afmrec convert`, with train/ and test/ [and val/] or one
dataset split 80/10/10; or `synth`, generated production-shaped data whose width-16
tables hold 99% of the parameters), trains DLRM, DLRM-DCNv2 and DeepFM to convergence
(early stopping on the validation rows), analyses each original once (statistics,
spectra, loss probes on the validation rows) and builds at each target byte ratio the
variants of each rank policy: the product's own planner (`afmrec compress --ratio R
--policy P`, its defaults: table format auto, rows padded for CUDA serving). Published
grid: loss (default) afm, afm_ft, afm_ft_int8; loss_dense (loss with `--dense-ratio R` at each
target R: the Linear layers at least R times smaller too) afm, afm_ft; variance afm; uniform afm; full rank afm
(must equal the original). A target the planner refuses (it says why) is a missing cell
and a missed target.

One row per run goes to the Parquet table --out (dataset, model, variant,
rank_selection, target_ratio, ratio, params, bytes, bytes_ratio, table_format, auc,
logloss, seed, wall_s, steps, ranks), rewritten after every trained original, with one
spectrum plot per model. The paired ΔAUC summary and the targets (4x bytes ΔAUC >=
-0.0005 without fine-tuning; 8x >= -0.001 fine-tuned; int8 at >= 16x >= -0.001) are
printed at the end.

Converted and generated data go to --work (default: a temporary folder, removed at the
end), never into the repository. --small runs the same code on a few thousand rows, one
seed and one ratio. --resume keeps the rows of --out and runs only the originals
(dataset, model, seed) it lacks; --report-only prints the summary of --out.
--learning-curve trains each model's original (seed 0) of the first --data on 25%, 50%
and 100% of its training rows and writes their test AUC to --out.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

from .args import int_list

HELP = "AUC of compressed variants vs the original, paired by seed, on any dataset"

log = logging.getLogger("afmrec.bench.quality")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", default=[], metavar="DIR|synth",
                        help="a dataset (repeat for several): Frappe's libFM folder, MovieLens-1M's "
                        ".dat folder, a converted Parquet dataset, or synth (required unless --report-only)")
    parser.add_argument("--out", type=Path, required=True, help="the Parquet table to write")
    parser.add_argument("--small", action="store_true", help="a reduced grid (< 3 minutes on CPU)")
    parser.add_argument("--work", type=Path,
                        help="where converted and generated data go, kept for reuse "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--plots", type=Path, help="folder of the spectrum plots (default: --out's)")
    parser.add_argument("--embedding-dim", type=int, help="table width D (default: per dataset)")
    parser.add_argument("--layers", type=int_list, metavar="N,N,...",
                        help="hidden widths of the top MLP and of DeepFM's deep tower (default: per dataset)")
    parser.add_argument("--models", help="comma-separated subset of dlrm,dcn,deepfm")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--ratios", type=lambda s: tuple(float(x) for x in s.split(",")),
                        help="comma-separated target ratios, e.g. 3,5,8,16,32")
    parser.add_argument("--serve-device", choices=("cuda", "cpu"), default="cuda",
                        help="the row padding the rank plans count (as afmrec compress; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="keep --out's rows and run only the originals it lacks")
    parser.add_argument("--report-only", action="store_true",
                        help="print the summary of an existing --out and exit")
    parser.add_argument("--learning-curve", action="store_true",
                        help="only train the originals on growing fractions of the training rows")
    parser.add_argument("--quiet", action="store_true", help="no per-run log lines")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from afmrec.pipeline.benchmarks import quality as q
    from afmrec.pipeline.errors import InputError
    from afmrec.pipeline.report import read_report

    from .args import setup_logging

    setup_logging(args.quiet)
    if args.report_only:
        rows = read_report(args.out)
        ratios = q.grid_ratios(args.out) or tuple(sorted({r["target_ratio"] for r in rows
                                                         if r["target_ratio"] is not None}))
        print(q.format_summary(rows, ratios))
        return 0
    if not args.data:
        raise InputError("--data is required (a dataset folder, or synth)")
    done = read_report(args.out) if args.resume and args.out.exists() else []
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="afmrec-quality-"))
    plots = args.plots or args.out.parent
    shape = q.ModelShape(args.embedding_dim, args.layers)
    plans = [q.dataset_plan(str(d), work, small=args.small, shape=shape) for d in args.data]
    grid = q.default_grid(args.small)
    if args.learning_curve:
        return _learning_curve(q, plans[0], grid.models if not args.models else
                               tuple(m.strip() for m in args.models.split(",")), args.out)
    changes = {}
    if args.models:
        changes["models"] = tuple(m.strip() for m in args.models.split(","))
    if args.seeds:
        changes["seeds"] = tuple(range(args.seeds))
    if args.ratios:
        changes["ratios"] = args.ratios
    changes["serve_device"] = args.serve_device
    grid = dataclasses.replace(grid, **changes)
    start = time.perf_counter()
    plotted: set[str] = set()
    settings = {"command": "afmrec bench quality", "data": [str(d) for d in args.data],
                "grid": dataclasses.asdict(grid), "shape": dataclasses.asdict(shape),
                "threads": args.threads,
                "protocols": {p.name: dataclasses.asdict(p.protocol) for p in plans},
                "variants": {p.name: dict(p.variants) for p in plans}}

    def on_cell(cell: q.Cell, rows: list) -> None:
        q.write_rows(rows, args.out, settings)
        # one plot per model: the first dataset's first seed (spectrum_<model>.png), and
        # the first seed of every other dataset (spectrum_<dataset>_<model>.png)
        name = cell.arch if cell.dataset == plans[0].name else f"{cell.dataset}_{cell.arch}"
        if name not in plotted:
            plotted.add(name)
            q.plot_spectra(cell.spectra, cell.blocks, plots / f"spectrum_{name}.png",
                           f"{cell.arch} on {cell.dataset} (seed {cell.seed}): retained output variance")
        log.info("%d rows after %.0f s -> %s", len(rows), time.perf_counter() - start, args.out)

    try:
        rows = q.run_grid(plans, grid, on_cell=on_cell, done=done)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(rows)} runs, {len(rows) - len(done)} in {time.perf_counter() - start:.0f} s")
    print(q.format_summary(rows, grid.ratios))
    return 0


def _learning_curve(q, plan, models: tuple, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from afmrec.pipeline.artifacts import atomic_file

    rows = [row for arch in models for row in q.learning_curve(plan, arch, seed=0)]
    with atomic_file(out, overwrite=True) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    for r in rows:
        print(f"{r['dataset']} {r['model']}: {r['train_rows']:,} training rows -> test AUC "
              f"{r['auc']:.4f} (val {r['val_auc']:.4f}, {r['steps']} steps)")
    return 0
