"""``afmrec bench speed``: the four costs a user pays, each against its baseline, in one run.

The workload is a DLRM-DCNv2 in the MLPerf DLRMv2 shape (26 tables of width 128 with the
Criteo-1TB cardinalities capped, multi-hot bags of MLPerf's per-table sizes, dense arch
512-256-128, over arch 1024-1024-512-256-1, 3 low-rank cross layers of rank 512), fed
with power-law ids. :meth:`SpeedShape.small` is the same structure scaled down for CPU
and CI. Every ratio is measured in the same process on the same device:

1. ``train_vs_torchrec``: our ``train_`` vs a plain TorchRec DMP loop (same model,
   optimizers and batches);
2. ``stats_vs_forward``: the statistics pass (``afmrec stats``' default precision,
   ``stats_precision``) vs a forward-only pass, and ``stats_vs_forward_{float32,bfloat16}``,
   the pass with each Gram precision;
3. ``compress_vs_io``: load + bases + shard-local fold + save of the checkpoint vs load +
   save of the same checkpoint with ``torch.distributed.checkpoint`` (lower is better);
4. inference samples/s of AFM at 4x and 8x fewer parameters, TorchRec int8 tables, AFM
   4x + int8, fp16 tables and AFM 4x + fp16, each over the original, each timed as the
   serving artifacts that ``afmrec export`` writes (FBGEMM's inference kernels;
   TorchScript, and with ``aoti`` on CUDA AOTInductor, where an AFM model's cross network
   is computed from its codes and rows of up to 128 bytes are pooled by our lookup
   kernel), loaded back as a server would, a variant's faster artifact against the
   original's faster one; the eager module they came from is timed beside them (on CUDA
   an AFM one also with our kernels, ``eager_fused``), and the device
   time of a batch of each. CPU latency of AFM 4x vs the original, artifacts again;
5. peak device memory of each stage.

Dense math runs in TF32 on CUDA for every variant alike.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import ModelConfig, TableSpec, build_model
from afmrec.models.serving import use_kernels_
from afmrec.sharding.checkpoint import load_state_, save_state
from afmrec.sharding.dmp import shard_model, unwrap
from afmrec.sharding.env import DistEnv
from afmrec.sharding.plan import planner_plan

from .bases import afm_bases, spectra
from .bench import passes, time_stats_vs_forward_batches
from .blocks import find_blocks
from .compress import CompressConfig, compress_
from .errors import InputError
from .evaluate import eval_mode, measure_latencies
from .export import SUFFIX, ServingModule, TableDtype, call, load_artifact, serving_module, write_artifact
from .model_io import ModelRecord, skeleton
from .ranks import RankConfig
from .stats import StatsCollector, collect_statistics, resolve_precision
from .runinfo import fastest_interleaved, peak_memory_gib, reset_peak_memory, synchronize, wall_seconds
from .train import TrainConfig, make_optimizer, train_

# MLPerf DLRMv2 (Criteo 1TB multi-hot): rows and bag size of each of the 26 tables.
CRITEO_1TB_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)
MLPERF_BAG_SIZES = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)


@dataclass(frozen=True)
class SpeedShape:
    """The benchmark's model and batch shape."""

    table_cap: int = 4_000_000
    embedding_dim: int = 128
    num_dense: int = 13
    dense_arch: tuple[int, ...] = (512, 256, 128)
    over_arch: tuple[int, ...] = (1024, 1024, 512, 256, 1)
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 512
    train_batch: int = 8192
    infer_batch: int = 65536
    latency_batches: tuple[int, ...] = (1, 64, 2048)
    zipf_exponent: float = 1.1
    steps: int = 50
    stats_batches: int = 200
    """Batches of the timed statistics pass (and of its forward-only baseline). A pass over
    a dataset runs thousands; its set-up (the first batch runs eagerly, the second captures
    the update's CUDA graph) costs a few batches' time once, which over 50 batches still
    showed: 0.84 on an H200, against 0.98 over 200 (bench/speed_h200_r_stats50.json and
    stats200.json)."""

    @classmethod
    def small(cls) -> "SpeedShape":
        """The same structure at a size a 2-core CPU runs in about a minute."""
        return cls(table_cap=20_000, embedding_dim=64, dense_arch=(128, 64), over_arch=(128, 64, 1),
                   dcn_low_rank_dim=32, train_batch=1024, infer_batch=4096, steps=6, stats_batches=6)

    @property
    def table_rows(self) -> tuple[int, ...]:
        return tuple(min(n, self.table_cap) for n in CRITEO_1TB_ROWS)

    def model_config(self) -> ModelConfig:
        tables = tuple(TableSpec(f"t{i}", n) for i, n in enumerate(self.table_rows))
        return ModelConfig("dcn", tables, num_dense=self.num_dense, embedding_dim=self.embedding_dim,
                           dense_arch=self.dense_arch, over_arch=self.over_arch,
                           dcn_num_layers=self.dcn_num_layers, dcn_low_rank_dim=self.dcn_low_rank_dim)


