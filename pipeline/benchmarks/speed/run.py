"""``afmrec bench speed``: the costs a user pays, each against its baseline, in one run.

The workload is a DLRM-DCNv2 in the MLPerf DLRMv2 shape (:mod:`.shape`: 26 tables of width 128, the Criteo-1TB cardinalities capped, multi-hot bags
of MLPerf's sizes, power-law ids); :meth:`SpeedShape.small` is the same structure scaled
down for CPU and CI. Every ratio is measured in the same process on the same device:

1. ``train_vs_torchrec``: our ``train_`` vs TorchRec's ``TrainPipelineSparseDist`` on the
   same model shape, optimizers and host batches (:mod:`.training`);
2. ``stats_vs_forward``: the statistics pass (``afmrec stats``' default precision,
   ``stats_precision``; :attr:`SpeedShape.stats_batches` batches) vs a forward-only pass
   over the same batches, and ``stats_vs_forward_{float32,bfloat16}``;
3. ``compress_vs_io``: load + plan + bases + shard-local fold + save of the checkpoint
   (AFM 4x) vs load + save of it with ``torch.distributed.checkpoint`` (lower is better);
4. inference (:mod:`afmrec.pipeline.benchmarks.speed.infer`): samples/s of the served variants
   (:mod:`afmrec.pipeline.benchmarks.speed.variants`: AFM at 4x and 8x fewer bytes under the default
   ``loss`` rank policy, calibrated on held-out batches; AFM 4x with int8 and fp16 tables;
   AFM 4x with ``--dense-ratio`` 2 and 4, fp32 and int8 tables; the original with int8
   and fp16 tables), each as its artifacts, with the kernels of
   ours measured faster for it (:mod:`afmrec.pipeline.kernel_choice`; the original gets
   the same offer), against the original's artifact (``_vs_original``, the headline)
   and against stock TorchRec serving (``_vs_stock_torchrec``); with ``profile``, the
   device time by kernel class and the lookups' bandwidth
   (:mod:`afmrec.pipeline.benchmarks.speed.profile`); and each artifact's AUC on held-out
   rows (``auc_*``, ``delta_auc_*``): the served model is first trained on labels from a
   hidden model (:mod:`afmrec.pipeline.benchmarks.speed.labels`, ``fit``), then
   calibrated; CPU latency of AFM 4x vs the original;
5. peak device memory of each stage.

Dense math runs in TF32 on CUDA for every variant alike. The record carries its own
provenance (:mod:`afmrec.pipeline.benchmarks.speed.record`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from afmrec.sharding.checkpoint import load_state_, save_state
from afmrec.sharding.dmp import shard_model, unwrap
from afmrec.sharding.env import DistEnv
from afmrec.sharding.plan import planner_plan

from afmrec.models import build_model

from ...bases import afm_bases
from ..stats_pass import passes, time_stats_vs_forward_batches
from ...blocks import find_blocks
from ...compress import CompressConfig
from ...errors import InputError
from ...evaluate import eval_mode
from ...model_io import ModelRecord, skeleton
from ...runinfo import fastest_interleaved, peak_memory_gib, reset_peak_memory, wall_seconds
from .infer import InferenceOptions, bench_cpu_latency, bench_inference, empty_cache
from .labels import PlantedLabels, fit_
from .profile import profile_to
from .record import precision, run_metadata
from .shape import SEEDS, SpeedShape, make_batches
from .training import TRAIN_CONFIG, bench_train
from .variants import POLICY, VARIANTS, Calibration, calibrate, inference_model, plan_variant
from ...stats import StatsCollector, resolve_precision
from ...train import train_

__all__ = ["STAGES", "SpeedShape", "make_batches", "run_speed", "InferenceOptions", "VARIANTS"]

STAGES = ("train", "stats", "compress", "inference", "cpu")
STATS_PRECISIONS = ("float32", "bfloat16")
"""The statistics pass is timed with each; ``stats_vs_forward`` is that of the default of
``afmrec stats`` (``--precision auto``: bfloat16 on CUDA, float32 on a CPU)."""


@dataclass
class Peak:
    """Peak device memory of each stage, in GiB (CUDA only)."""

    gib: dict[str, float] = field(default_factory=dict)

    def measure(self, name: str, device: torch.device, fn: Callable[[], Any]) -> Any:
        reset_peak_memory(device)
        out = fn()
        if (gib := peak_memory_gib(device)) is not None:
            self.gib[name] = gib
        return out


def bench_compress(model: nn.Module, record: ModelRecord, calibration: Calibration, workdir: Path,
                   device: torch.device) -> dict[str, float]:
    """Shard-local compression of the whole checkpoint (AFM 4x's plan) vs reading and
    writing it."""
    from ...stages import compress_sharded

    original, io_copy, compressed = workdir / "original", workdir / "io", workdir / "afm"
    save_state(model, original)

    def io() -> None:
        load_state_(model, original)
        save_state(model, io_copy)

    def compress() -> None:
        load_state_(model, original)
        bases = afm_bases(calibration.spectra, plan_variant(record, calibration, VARIANTS["afm4x"]).ranks)
        save_state(compress_sharded(model, record, bases, CompressConfig()), compressed)

    t_io, t_compress = wall_seconds(io, device), wall_seconds(compress, device)
    return {"io_s": t_io, "compress_s": t_compress, "compress_vs_io": t_compress / t_io}


def run_speed(shape: SpeedShape, env: DistEnv, *, stages: Sequence[str] = STAGES,
              workdir: Path | None = None, profile_dir: Path | None = None, aoti: bool = False,
              variants: Sequence[str] | None = None, profile: bool = False,
              on_stage: Callable[[dict[str, Any]], None] = lambda record: None) -> dict[str, Any]:
    """Runs the measurements of ``stages`` (a subset of :data:`STAGES`); returns the record
    that ``--json`` writes.

    ``train``, ``stats`` and ``compress`` run on the sharded model; ``inference`` (the
    served artifacts) and ``cpu`` (CPU latency) on one unsharded model, its AFM variants
    calibrated on held-out batches (:func:`~afmrec.pipeline.benchmarks.speed.variants.calibrate`).
    ``variants``: the inference stage's (of :data:`VARIANTS`; all if None; the original
    always). ``profile``: the kernel-class breakdown and lookup bandwidth of each served
    artifact. ``on_stage`` receives the record so far after each stage (a run cut short
    keeps what it measured).
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise InputError(f"unknown speed stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    options = InferenceOptions(tuple(variants) if variants is not None else tuple(VARIANTS), aoti, profile,
                               profile_dir)
    device = env.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    record = ModelRecord(shape.model_config())
    peak = Peak()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "run": run_metadata(device),
        "precision": precision(device),
        "rank_policy": POLICY,
        "shape": {**dataclasses.asdict(shape), "table_rows_total": sum(shape.table_rows)},
        "stages": [s for s in STAGES if s in stages],
    }
    on_stage(result)
    train_batches = make_batches(shape, shape.train_batch, 4, device, seed=SEEDS["train"])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if {"train", "stats", "compress"} & set(stages):
            _sharded_stages(shape, env, record, train_batches, stages, peak, result, Path(tmp), profile_dir, on_stage)
            empty_cache(device)
        if {"inference", "cpu"} & set(stages):
            model = inference_model(shape, device)
            labels = PlantedLabels.draw(shape, device) if shape.fit_steps else None
            result["fit"] = fit_(model, shape, labels, device) if labels is not None else {"fit_steps": 0}
            calibration = calibrate(model, record, shape, device)
            result["calibration"] = calibration.summary
            if "inference" in stages:
                evaluation = (list(labels.label(make_batches(shape, shape.infer_batch, shape.eval_batches, device,
                                                             seed=SEEDS["eval"]), SEEDS["eval"]))
                              if labels is not None else [])
                if evaluation:
                    result["auc_oracle"] = labels.oracle_auc(evaluation)
                result.update(bench_inference(model, record, calibration, shape, device, peak, Path(tmp), options,
                                              evaluation, on_variant=lambda out: on_stage({**result, **out})))
                del evaluation
                result["peak_memory_gib"] = peak.gib
                on_stage(result)
            if "cpu" in stages:
                result.update(bench_cpu_latency(model, record, calibration, shape, Path(tmp)))
    result["peak_memory_gib"] = peak.gib
    return result


