"""Batch compression: many checkpoints listed in a manifest, each in its own folder.

A manifest is a CSV or Parquet table with one row per checkpoint (:class:`BatchRow`
lists the columns). Relative paths in it are relative to the manifest's folder.
:func:`run_row` runs one row in its folder ``out``, a stage after the other::

    out/original/        (only with model_config) the checkpoint with its architecture
    out/stats.pt         statistics over the calibration data (resumable)
    out/compressed/      the compressed model (+ ranks.parquet, bases.pt)
    out/finetuned/       (with finetune data) the fine-tuned compressed model
    out/report.parquet   (with eval data) AUC, size and latency of every model
    out/stages.json      the key each finished stage was computed from
    out/result.json      the row's result, once it has finished

A stage's key hashes its settings and the names, sizes and modification times of its
input files, chained through the stages before it: a stage is skipped when its output
exists under the same key, and redone (with every later stage) when a setting or an
input changes. A row is finished when ``result.json`` holds the key of its last stage.
A row that fails reports why in its result and leaves the other rows alone.

:mod:`.manifest` reads the manifest (one :class:`BatchRow` a row); :mod:`.rows` runs a
row's stages and writes the results table.
"""

from .manifest import BatchRow, read_manifest
from .rows import (RESULT_SCHEMA, failed_result, finished_result, row_key, run_row, stage_keys,
                   write_results)

__all__ = [
    "RESULT_SCHEMA",
    "BatchRow",
    "failed_result",
    "finished_result",
    "read_manifest",
    "row_key",
    "run_row",
    "stage_keys",
    "write_results",
]