def make_batches(shape: SpeedShape, batch_size: int, count: int, device: torch.device,
                 seed: int = 0) -> list[Batch]:
    """``count`` batches of multi-hot bags (MLPerf bag sizes) with power-law ids.

    A table's ids are its popularity ranks scattered by a multiplicative hash (a
    bijection of the table's rows), so hot rows are spread over the table.
    """
    from .data.synth import _zipf_ranks

    rng = np.random.default_rng(seed)
    keys = [t.name for t in shape.model_config().tables]
    out = []
    for _ in range(count):
        values, lengths = [], []
        for rows, bag in zip(shape.table_rows, MLPERF_BAG_SIZES):
            ranks = _zipf_ranks(rng, rows, batch_size * bag, shape.zipf_exponent)
            values.append((ranks * 2654435761) % rows)
            lengths.append(np.full(batch_size, bag))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)).int(),
        )
        dense = torch.from_numpy(rng.standard_normal((batch_size, shape.num_dense), dtype=np.float32))
        labels = torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32))
        out.append(Batch(dense, kjt, labels).to(device))
    return out


def _empty_cache(device: torch.device) -> None:
    gc.collect()  # modules in reference cycles hold device memory until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def plain_torchrec_loop(model: nn.Module, batches: list[Batch], steps: int) -> None:
    """The loop a TorchRec user writes: forward, BCE, backward, step (dense Adam; the fused
    tables update inside backward)."""
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for i in range(steps):
        b = batches[i % len(batches)]
        loss = loss_fn(model(b.dense_features, b.sparse_features).squeeze(1), b.labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def bench_train(model: nn.Module, batches: list[Batch], shape: SpeedShape, device: torch.device,
                repeats: int = 3) -> dict[str, float]:
    """Our ``train_`` vs :func:`plain_torchrec_loop`, ``shape.steps`` steps each, interleaved
    ``repeats`` times, the fastest of each kept (other load on the machine affects both
    alike)."""
    rows = shape.steps * shape.train_batch
    cycle = [batches[i % len(batches)] for i in range(shape.steps)]
    plain_torchrec_loop(model, batches, 2)  # warm-up
    base, ours = fastest_interleaved(
        [lambda: plain_torchrec_loop(model, batches, shape.steps),
         lambda: train_(model, cycle, TrainConfig(log_every=10**9), progress=False)], device, repeats=repeats)
    return {"train_samples_per_s": rows / ours, "torchrec_train_samples_per_s": rows / base,
            "train_vs_torchrec": base / ours}


def bench_compress(model: nn.Module, record: ModelRecord, stats: Any, workdir: Path,
                   device: torch.device) -> dict[str, float]:
    """Shard-local compression of the whole checkpoint vs reading and writing it."""
    from .stages import _compress_sharded

    original, io_copy, compressed = workdir / "original", workdir / "io", workdir / "afm"
    save_state(model, original)

    def io() -> None:
        load_state_(model, original)
        save_state(model, io_copy)

    def compress() -> None:
        load_state_(model, original)
        bases = _bases(unwrap(model), stats, record, ratio=4.0)
        save_state(_compress_sharded(model, record, bases, CompressConfig()), compressed)

    t_io, t_compress = wall_seconds(io, device), wall_seconds(compress, device)
    return {"io_s": t_io, "compress_s": t_compress, "compress_vs_io": t_compress / t_io}


def _bases(model: nn.Module, stats: Any, record: ModelRecord, ratio: float, policy: str = "variance"):
    """AFM bases of the whole model ``ratio`` times smaller in fp32 bytes, ranks by
    ``policy`` (:mod:`afmrec.pipeline.ranks`; ``loss`` needs statistics with probes),
    Linear ranks multiples of 8 (aligned tensor-core GEMMs)."""
    from .stages import plan_ranks, with_weights

    spec = spectra(stats)
    # the small (test) shape's layers step coarsely in units of 8: its variants may miss the
    # target by more than a user's plan may
    config = with_weights(RankConfig(policy=policy, ratio=ratio, table_format="fp32", linear_multiple=8,
                                     tolerance=0.5), stats)
    _, plan = plan_ranks(record, spec, config)
    return afm_bases(spec, plan.ranks)


VARIANTS: dict[str, tuple[float | None, TableDtype]] = {
    "original": (None, "fp32"),
    "afm4x": (4.0, "fp32"),
    "afm8x": (8.0, "fp32"),
    "int8": (None, "int8"),
    "afm4x_int8": (4.0, "int8"),
    "fp16": (None, "fp16"),
    "afm4x_fp16": (4.0, "fp16"),
}
"""The served variants: each one's AFM ratio (None: the original model) and the row
format of its tables (:func:`inference_variants`)."""


def inference_variants(
    model: nn.Module, stats: Any, record: ModelRecord
) -> dict[str, Callable[[], tuple[nn.Module, TableDtype]]]:
    """Builders of the served :data:`VARIANTS`: the float module and the row format of its
    tables.

    AFM variants make every block (tables, MLP layers, cross layers) ``ratio`` times
    smaller (the ``uniform`` rank policy): the whole model is then 4x (8x) smaller and
    the dense work shrinks with it. Built one at a time, since each holds its own tables.
    """

    def build(ratio: float | None, tables: TableDtype) -> tuple[nn.Module, TableDtype]:
        if ratio is None:
            return model, tables
        bases = _bases(model, stats, record, ratio, "uniform")
        return compress_(copy.deepcopy(model), bases, CompressConfig()), tables

    return {name: functools.partial(build, *spec) for name, spec in VARIANTS.items()}


def exported(served: ServingModule, config: ModelConfig, path: Path,
             device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Writes a serving module's artifact (what ``afmrec export`` writes) and loads it back
    as a server would: what the inference benchmark times."""
    write_artifact(served, config, path, check_batch=0, overwrite=True)
    return load_artifact(path, device)


def samples_per_s(module: nn.Module, batches: list[Batch], device: torch.device, repeats: int = 5) -> float:
    """Best of ``repeats`` passes over ``batches`` of a serving module (plain-tensor forward)."""
    for b in (batches * 3)[:3]:  # TorchScript's profiling executor optimises on the 2nd-3rd call
        call(module, b)
    best = min(wall_seconds(lambda: [call(module, b) for b in batches], device) for _ in range(repeats))
    return sum(b.labels.numel() for b in batches) / best


def profile_to(path: Path, fn: Callable[[], Any], device: torch.device, title: str, rows: int = 25) -> None:
    """Appends torch.profiler's table of the ops and kernels of one call of ``fn`` to
    ``path``, under ``title``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm
    synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sum(e.count for e in prof.key_averages())
    with open(path, "a") as f:
        f.write(f"## {title} ({ops} profiler events)\n")
        f.write(prof.key_averages().table(sort_by=key, row_limit=rows) + "\n\n")


AOTI_VARIANTS = ("original", "afm4x", "afm8x", "afm4x_int8", "afm4x_fp16")
"""Variants also exported in the ``aoti`` format when asked (``--aoti``): AOTInductor's
compile of each takes a minute at the production shape."""


def gpu_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of device work (the kernels' and copies' own time, torch.profiler) of
    one call of ``fn``, after a warm-up call: what the call costs without the host's gaps."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def bench_inference(model: nn.Module, stats: Any, record: ModelRecord, shape: SpeedShape,
                    device: torch.device, peak: Peak, workdir: Path,
                    profile_dir: Path | None = None, aoti: bool = False,
                    only: Sequence[str] | None = None) -> dict[str, Any]:
    """Samples/s of each variant's exported artifacts (TorchScript; with ``aoti`` on CUDA
    also AOTInductor, which computes the AFM cross network from the codes and pools narrow
    rows with our lookup kernel) and of the eager module they came from, plain and (AFM,
    CUDA) with our kernels (``eager_fused``: :func:`afmrec.models.serving.use_kernels_`);
    the device time of a batch of each; the artifacts' sizes.

    ``infer_{name}_samples_per_s`` is the faster of a variant's artifacts (its format in
    ``infer_format_{name}``), ``infer_{name}_vs_original`` its ratio to the original's
    faster artifact; ``infer_{format}_{name}_samples_per_s`` each artifact's own. ``only``:
    the variants to time (:func:`inference_variants`' names; the original is always
    timed, as every ratio's base)."""
    batches = make_batches(shape, shape.infer_batch, 3, device, seed=1)
    features = [t.name for t in record.model.tables]
    rows = [t.num_embeddings for t in record.model.tables]
    out: dict[str, Any] = {}
    variants = inference_variants(model, stats, record)
    if only is not None:
        variants = {k: v for k, v in variants.items() if k == "original" or k in only}
    cuda = device.type == "cuda"
    for name, build in variants.items():
        module, tables = build()
        formats = ["torchscript"] + (["aoti"] if aoti and cuda and name in AOTI_VARIANTS else [])
        # A compressed variant is a fresh copy: convert it in place (one copy of the tables
        # fewer on the device); the original is needed again.
        eager = serving_module(module, features, tables, inplace=module is not model, fuse_cross=cuda, rows=rows)
        out[f"params_{name}"] = eager.params
        del module
        fused = getattr(eager.model, "fused", None) is not None
        forms = {"eager": False, "eager_fused": True} if fused else {"eager": False}
        for form, use_fused in forms.items():
            if fused:
                use_kernels_(eager, use_fused)
            out[f"infer_{form}_{name}_samples_per_s"] = samples_per_s(eager, batches, device)
            if cuda:
                out[f"gpu_ms_{form}_{name}"] = gpu_ms(lambda: call(eager, batches[0]), device)
            if use_fused:
                out[f"eager_fused_vs_plain_max_abs_diff_{name}"] = (call(eager, batches[0]) - want).abs().max().item()
                if profile_dir is not None:
                    profile_to(profile_dir / "profile_infer.txt", lambda: call(eager, batches[0]), device,
                               f"inference, {name} eager module with our kernels, batch {shape.infer_batch}")
            else:
                want = call(eager, batches[0])
        paths = {}
        for fmt in formats:
            paths[fmt] = workdir / f"{name}{SUFFIX[fmt]}"
            write_artifact(eager, record.model, paths[fmt], check_batch=0, overwrite=True, format=fmt)
        del eager
        _empty_cache(device)
        for fmt, path in paths.items():
            key = f"{fmt}_{name}"
            artifact, meta = load_artifact(path, device)
            out[f"artifact_mib_{key}"] = path.stat().st_size / 2**20
            out[f"artifact_cross_{key}"] = meta["cross"]
            out[f"artifact_vs_eager_max_abs_diff_{key}"] = (call(artifact, batches[0]) - want).abs().max().item()
            out[f"infer_{key}_samples_per_s"] = peak.measure(
                f"infer_{key}", device, lambda: samples_per_s(artifact, batches, device))
            if cuda:
                out[f"gpu_ms_{key}"] = gpu_ms(lambda: call(artifact, batches[0]), device)
            if profile_dir is not None:
                profile_to(profile_dir / "profile_infer.txt", lambda: call(artifact, batches[0]), device,
                           f"inference, {name} {fmt} artifact, batch {shape.infer_batch}")
            del artifact
            path.unlink()
            _empty_cache(device)
        best = max(formats, key=lambda fmt: out[f"infer_{fmt}_{name}_samples_per_s"])
        out[f"infer_format_{name}"] = best
        out[f"infer_{name}_samples_per_s"] = out[f"infer_{best}_{name}_samples_per_s"]
        out[f"artifact_mib_{name}"] = out[f"artifact_mib_{best}_{name}"]
        out[f"artifact_vs_eager_max_abs_diff_{name}"] = out[f"artifact_vs_eager_max_abs_diff_{best}_{name}"]
    base = out["infer_original_samples_per_s"]
    for name in variants:
        if name != "original":
            out[f"infer_{name}_vs_original"] = out[f"infer_{name}_samples_per_s"] / base
        if f"infer_eager_fused_{name}_samples_per_s" in out:
            out[f"infer_eager_fused_{name}_vs_original"] = out[f"infer_eager_fused_{name}_samples_per_s"] / base
            out[f"gpu_time_eager_fused_{name}_vs_original"] = (
                out[f"gpu_ms_{out['infer_format_original']}_original"] / out[f"gpu_ms_eager_fused_{name}"])
    return out


def bench_cpu_latency(model: nn.Module, stats: Any, record: ModelRecord, shape: SpeedShape,
                      workdir: Path) -> dict[str, Any]:
    """Milliseconds per call of the CPU artifact, original vs AFM 4x, at each latency batch
    (medians of 7 calls, the two models called in turn)."""
    cpu = torch.device("cpu")
    cpu_model = copy.deepcopy(model).cpu()
    variants = {"original": cpu_model,
                "afm4x": compress_(copy.deepcopy(cpu_model), _bases(cpu_model, stats, record, 4.0, "uniform"),
                                   CompressConfig())}
    served = {}
    for name in list(variants):
        eager = serving_module(variants.pop(name), [t.name for t in record.model.tables], inplace=True)
        served[name] = exported(eager, record.model, workdir / f"cpu_{name}.pt", cpu)[0]
        del eager
    del cpu_model
    out: dict[str, Any] = {"cpu_threads": torch.get_num_threads()}
    for b in shape.latency_batches:
        batch = make_batches(shape, b, 1, cpu, seed=2)[0]
        # TorchScript re-profiles and re-optimises for every new batch shape: three warm-up
        # calls each; then the two models in turn (the host's load drifts)
        ms = measure_latencies(served, batch, warmup=3, repeats=7, run=call)
        out.update({f"cpu_ms_{name}_b{b}": ms[name] for name in served})
        out[f"cpu_latency_afm4x_vs_original_b{b}"] = out[f"cpu_ms_original_b{b}"] / out[f"cpu_ms_afm4x_b{b}"]
    out["cpu_latency_afm4x_vs_original"] = out[f"cpu_latency_afm4x_vs_original_b{shape.latency_batches[-1]}"]
    return out


STAGES = ("train", "stats", "compress", "inference", "cpu")
STATS_PRECISIONS = ("float32", "bfloat16")
"""The statistics pass is timed with each; ``stats_vs_forward`` is that of the default of
``afmrec stats`` (``--precision auto``: bfloat16 on CUDA, float32 on a CPU)."""


def run_speed(shape: SpeedShape, env: DistEnv, *, stages: Sequence[str] = STAGES,
              workdir: Path | None = None, profile_dir: Path | None = None, aoti: bool = False,
              variants: Sequence[str] | None = None,
              on_stage: Callable[[dict[str, Any]], None] = lambda record: None) -> dict[str, Any]:
    """Runs the measurements of ``stages`` (a subset of :data:`STAGES`); returns the record
    that ``--json`` writes.

    ``train``, ``stats`` and ``compress`` run on the sharded model; ``inference`` (the GPU
    artifacts) and ``cpu`` (CPU latency) on one unsharded model, compressed with AFM bases
    from its own statistics. ``variants``: the inference stage's variants (of
    :data:`VARIANTS`; all if None; the original always). ``on_stage`` receives the record
    so far after each stage (a run cut short keeps what it measured).
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise InputError(f"unknown speed stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    unknown = set(variants or ()) - set(VARIANTS)
    if unknown:
        raise InputError(f"unknown inference variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    device = env.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    config = shape.model_config()
    record = ModelRecord(config)
    peak = Peak()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": {**dataclasses.asdict(shape), "table_rows_total": sum(shape.table_rows)},
        "versions": _versions(),
        "stages": [s for s in STAGES if s in stages],
    }
    train_batches = make_batches(shape, shape.train_batch, 4, device)
    blocks = find_blocks(skeleton(record))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if {"train", "stats", "compress"} & set(stages):
            _sharded_stages(shape, env, record, blocks, train_batches, stages, peak, result,
                            Path(tmp), profile_dir, on_stage)
            _empty_cache(device)
        if {"inference", "cpu"} & set(stages):
            model = build_model(config, device).eval()
            stats = collect_statistics(model, blocks, train_batches)
            if "inference" in stages:
                result.update(bench_inference(model, stats, record, shape, device, peak, Path(tmp),
                                              profile_dir, aoti, variants))
                result["peak_memory_gib"] = peak.gib
                on_stage(result)
            if "cpu" in stages:
                result.update(bench_cpu_latency(model, stats, record, shape, Path(tmp)))
    result["peak_memory_gib"] = peak.gib
    return result


def _sharded_stages(shape: SpeedShape, env: DistEnv, record: ModelRecord, blocks: list,
                    train_batches: list[Batch], stages: Sequence[str], peak: Peak,
                    result: dict[str, Any], workdir: Path, profile_dir: Path | None,
                    on_stage: Callable[[dict[str, Any]], None]) -> None:
    """Training, statistics and compression on the model sharded by TorchRec's planner."""
    device = env.device
    unsharded = build_model(record.model, device, sparse_device="meta")
    dmp = shard_model(unsharded, env, plan=planner_plan(unsharded, env, batch_size=shape.train_batch))
    if "train" in stages:
        result.update(peak.measure("train", device, lambda: bench_train(dmp, train_batches, shape, device)))
        on_stage(result)
        if profile_dir is not None:
            profile_to(profile_dir / "profile_train_step.txt",
                       lambda: plain_torchrec_loop(dmp, train_batches, 1), device,
                       f"one training step, batch {shape.train_batch}")
    if "stats" in stages:
        # enough batches that the pass's set-up is not what it costs per batch (stats_batches)
        stats_batches = [train_batches[i % len(train_batches)] for i in range(shape.stats_batches)]
        for precision in STATS_PRECISIONS:
            timing = peak.measure("stats", device, lambda: time_stats_vs_forward_batches(
                dmp, blocks, stats_batches, env, repeats=3, precision=precision))
            result.update({f"stats_vs_forward_{precision}": timing.ratio,
                           "forward_samples_per_s": timing.forward_samples_per_s,
                           f"stats_samples_per_s_{precision}": timing.stats_samples_per_s})
        result["stats_precision"] = resolve_precision("auto", device)
        result["stats_vs_forward"] = result[f"stats_vs_forward_{result['stats_precision']}"]
        on_stage(result)
        if profile_dir is not None:
            forward, _ = passes(dmp, blocks, train_batches[:1])
            out = profile_dir / "profile_stats.txt"
            profile_to(out, forward, device, f"forward-only pass over one batch of {shape.train_batch}")
            for precision in STATS_PRECISIONS:
                # in a pass over many batches (the steady state), the update is a replayed
                # graph: profile_to's warm-up call captures it, the profiled call replays it
                with eval_mode(dmp), torch.no_grad(), StatsCollector(unwrap(dmp), blocks, device, precision):
                    forward()  # a shape's first batch runs eagerly
                    profile_to(out, forward, device,
                               f"statistics pass ({precision} Gram products) over one batch of {shape.train_batch}",
                               rows=40)
    if "compress" in stages:
        stats = collect_statistics(unwrap(dmp), blocks, train_batches, forward=dmp)
        result.update(peak.measure("compress", device, lambda: bench_compress(
            dmp, record, stats, workdir, device)))
        on_stage(result)


def _versions() -> dict[str, str]:
    from .artifacts import versions

    return versions()