def _sharded_stages(shape: SpeedShape, env: DistEnv, record: ModelRecord, train_batches: list[Batch],
                    stages: Sequence[str], peak: Peak, result: dict[str, Any], workdir: Path,
                    profile_dir: Path | None, on_stage: Callable[[dict[str, Any]], None]) -> None:
    """Training, statistics and compression on the model sharded by TorchRec's planner."""
    device = env.device
    blocks = find_blocks(skeleton(record))
    unsharded = build_model(record.model, device, sparse_device="meta")
    dmp = shard_model(unsharded, env, plan=planner_plan(unsharded, env, batch_size=shape.train_batch))
    if "train" in stages:
        result.update(peak.measure("train", device, lambda: bench_train(dmp, record, train_batches, shape, env)))
        empty_cache(device)  # the baseline's model is gone
        on_stage(result)
        if profile_dir is not None:
            profile_to(profile_dir / "profile_train_step.txt",
                       lambda: train_(dmp, train_batches[:1], TRAIN_CONFIG, progress=False), device,
                       f"one training step of train_, batch {shape.train_batch}")
    if "stats" in stages:
        # the statistics pass as SpeedShape.stats_batches defines it (the batches' content
        # does not change its cost: the training batches in turn)
        stats_batches = [train_batches[i % len(train_batches)] for i in range(shape.stats_batches)]
        for prec in STATS_PRECISIONS:
            timing = peak.measure("stats", device, lambda: time_stats_vs_forward_batches(
                dmp, blocks, stats_batches, env, repeats=shape.repeats, precision=prec))
            result.update({f"stats_vs_forward_{prec}": timing.ratio,
                           "forward_samples_per_s": timing.forward_samples_per_s,
                           f"stats_samples_per_s_{prec}": timing.stats_samples_per_s})
        result["stats_batches"] = shape.stats_batches
        result["stats_precision"] = resolve_precision("auto", device)
        result["stats_vs_forward"] = result[f"stats_vs_forward_{result['stats_precision']}"]
        on_stage(result)
        if profile_dir is not None:
            forward, _ = passes(dmp, blocks, train_batches[:1])
            out = profile_dir / "profile_stats.txt"
            profile_to(out, forward, device, f"forward-only pass over one batch of {shape.train_batch}")
            for prec in STATS_PRECISIONS:
                # in a pass over many batches (the steady state), the update is a replayed
                # graph: profile_to's warm-up call captures it, the profiled call replays it
                with eval_mode(dmp), torch.no_grad(), StatsCollector(unwrap(dmp), blocks, device, prec):
                    forward()  # a shape's first batch runs eagerly
                    profile_to(out, forward, device,
                               f"statistics pass ({prec} Gram products) over one batch of {shape.train_batch}",
                               rows=40)
    if "compress" in stages:
        calibration = calibrate(unwrap(dmp), record, shape, device, forward=dmp)
        result.update(peak.measure("compress", device, lambda: bench_compress(
            dmp, record, calibration, workdir, device)))
        on_stage(result)
