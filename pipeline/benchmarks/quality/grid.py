"""The whole quality grid, one original at a time, and its table of rows."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from torch import nn

from afmrec.pipeline.evaluate import evaluate
from afmrec.pipeline.report import write_report
from afmrec.pipeline.stages import DataRef

from .config import RECIPES, DatasetPlan, GridConfig
from .variants import Cell, choose_ranks, fit_original, measure, train_original

log = logging.getLogger(__name__)


def run_cell(plan: DatasetPlan, grid: GridConfig, cell: Cell) -> list[dict[str, Any]]:
    """Every variant of one original: the uncompressed ones, then each selection and ratio."""
    built: dict[str, nn.Module] = {}
    rows = [measure(RECIPES[n], cell, "none", None, None, built) for n in plan.uncompressed]
    for selection, names in plan.variants.items():
        targets: Sequence[float | None] = [None] if selection == "full" else grid.ratios
        for target in targets:
            built = {}
            for fmt in dict.fromkeys(RECIPES[n].table_format for n in names):
                plan = choose_ranks(cell, selection, target, fmt, grid.serve_device)
                if plan is None:
                    continue
                rows += [measure(RECIPES[n], cell, selection, target, plan, built)
                         for n in names if RECIPES[n].table_format == fmt]
    return rows


def run_grid(
    plans: Sequence[DatasetPlan],
    grid: GridConfig,
    *,
    on_cell: Callable[[Cell, list[dict[str, Any]]], None] | None = None,
    done: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The whole benchmark, one original at a time; ``on_cell`` sees each finished one
    (its cell and every row so far), e.g. to write partial results and plots.

    ``done``: rows of an earlier, interrupted run; their (dataset, model, seed) originals
    are not run again and the rows are kept (cells are independent of each other).
    """
    rows: list[dict[str, Any]] = [dict(r) for r in done]
    finished = {(r["dataset"], r["model"], r["seed"]) for r in rows}
    for plan in plans:
        for arch in plan.models or grid.models:
            for seed in grid.seeds:
                if (plan.name, arch, seed) in finished:
                    continue
                cell = train_original(plan, plan.splits(seed), arch, seed)
                rows += run_cell(plan, grid, cell)
                if on_cell is not None:
                    on_cell(cell, rows)
    return rows


def learning_curve(plan: DatasetPlan, arch: str, seed: int,
                   fractions: Sequence[float] = (0.25, 0.5, 1.0)) -> list[dict[str, Any]]:
    """Test AUC of the converged original trained on growing fractions of the training
    rows (same validation rows): how much AUC more training data would buy."""
    rows = []
    for fraction in fractions:
        full = plan.splits(seed)
        train = DataRef(full.train.path, full.train.start,
                        full.train.start + (full.train.stop - full.train.start) * fraction)
        cell, result = fit_original(plan, dataclasses.replace(full, train=train), arch, seed)
        test = evaluate(cell.original, full.test.batches(plan.protocol.eval_batch_size))
        rows.append({"dataset": plan.name, "model": arch, "seed": seed, "fraction": fraction,
                     "train_rows": train.batches(plan.protocol.batch_size).total_rows,
                     "steps": result.steps, "val_auc": result.best.val_auc,
                     "auc": test.auc, "logloss": test.logloss})
        log.info("%s %s seed %d, %.0f%% of the training rows: test auc %.4f", plan.name, arch,
                 seed, 100 * fraction, test.auc)
    return rows


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path, settings: Mapping[str, Any] | None = None) -> None:
    """The table, as Parquet, atomically (the report's columns first: ``latency_ms`` is
    not measured here, it stays null), ``settings`` in its metadata."""
    write_report(rows, path, overwrite=True, settings=settings)


def grid_ratios(path: Path) -> tuple[float, ...] | None:
    """The target ratios the grid of a result file ran (the settings :func:`write_rows`
    recorded), refused ones included; ``None`` for a file without them."""
    import pyarrow.parquet as pq

    settings = json.loads((pq.read_schema(path).metadata or {}).get(b"afmrec.settings", b"{}"))
    ratios = settings.get("grid", {}).get("ratios")
    return tuple(ratios) if ratios else None
