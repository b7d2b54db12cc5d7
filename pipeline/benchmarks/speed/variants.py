"""The served variants of the speed benchmark, made as a user makes them: the product's
default rank policy (``loss``) at a whole-model byte ratio, calibrated on held-out
synthetic batches of the benchmark's own shape.

The calibration is ``afmrec stats``' (:func:`~afmrec.pipeline.stats.collect_statistics`
over :attr:`SpeedShape.stats_batches` batches, then the loss probes of
:func:`~afmrec.pipeline.sensitivity.measure_sensitivity` over
:attr:`SpeedShape.probe_rows` other rows, recorded in the statistics as ``afmrec stats``
records them), and a variant's ranks are ``afmrec compress``' (:func:`~afmrec.pipeline.
stages.with_weights` and :func:`~afmrec.pipeline.stages.plan_ranks`, which call
:func:`~afmrec.pipeline.ranks.select_ranks`), with its tables planned and served in the
variant's row format, rows counted as FBGEMM's CUDA kernels pad them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from afmrec.models import build_model

from ...bases import Spectrum, afm_bases, spectra
from ...blocks import find_blocks
from ...compress import CompressConfig, compress_
from ...export import TableDtype
from ...model_io import ModelRecord, skeleton
from ...ranks import RankConfig, RankPlan
from ...sensitivity import SensitivityConfig, measure_sensitivity, probes_to_records
from .shape import SEEDS, SpeedShape, iter_batches
from ...stages import plan_ranks, with_weights
from ...stats import Statistics, collect_statistics

POLICY = "loss"
"""The rank policy of every AFM variant: the product's default (``afmrec compress``)."""

LINEAR_MULTIPLE = 8
"""Linear ranks are multiples of this (``afmrec compress --linear-multiple 8``: aligned
tensor-core GEMMs on a GPU)."""

SERVE_DEVICE = "cuda"
"""Rows are counted as FBGEMM's CUDA kernels pad them (16 bytes), ``--serve-device cuda``."""


@dataclass(frozen=True)
class VariantSpec:
    """A served variant.

    Attributes:
        name: its key in the record.
        ratio: the whole-model byte ratio its ranks are planned for (None: the original,
            uncompressed).
        tables: the row format its tables are served in (and, for an AFM variant, planned
            in).
        dense_ratio: ``afmrec compress --dense-ratio``: the Linear layers at least this
            many times smaller (and fewer multiply-adds), None: the byte budget alone.
    """

    name: str
    ratio: float | None
    tables: TableDtype
    dense_ratio: float | None = None


VARIANTS: dict[str, VariantSpec] = {v.name: v for v in (
    VariantSpec("original", None, "fp32"),
    VariantSpec("afm4x", 4.0, "fp32"),
    VariantSpec("afm8x", 8.0, "fp32"),
    VariantSpec("int8", None, "int8"),
    VariantSpec("afm4x_int8", 4.0, "int8"),
    VariantSpec("fp16", None, "fp16"),
    VariantSpec("afm4x_fp16", 4.0, "fp16"),
    VariantSpec("afm4x_dense2", 4.0, "fp32", dense_ratio=2.0),
    VariantSpec("afm4x_dense4", 4.0, "fp32", dense_ratio=4.0),
    VariantSpec("afm4x_int8_dense4", 4.0, "int8", dense_ratio=4.0),
)}


@dataclass
class Calibration:
    """What the AFM variants are planned and built from.

    Attributes:
        stats: the statistics pass's moments, the loss probes in ``meta["sensitivity"]``
            (as ``afmrec stats`` records them).
        spectra: each block's output spectrum.
        summary: the pass's definition (batches, rows, seeds, probes), for the record.
    """

    stats: Statistics
    spectra: dict[str, Spectrum]
    summary: dict[str, Any] = field(default_factory=dict)


def inference_model(shape: SpeedShape, device: torch.device, seed: int = 0) -> nn.Module:
    """The unsharded model the inference and CPU stages serve (seeded: a test rebuilds it)."""
    torch.manual_seed(seed)
    return build_model(shape.model_config(), device).eval()


