"""The speed benchmark's serving stages: the served variants' artifacts on the device,
each against the original's (equal treatment, :mod:`afmrec.pipeline.kernel_choice`) and
against stock TorchRec serving (the original's TorchScript artifact: FBGEMM's tables, no
kernel of ours), and CPU latency."""

from __future__ import annotations

import copy
import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from afmrec.models.serving import use_kernels_

from ...errors import InputError
from ...evaluate import batches_auc, measure_latencies
from ...export import SUFFIX, call, load_artifact, serving_module, write_artifact
from ...model_io import ModelRecord
from ...runinfo import wall_seconds
from ...kernel_choice import KernelChoice, choose_kernels
from .profile import breakdown, gpu_ms, kernel_times, lookup_bytes, profile_to
from .shape import SEEDS, SpeedShape, make_batches
from .variants import VARIANTS, Calibration, VariantSpec, build_variant, plan_summary


@dataclass(frozen=True)
class InferenceOptions:
    """What the inference stage times.

    Attributes:
        variants: names of :data:`~afmrec.pipeline.benchmarks.speed.variants.VARIANTS` (the original
            is always timed: every ratio's base).
        aoti: on CUDA, also write and time each variant's AOTInductor artifact (about a
            minute's compile each at the production shape).
        profile: the device time of a batch of each variant's faster artifact by kernel
            class, and the lookups' bandwidth (:func:`~afmrec.pipeline.benchmarks.speed.profile.breakdown`).
        profile_dir: where torch.profiler's tables go (None: none written).
    """

    variants: tuple[str, ...] = tuple(VARIANTS)
    aoti: bool = False
    profile: bool = False
    profile_dir: Path | None = None

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise InputError(f"unknown inference variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")


def empty_cache(device: torch.device) -> None:
    """Gives a dropped variant's device memory back (CUDA only: modules in reference
    cycles hold it until collected)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def samples_per_s(module: nn.Module, batches: list[Batch], device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` passes over ``batches`` of a serving module (plain-tensor
    forward), after three warm-up calls (TorchScript's profiling executor optimises on the
    2nd-3rd; the lookup kernel autotunes on its first)."""
    for b in (batches * 3)[:3]:
        call(module, b)
    best = min(wall_seconds(lambda: [call(module, b) for b in batches], device) for _ in range(repeats))
    return sum(b.labels.numel() for b in batches) / best


def _write(eager: nn.Module, record: ModelRecord, path: Path, fmt: str, choice: KernelChoice,
           out: dict[str, Any], key: str) -> None:
    """Writes one artifact with the chosen kernels; an AOTInductor compile that fails with
    them is recorded and retried with FBGEMM's lookup and the plain cross network."""
    try:
        write_artifact(eager, record.model, path, check_batch=0, overwrite=True, format=fmt,
                       lookup=choice.use_lookup, cross=choice.use_cross)
    except Exception as e:  # noqa: BLE001  (recorded; the stock kernels are tried next)
        if fmt != "aoti" or not (choice.use_lookup or choice.use_cross):
            raise
        out[f"artifact_error_{key}"] = f"{type(e).__name__}: {str(e)[:500]}"
        write_artifact(eager, record.model, path, check_batch=0, overwrite=True, format=fmt,
                       lookup=False, cross=False)


