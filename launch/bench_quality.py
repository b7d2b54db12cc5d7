"""Quality of compressed models against every alternative, paired by seed, on real data.

  afmrec bench quality --data ../shared/data/frappe --out bench/quality.parquet

trains DLRM, DLRM-DCNv2 and DeepFM to convergence on Frappe (the published validation
split, a seeded tenth held out for early stopping; tested on the published test split) and
on production-shaped synthetic data, then builds at each target ratio (3x 5x 8x 16x 32x)
and rank selection (global budget weighted by measured loss sensitivity, variance-only
budget, uniform ratio per block, full rank) the variants original, original_ft, int8,
afm, afm_ft, afm_act_ft, afm_distill, svd, svd_ft, scratch and afm_ft_int8. One row per
run goes to the Parquet table --out (dataset, model, variant, rank_selection,
target_ratio, ratio, params, bytes, bytes_ratio, auc, logloss, seed, wall_s, steps,
ranks), rewritten after every trained original, with one spectrum plot per model
(spectrum_<model>.png, beside --out unless --plots). The paired ΔAUC summary and the
issue's targets are printed at the end.

--data is the folder holding frappe.validation.libfm and frappe.test.libfm; converted
and generated data go to --work (default: a temporary folder, removed at the end), never
into the repository. --small runs the same code on a few thousand rows, the three models, one
seed and one ratio (under 3 minutes on 2 CPU cores). --resume keeps the rows of --out and
runs only the originals (dataset, model, seed) it lacks; --report-only prints the summary
of --out without running anything. --learning-curve instead trains each model's original
(seed 0) on 25%, 50% and 100% of Frappe's training rows and writes their test AUC to --out:
how much of the gap to the published AUCs (trained on 3.9x more rows) data would close.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

HELP = "AUC of every compressed variant vs the original, paired by seed (Frappe + synthetic)"

log = logging.getLogger("afmrec.bench.quality")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="folder with frappe.validation.libfm and frappe.test.libfm "
                        "(required unless --report-only)")
    parser.add_argument("--out", type=Path, required=True, help="the Parquet table to write")
    parser.add_argument("--small", action="store_true", help="a reduced grid (< 3 minutes on CPU)")
    parser.add_argument("--work", type=Path,
                        help="where converted and generated data go, kept for reuse "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--plots", type=Path, help="folder of the spectrum plots (default: --out's)")
    parser.add_argument("--datasets", default="frappe,synth",
                        help="comma-separated subset of frappe,synth (default: %(default)s)")
    parser.add_argument("--models", help="comma-separated subset of dlrm,dcn,deepfm")
    parser.add_argument("--seeds", type=int, help="number of seeds (0..N-1)")
    parser.add_argument("--ratios", type=lambda s: tuple(float(x) for x in s.split(",")),
                        help="comma-separated target ratios, e.g. 3,5,8,16,32")
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

    from afmrec.pipeline import quality as q
    from afmrec.pipeline.errors import InputError
    from afmrec.pipeline.report import read_report

    from .args import setup_logging

    setup_logging(args.quiet)
    if args.report_only:
        rows = read_report(args.out)
        ratios = tuple(sorted({r["target_ratio"] for r in rows if r["target_ratio"] is not None}))
        print(_report(q, rows, ratios))
        return 0
    if args.data is None:
        raise InputError("--data is required (the folder with the Frappe libFM files)")
    done = read_report(args.out) if args.resume and args.out.exists() else []
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="afmrec-quality-"))
    plots = args.plots or args.out.parent
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    plans, grid = q.default_plans(args.data, work, small=args.small, datasets=datasets)
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
    grid = dataclasses.replace(grid, **changes)
    start = time.perf_counter()
    plotted: set[str] = set()

    def on_cell(cell: q.Cell, rows: list) -> None:
        q.write_rows(rows, args.out)
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
    print(_report(q, rows, grid.ratios))
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


def _report(q, rows: list, ratios: tuple) -> str:
    """The paired ΔAUC tables by dataset and rank selection, absolute AUC, the targets."""
    summary = q.paired_summary(rows)
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        base = [s for s in summary if s["dataset"] == dataset and s["rank_selection"] == "none"]
        lines.append(f"\n## {dataset}: uncompressed (test AUC mean ± std; ΔAUC paired)\n")
        lines += [f"- {s['model']} {s['variant']}: AUC {s['auc']:.4f} ± {s['auc_std']:.4f}, "
                  f"ΔAUC {s['delta_auc']:+.4f} ± {s['delta_auc_std']:.4f}, "
                  f"bytes {s['bytes_ratio']:.2f}x smaller" for s in base]
        for selection in ("global", "variance", "uniform"):
            variants = [v for v in q.COMPRESSED
                        if any(s["variant"] == v and s["rank_selection"] == selection and s["dataset"] == dataset
                               for s in summary)]
            if variants:
                lines.append(f"\n## {dataset}, {selection}: paired ΔAUC mean ± std (measured ratio)\n")
                lines.append(q.format_delta_table(summary, dataset, selection, variants, ratios))
                if selection == "global":
                    for value, what in (("auc", "test AUC"), ("delta_logloss", "paired Δlogloss")):
                        lines.append(f"\n## {dataset}, {selection}: {what} mean ± std (measured ratio)\n")
                        lines.append(q.format_delta_table(summary, dataset, selection, variants, ratios, value))
        for model in sorted({r["model"] for r in rows if r["dataset"] == dataset}):
            lines.append(f"\n## {dataset} {model}: rank of each table under the global budget "
                         "(mean over seeds)\n")
            lines.append(q.format_table_ranks(rows, dataset, model))
        full = [s for s in summary if s["dataset"] == dataset and s["rank_selection"] == "full"]
        lines += [f"\nfull rank {s['model']} {s['variant']}: ΔAUC {s['delta_auc']:+.2e}" for s in full]
    if any(r["dataset"] == "frappe" for r in rows):
        lines.append("\n## targets (frappe)\n")
        lines += [f"- [{'met' if t.met else 'MISSED'}] {t.name}: {t.detail}" for t in q.check_targets(rows)]
    return "\n".join(lines)
