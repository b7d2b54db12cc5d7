"""The quality benchmark's results, computed on its rows alone: paired ΔAUC, tables,
targets."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .config import COMPRESSED, SELECTIONS


def _key(row: Mapping[str, Any]) -> tuple:
    return (row["dataset"], row["model"], row["variant"], row["rank_selection"], row["target_ratio"])


def paired_deltas(rows: Iterable[Mapping[str, Any]], reference: str = "original",
                  reference_selection: str | None = "none", metric: str = "auc") -> dict[tuple, dict[int, float]]:
    """``{cell key: {seed: metric - the reference's metric of that seed}}``.

    With ``reference_selection=None`` the reference is the variant ``reference`` in the
    same selection and ratio (e.g. ``afm`` against ``svd``); otherwise the uncompressed
    ``reference`` of the same dataset, model and seed.
    """
    rows = list(rows)
    ref: dict[tuple, float] = {}
    for r in rows:
        if r["variant"] == reference and (reference_selection is None or r["rank_selection"] == reference_selection):
            where = (r["rank_selection"], r["target_ratio"]) if reference_selection is None else ()
            ref[(r["dataset"], r["model"], r["seed"], *where)] = r[metric]
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        where = (r["rank_selection"], r["target_ratio"]) if reference_selection is None else ()
        base = ref.get((r["dataset"], r["model"], r["seed"], *where))
        if base is not None:
            out.setdefault(_key(r), {})[r["seed"]] = r[metric] - base
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per cell (dataset, model, variant, selection, target): seeds, measured ratios, AUC
    and paired ΔAUC against the same seed's original, mean and standard deviation."""
    deltas = paired_deltas(rows)
    loglosses = paired_deltas(rows, metric="logloss")
    cells: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault(_key(r), []).append(r)
    out = []
    for key, members in cells.items():
        auc, auc_std = _mean_std([m["auc"] for m in members])
        d = list(deltas.get(key, {}).values())
        delta, delta_std = _mean_std(d) if d else (math.nan, math.nan)
        d = list(loglosses.get(key, {}).values())
        delta_ll, delta_ll_std = _mean_std(d) if d else (math.nan, math.nan)
        out.append({
            "dataset": key[0], "model": key[1], "variant": key[2], "rank_selection": key[3],
            "target_ratio": key[4], "seeds": len(members),
            "ratio": statistics.fmean(m["ratio"] for m in members),
            "bytes_ratio": statistics.fmean(m["bytes_ratio"] for m in members),
            "table_format": members[0].get("table_format"),
            "auc": auc, "auc_std": auc_std, "delta_auc": delta, "delta_auc_std": delta_std,
            "delta_logloss": delta_ll, "delta_logloss_std": delta_ll_std,
        })
    return out


def format_delta_table(summary: Sequence[Mapping[str, Any]], dataset: str, selection: str,
                       variants: Sequence[str], ratios: Sequence[float], value: str = "delta_auc") -> str:
    """A Markdown table: one row per (model, variant), one column per target ratio, cells
    ``mean ± std (measured bytes ratio and table format)`` of ``value`` (``"delta_auc"`` or ``"delta_logloss"``,
    paired, or ``"auc"``)."""
    by = {(s["model"], s["variant"], s["target_ratio"]): s for s in summary
          if s["dataset"] == dataset and s["rank_selection"] == selection}
    models = sorted({m for m, _, _ in by}, key=lambda m: ("dlrm", "dcn", "deepfm").index(m) if m in ("dlrm", "dcn", "deepfm") else 9)
    head = "| model | variant | " + " | ".join(f"{r:g}x" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (2 + len(ratios))]
    for m in models:
        for v in variants:
            cells = []
            for r in ratios:
                s = by.get((m, v, r))
                sign = "+" if value.startswith("delta_") else ""
                cells.append("-" if s is None else
                             f"{s[value]:{sign}.4f} ± {s[value + '_std']:.4f} ({s['bytes_ratio']:.1f}x {s['table_format']})")
            if any(c != "-" for c in cells):
                lines.append(f"| {m} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table_ranks(rows: Sequence[Mapping[str, Any]], dataset: str, model: str,
                       selection: str = "loss") -> str:
    """A Markdown table of the rank each embedding table got (mean over seeds; ``whole``
    where the budget kept it), one column per target ratio: where the budget went."""
    chosen: dict[float, list[dict[str, int]]] = {}
    for r in rows:
        if (r["dataset"], r["model"], r["rank_selection"], r["variant"]) == (dataset, model, selection, "afm"):
            chosen.setdefault(r["target_ratio"], []).append(json.loads(r["ranks"]))
    tables = sorted({n for runs in chosen.values() for ranks in runs for n in ranks
                     if ".embedding_bag_collection." in n},
                    key=lambda n: int("".join(c for c in n.rsplit(".", 1)[1] if c.isdigit()) or 0))
    ratios = sorted(chosen)
    lines = ["| table | " + " | ".join(f"{t:g}x" for t in ratios) + " |", "|" + "---|" * (1 + len(ratios))]
    for name in tables:
        cells = []
        for t in ratios:
            ks = [ranks[name] for ranks in chosen[t] if name in ranks]
            cells.append("whole" if not ks else f"{statistics.fmean(ks):.1f}" + ("" if len(ks) == len(chosen[t]) else f" ({len(ks)}/{len(chosen[t])})"))
        lines.append(f"| {name.rsplit('.', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- targets, judged per dataset and model ---------------------------------------------------


@dataclass(frozen=True)
class TargetResult:
    """One target: whether it is met, and the numbers that say so."""

    name: str
    met: bool
    detail: str


# (variant, target byte ratio or None for "the best cell at >= 16x bytes", ΔAUC floor)
TARGETS = (("afm", 4.0, -0.0005), ("afm_ft", 8.0, -0.001), ("afm_ft_int8", None, -0.001))


def check_targets(rows: Sequence[Mapping[str, Any]], dataset: str, ratios: Sequence[float],
                  selection: str = "loss") -> list[TargetResult]:
    """The quality targets on ``dataset``'s rows, paired by seed, for every model: AFM at
    4x bytes without fine-tuning ΔAUC >= -0.0005; fine-tuned at 8x >= -0.001; fine-tuned
    with int8 tables at >= 16x bytes >= -0.001. Only targets whose ratio the grid ran
    (``ratios``) are judged; a cell the planner refused is a miss."""
    summary = [s for s in paired_summary([r for r in rows if r["dataset"] == dataset])
               if s["rank_selection"] == selection]
    models = sorted({r["model"] for r in rows if r["dataset"] == dataset},
                    key=lambda m: ("dlrm", "dcn", "deepfm").index(m) if m in ("dlrm", "dcn", "deepfm") else 9)
    results = []
    for variant, ratio, floor in TARGETS:
        if (ratio not in ratios) if ratio else max(ratios) < 16:
            continue
        for model in models:
            cells = [s for s in summary if s["model"] == model and s["variant"] == variant
                     and s["target_ratio"] == (ratio or 16.0)]
            name = f"{dataset} {model} {variant} at {f'{ratio:g}x' if ratio else '>= 16x'} bytes: ΔAUC >= {floor:g}"
            if not cells:
                results.append(TargetResult(name, False, "no plan reaches it (the planner refused the target)"))
                continue
            best = max(cells, key=lambda s: s["delta_auc"])
            reached = ratio is not None or best["bytes_ratio"] >= 16
            results.append(TargetResult(
                name, reached and best["delta_auc"] >= floor,
                f"{best['delta_auc']:+.4f} ± {best['delta_auc_std']:.4f} at {best['bytes_ratio']:.2f}x bytes "
                f"({best['table_format']} tables, {best['seeds']} seeds)" + ("" if reached else ": below 16x")))
    return results


def format_summary(rows: Sequence[Mapping[str, Any]], ratios: Sequence[float]) -> str:
    """The report of ``afmrec bench quality``, in Markdown: by dataset, the paired ΔAUC
    tables of each rank selection, absolute AUC, the table ranks, then the targets."""
    summary = paired_summary(rows)
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        base = [s for s in summary if s["dataset"] == dataset and s["rank_selection"] == "none"]
        lines.append(f"\n## {dataset}: uncompressed (test AUC mean ± std; ΔAUC paired)\n")
        lines += [f"- {s['model']} {s['variant']}: AUC {s['auc']:.4f} ± {s['auc_std']:.4f}, "
                  f"ΔAUC {s['delta_auc']:+.4f} ± {s['delta_auc_std']:.4f}, "
                  f"bytes {s['bytes_ratio']:.2f}x smaller" for s in base]
        for selection in (s for s in SELECTIONS if s != "full"):
            variants = [v for v in COMPRESSED
                        if any(s["variant"] == v and s["rank_selection"] == selection and s["dataset"] == dataset
                               for s in summary)]
            if variants:
                lines.append(f"\n## {dataset}, {selection}: paired ΔAUC mean ± std (measured ratio)\n")
                lines.append(format_delta_table(summary, dataset, selection, variants, ratios))
                if selection == "loss":
                    for value, what in (("auc", "test AUC"), ("delta_logloss", "paired Δlogloss")):
                        lines.append(f"\n## {dataset}, {selection}: {what} mean ± std (measured ratio)\n")
                        lines.append(format_delta_table(summary, dataset, selection, variants, ratios, value))
        for model in sorted({r["model"] for r in rows if r["dataset"] == dataset}):
            lines.append(f"\n## {dataset} {model}: rank of each table under the loss policy "
                         "(mean over seeds)\n")
            lines.append(format_table_ranks(rows, dataset, model))
        full = [s for s in summary if s["dataset"] == dataset and s["rank_selection"] == "full"]
        lines += [f"\nfull rank {s['model']} {s['variant']}: ΔAUC {s['delta_auc']:+.2e}" for s in full]
    lines.append("\n## targets\n")
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [f"- [{'met' if t.met else 'MISSED'}] {t.name}: {t.detail}"
                  for t in check_targets(rows, dataset, ratios)]
    return "\n".join(lines)