def _time_variant(spec: VariantSpec, model: nn.Module, record: ModelRecord, calibration: Calibration | None,
                  batches: list[Batch], evaluation: Sequence[Batch], device: torch.device, workdir: Path,
                  options: InferenceOptions, peak: Any, out: dict[str, Any], repeats: int) -> None:
    """One variant: its eager serving module (stock kernels, then ours as chosen), then
    each of its artifacts, written and loaded back as a server would (and scored on the
    ``evaluation`` batches)."""
    name, cuda = spec.name, device.type == "cuda"
    features = [t.name for t in record.model.tables]
    module, plan = build_variant(model, record, calibration, spec)
    out[f"plan_{name}"] = plan_summary(spec, plan)
    # a compressed variant is a fresh copy: converted in place (one copy of the tables
    # fewer on the device); the original is needed again
    eager = serving_module(module, features, spec.tables, inplace=module is not model, fuse_cross=cuda,
                           rows=[t.num_embeddings for t in record.model.tables])
    out[f"params_{name}"] = eager.params
    del module
    use_kernels_(eager, False)
    want = call(eager, batches[0])
    out[f"infer_eager_{name}_samples_per_s"] = samples_per_s(eager, batches, device, repeats)
    if cuda:
        out[f"gpu_ms_eager_{name}"] = gpu_ms(lambda: call(eager, batches[0]), device)
    choice = choose_kernels(eager, batches[0], device)  # leaves eager serving with the chosen kernels
    out[f"kernels_{name}"] = choice.to_dict()
    if cuda:
        out[f"infer_eager_ours_{name}_samples_per_s"] = samples_per_s(eager, batches, device, repeats)
        out[f"gpu_ms_eager_ours_{name}"] = gpu_ms(lambda: call(eager, batches[0]), device)
        out[f"eager_ours_vs_stock_max_abs_diff_{name}"] = (call(eager, batches[0]) - want).abs().max().item()
    bytes_read = lookup_bytes(eager, batches[0]) if options.profile else 0
    formats = ["torchscript"] + (["aoti"] if options.aoti and cuda else [])
    paths = {fmt: workdir / f"{name}{SUFFIX[fmt]}" for fmt in formats}
    for fmt, path in paths.items():
        _write(eager, record, path, fmt, choice if fmt == "aoti" else KernelChoice("fbgemm", "plain"), out,
               f"{fmt}_{name}")
    del eager
    empty_cache(device)
    for fmt, path in paths.items():
        key = f"{fmt}_{name}"
        artifact, meta = load_artifact(path, device)
        out[f"artifact_mib_{key}"] = path.stat().st_size / 2**20
        out[f"artifact_kernels_{key}"] = {"lookup": meta["lookup"], "cross": meta["cross"]}
        out[f"artifact_vs_eager_max_abs_diff_{key}"] = (call(artifact, batches[0]) - want).abs().max().item()
        if evaluation:
            out[f"auc_{key}"] = batches_auc(lambda b: call(artifact, b), evaluation)
        out[f"infer_{key}_samples_per_s"] = peak.measure(
            f"infer_{key}", device, lambda: samples_per_s(artifact, batches, device, repeats))
        if cuda:
            times = kernel_times(lambda: call(artifact, batches[0]), device)
            out[f"gpu_ms_{key}"] = sum(times.values()) / 1e3
            if options.profile:
                out[f"profile_{key}"] = breakdown(times, bytes_read, torch.cuda.get_device_name(device))
        if options.profile_dir is not None:
            profile_to(options.profile_dir / "profile_infer.txt", lambda: call(artifact, batches[0]), device,
                       f"inference, {name} {fmt} artifact ({meta['lookup']} lookup, {meta['cross']} cross), "
                       f"batch {batches[0].labels.numel()}")
        del artifact
        path.unlink()
        empty_cache(device)
    best = max(formats, key=lambda fmt: out[f"infer_{fmt}_{name}_samples_per_s"])
    out[f"infer_format_{name}"] = best
    for k in ("infer_{}_samples_per_s", "artifact_mib_{}", "artifact_vs_eager_max_abs_diff_{}", "gpu_ms_{}",
              "profile_{}", "artifact_kernels_{}", "auc_{}"):
        if k.format(f"{best}_{name}") in out:
            out[k.format(name)] = out[k.format(f"{best}_{name}")]