def calibrate(model: nn.Module, record: ModelRecord, shape: SpeedShape, device: torch.device,
              forward: nn.Module | None = None) -> Calibration:
    """The statistics pass (``shape.stats_batches`` batches of ``shape.train_batch`` rows)
    and the loss probes (``shape.probe_rows`` rows) on batches held out from every timed
    batch (:data:`~afmrec.pipeline.benchmarks.speed.shape.SEEDS`). ``forward``: the module to run, if
    not ``model`` (a ``DistributedModelParallel`` wrapping it)."""
    blocks = find_blocks(skeleton(record))
    stats = collect_statistics(model, blocks, iter_batches(shape, shape.train_batch, shape.stats_batches, device,
                                                           SEEDS["calibration"]), forward=forward)
    spec = spectra(stats)
    sensitivity = SensitivityConfig(rows=shape.probe_rows)
    probe_batch = min(shape.train_batch, shape.probe_rows)
    probe_batches = iter_batches(shape, probe_batch, math.ceil(shape.probe_rows / probe_batch), device,
                                 SEEDS["probes"])
    probes = measure_sensitivity(model, blocks, spec, probe_batches, sensitivity, forward=forward)
    stats.meta["sensitivity"] = {
        "data": f"synthetic batches, seed {SEEDS['probes']}",
        "rows": probe_batch * math.ceil(shape.probe_rows / probe_batch),
        "energies": list(sensitivity.energies),
        "floor": sensitivity.floor,
        "probes": probes_to_records(probes),
    }
    summary = {"stats_batches": shape.stats_batches, "stats_batch_rows": shape.train_batch,
               "stats_rows": shape.stats_batches * shape.train_batch, "stats_seed": SEEDS["calibration"],
               "probe_rows": stats.meta["sensitivity"]["rows"], "probe_seed": SEEDS["probes"],
               "probes": len(probes), "blocks": len(blocks)}
    return Calibration(stats, spec, summary)


def rank_config(spec: VariantSpec) -> RankConfig:
    """The rank policy of an AFM variant, as ``afmrec compress --ratio R --table-format F
    --serve-device cuda --linear-multiple 8 [--dense-ratio R']`` states it (before the
    probes' weights)."""
    return RankConfig(policy=POLICY, ratio=spec.ratio, table_format=spec.tables, serve_device=SERVE_DEVICE,
                      linear_multiple=LINEAR_MULTIPLE, dense_ratio=spec.dense_ratio)


def plan_variant(record: ModelRecord, calibration: Calibration, spec: VariantSpec) -> RankPlan:
    """An AFM variant's plan: ``afmrec compress``' planning on the calibration."""
    config = with_weights(rank_config(spec), calibration.stats, "the speed benchmark's calibration")
    _, plan = plan_ranks(record, calibration.spectra, config)
    return plan


def plan_summary(spec: VariantSpec, plan: RankPlan | None) -> dict[str, Any]:
    """What the record keeps of a variant's plan: policy, target and achieved byte ratios
    (and Linear-layer ratios), table format and every block's rank."""
    if plan is None:
        return {"policy": None, "table_format": spec.tables}
    config = rank_config(spec)
    return {"policy": config.policy, "target_ratio": spec.ratio, "ratio": plan.ratio,
            "table_format": plan.table_format.dtype, "serve_device": plan.table_format.serve_device,
            "linear_multiple": config.linear_multiple, "tolerance": config.tolerance,
            "target_dense_ratio": spec.dense_ratio, "dense_ratio": plan.dense_ratio,
            "bytes": plan.bytes, "original_bytes": plan.original_bytes, "ranks": dict(sorted(plan.ranks.items()))}


def build_variant(model: nn.Module, record: ModelRecord, calibration: Calibration | None,
                  spec: VariantSpec) -> tuple[nn.Module, RankPlan | None]:
    """The float module of a variant (``model`` itself for an uncompressed one; a
    compressed copy otherwise) and its plan."""
    if spec.ratio is None:
        return model, None
    plan = plan_variant(record, calibration, spec)
    bases = afm_bases(calibration.spectra, plan.ranks)
    return compress_(copy.deepcopy(model), bases, CompressConfig()), plan
