"""The quality benchmark: does AFM keep AUC, against every alternative a user would pick?

For each dataset, model and seed one original is trained to convergence (epochs selected
on a held-out tenth), analysed once (output statistics, spectra, the blocks' measured loss
sensitivity), and every variant is derived from it in memory, paired by seed (same
original, same data order):

    original      the converged model            original_ft  + the fine-tuning budget (the control)
    int8          its tables row-wise int8       afm          AFM factors, no training (tables in
                                                              the format the plan chose)
    afm_ft        + fine-tuned with labels       afm_act_ft   ReLU between factors (shifted to
                                                              start exact), fine-tuned
    afm_distill   + fine-tuned on the original's logits, no labels
    svd, svd_ft   weight SVD at the same ranks   scratch      the low-rank architecture trained
    afm_ft_int8   afm_ft planned and served with int8 tables      from scratch (original + fine-tune steps)

A variant is a :class:`Recipe` over shared steps (start from the original / from bases /
from random weights, fine-tune with labels / a teacher / the full budget, quantize).
Compressed variants are built at each target byte ratio under each rank selection: the
product's rank policies (:mod:`afmrec.pipeline.ranks`, with its defaults: ``auto`` table
format, rows padded for CUDA serving), so every number is what ``afmrec compress --ratio R
--policy P`` gives:

    loss      the default: byte budget, greedy on variance weighted by measured loss
              sensitivity (the probes of ``afmrec stats``, on the validation rows)
    variance  the same greedy on retained variance alone
    uniform   every block the same ratio smaller, the whole model at the target
    full      every block at full rank (a check: ``afm`` must equal ``original``)

Each run is one row (see :data:`COLUMNS`); :func:`paired_summary` gives the paired ΔAUC
(variant minus its own seed's original) per cell and :func:`check_targets` the targets of
the benchmark's issue, both computed on the rows alone.

The package, by concern:

* :mod:`.config`: the recipes of the variants, the grid and the training protocol.
* :mod:`.datasets`: each dataset's splits and protocol, and the published grid.
* :mod:`.variants`: one trained original (:class:`Cell`) and every variant built from it.
* :mod:`.grid`: the whole grid, one original at a time, and its table of rows.
* :mod:`.summary`: paired ΔAUC, the Markdown tables, the targets.
* :mod:`.plot`: the spectrum plots.

``afmrec bench quality`` (:mod:`afmrec.launch.bench_quality`) runs it.
"""

from .config import (COLUMNS, COMPRESSED, RECIPES, SELECTIONS, UNCOMPRESSED, DatasetPlan, GridConfig,
                     Protocol, Recipe, Splits)
from .datasets import (EVERY, PUBLISHED, SYNTH_TABLE_SIZES, ModelShape, dataset_plan, default_grid,
                       frappe_splits, parquet_splits, synthetic_splits)
from .grid import grid_ratios, learning_curve, run_cell, run_grid, write_rows
from .plot import plot_spectra
from .summary import (TARGETS, TargetResult, check_targets, format_delta_table, format_summary,
                      format_table_ranks, paired_deltas, paired_summary)
from .variants import (Cell, analyse_, build_variant, choose_ranks, fit_original, measure, model_config,
                       quantize_tables_, scratch_model, shift_activations_, train_original,
                       uncompressed_plan)

__all__ = [
    "COLUMNS", "COMPRESSED", "EVERY", "PUBLISHED", "RECIPES", "SELECTIONS", "SYNTH_TABLE_SIZES",
    "TARGETS", "UNCOMPRESSED", "Cell", "DatasetPlan", "GridConfig", "ModelShape", "Protocol",
    "Recipe", "Splits", "TargetResult", "analyse_", "build_variant", "check_targets",
    "choose_ranks", "dataset_plan", "default_grid", "fit_original", "format_delta_table",
    "format_summary", "format_table_ranks", "frappe_splits", "grid_ratios", "learning_curve",
    "measure", "model_config", "paired_deltas", "paired_summary", "parquet_splits",
    "plot_spectra", "quantize_tables_", "run_cell", "run_grid", "scratch_model",
    "shift_activations_", "synthetic_splits", "train_original", "uncompressed_plan", "write_rows",
]