def bench_inference(model: nn.Module, record: ModelRecord, calibration: Calibration | None, shape: SpeedShape,
                    device: torch.device, peak: Any, workdir: Path, options: InferenceOptions,
                    evaluation: Sequence[Batch] = (),
                    on_variant: Callable[[dict[str, Any]], None] = lambda out: None) -> dict[str, Any]:
    """Samples/s of each variant's artifacts (TorchScript; with ``aoti`` on CUDA also
    AOTInductor, with the kernels of ours measured faster for that variant) and of the
    eager module they came from; the device time of a batch; the artifacts' sizes.

    ``infer_{name}_samples_per_s`` is the faster of a variant's artifacts (its format in
    ``infer_format_{name}``); ``infer_{name}_vs_original`` its ratio to the original's
    faster artifact (equal treatment: the headline); ``infer_{name}_vs_stock_torchrec``
    its ratio to the original's TorchScript artifact (FBGEMM's tables, no kernel of
    ours); ``infer_{format}_{name}_samples_per_s`` each artifact's own. With labelled
    ``evaluation`` batches, ``auc_{name}`` is the AUC of the variant's faster artifact over
    them and ``delta_auc_{name}`` its difference to the original's (``auc_{format}_{name}``
    each artifact's). The original is timed first; ``on_variant`` gets the results so far
    after each variant (a run cut short keeps them)."""
    from afmrec.models.kernels.lookup import TUNED

    batches = make_batches(shape, shape.infer_batch, 3, device, seed=SEEDS["infer"])
    out: dict[str, Any] = {"infer_batch": shape.infer_batch}
    names = ["original"] + [n for n in VARIANTS if n in options.variants and n != "original"]
    if evaluation:
        out["eval_rows"] = sum(b.labels.numel() for b in evaluation)
    for name in names:
        _time_variant(VARIANTS[name], model, record, calibration, batches, evaluation, device, workdir, options,
                      peak, out, shape.repeats)
        if evaluation:
            out[f"delta_auc_{name}"] = out[f"auc_{name}"] - out["auc_original"]
        out[f"infer_{name}_vs_stock_torchrec"] = (out[f"infer_{name}_samples_per_s"]
                                                  / out["infer_torchscript_original_samples_per_s"])
        if name != "original":
            out[f"infer_{name}_vs_original"] = out[f"infer_{name}_samples_per_s"] / out["infer_original_samples_per_s"]
            if f"gpu_ms_{name}" in out:
                out[f"gpu_time_{name}_vs_original"] = out["gpu_ms_original"] / out[f"gpu_ms_{name}"]
        # the lookup's tilings autotune chose on the device (by padded width and format),
        # which the AOTInductor artifacts hold
        out["lookup_tilings"] = {f"width{d}_{kind}": dataclasses.asdict(t) for (d, kind), t in TUNED.items()}
        on_variant(out)
    return out


def bench_cpu_latency(model: nn.Module, record: ModelRecord, calibration: Calibration, shape: SpeedShape,
                      workdir: Path) -> dict[str, Any]:
    """Milliseconds per call of the CPU artifact, original vs AFM 4x (its plan as on the
    device), at each latency batch (medians of 7 calls, the two models called in turn)."""
    cpu = torch.device("cpu")
    cpu_model = copy.deepcopy(model).cpu()
    variants = {"original": cpu_model, "afm4x": build_variant(cpu_model, record, calibration, VARIANTS["afm4x"])[0]}
    served = {}
    for name in list(variants):
        eager = serving_module(variants.pop(name), [t.name for t in record.model.tables], inplace=True)
        path = workdir / f"cpu_{name}.pt"
        write_artifact(eager, record.model, path, check_batch=0, overwrite=True)
        served[name] = load_artifact(path, cpu)[0]
        del eager
    del cpu_model
    out: dict[str, Any] = {"cpu_threads": torch.get_num_threads()}
    for b in shape.latency_batches:
        batch = make_batches(shape, b, 1, cpu, seed=SEEDS["latency"])[0]
        # TorchScript re-profiles and re-optimises for every new batch shape: three warm-up
        # calls each; then the two models in turn (the host's load drifts)
        ms = measure_latencies(served, batch, warmup=3, repeats=7, run=call)
        out.update({f"cpu_ms_{name}_b{b}": ms[name] for name in served})
        out[f"cpu_latency_afm4x_vs_original_b{b}"] = out[f"cpu_ms_original_b{b}"] / out[f"cpu_ms_afm4x_b{b}"]
    out["cpu_latency_afm4x_vs_original"] = out[f"cpu_latency_afm4x_vs_original_b{shape.latency_batches[-1]}"]
    return out
