"""The spectrum plots of the quality benchmark (matplotlib, the ``bench`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from afmrec.pipeline.bases import Spectrum
from afmrec.pipeline.blocks import Block


def plot_spectra(spec: Mapping[str, Spectrum], blocks: Sequence[Block], path: Path, title: str) -> None:
    """Retained variance against rank for every table and Linear layer (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ("table", "linear")):
        for b in blocks:
            ev = spec[b.name].eigenvalues
            if b.kind != kind or b.out_features == 1 or float(ev.sum()) <= 0:
                continue  # nothing to truncate
            retained = (ev.cumsum(0) / ev.sum()).numpy()
            label = b.table if kind == "table" else b.name.removesuffix("._linear")
            ax.plot(np.arange(1, len(retained) + 1), retained, marker=".", ms=3, label=f"{label} ({b.in_features}x{b.out_features})" if kind == "linear" else f"{label} ({b.in_features} rows)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank k")
        ax.set_title("tables" if kind == "table" else "Linear layers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("retained output variance")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
