"""Device time of the speed benchmark's calls: totals, torch.profiler tables, the share of
each kernel class, and the lookups' achieved memory bandwidth against the device's peak.

The lookup's bytes are what it must read: each id's row (the bytes of the row's values,
an int8 row's scale and bias included: FBGEMM's 16-byte padding is not read) plus the ids
and the bag offsets (int32). Divided by the lookup kernels' device time, that is the
achieved bandwidth; divided by the peak, the time the lookups would take at the peak (the
floor), and replacing the measured lookup time by the floor gives the speed-up the whole
batch could reach from the lookups alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...runinfo import synchronize

KERNEL_CLASSES: dict[str, tuple[str, ...]] = {
    "lookup": ("pooled_lookup", "embedding_forward", "nbit", "int_nbit", "bounds_check"),
    "cross": ("cross_update",),
    "gemm": ("gemm", "gemv", "xmma", "cutlass", "cublas", "nvjet", "sgemm", "hgemm", "s1688", "s16816",
             "splitk", "matmul", "bmm"),
}
"""Substrings of kernel names (lower case) by class; any other kernel is ``elementwise``
(element-wise and reduction kernels, copies, memsets)."""

PEAK_HBM_TB_S: dict[str, float] = {"H100 80GB HBM3": 3.35, "H100 SXM": 3.35, "H100 PCIe": 2.0,
                                   "H100 NVL": 3.9, "H200": 4.8}
"""Peak HBM bandwidth (TB/s, vendor figures) by a substring of the device name."""


def peak_bandwidth_tb_s(device_name: str) -> float | None:
    """The vendor's peak HBM bandwidth of a device, None if not known."""
    for key, value in PEAK_HBM_TB_S.items():
        if key in device_name:
            return value
    return None


def kernel_class(name: str) -> str:
    """:data:`KERNEL_CLASSES`' class of a kernel name."""
    low = name.lower()
    for cls, keys in KERNEL_CLASSES.items():
        if any(k in low for k in keys):
            return cls
    return "elementwise"


def kernel_times(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Device microseconds of each kernel (by name) of one call of ``fn``, after a warm-up
    call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    return {e.key: e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0}


def gpu_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of device work (the kernels' and copies' own time) of one call of
    ``fn``: what the call costs without the host's gaps."""
    return sum(kernel_times(fn, device).values()) / 1e3


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


def lookup_bytes(served: nn.Module, batch: Any) -> int:
    """Bytes the lookups of one batch must read: every id's row (its values; an int8 row's
    scale and bias too) and the ids and bag offsets as int32 (module docstring).

    Args: served: a serving module (its tables in :class:`~afmrec.models.serving.
    FlatLookup`\\ s or TorchRec's quantised collections); batch: a ``Batch``."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    kjt = batch.sparse_features
    ids = dict(zip(kjt.keys(), kjt.length_per_key()))
    total, seen = 0, set()
    for m in served.modules():
        for kernel in getattr(m, "_emb_modules", []):
            if not isinstance(kernel, IntNBitTableBatchedEmbeddingBagsCodegen) or id(kernel) in seen:
                continue
            seen.add(id(kernel))
            specs = kernel.embedding_specs
            names = [s[0] for s in specs]
            for feature, table in zip(_features(m, len(kernel.feature_table_map)), kernel.feature_table_map):
                _, _, dim, sparse_type, _ = specs[table]
                fmt = sparse_type.name.lower()
                row = dim * {"fp32": 4, "fp16": 2}.get(fmt, 1) + (4 if fmt == "int8" else 0)
                total += ids.get(feature, ids.get(names[table], 0)) * row
    offsets = len(kjt.keys()) * kjt.stride() + 1
    return total + 4 * (kjt.values().numel() + offsets)


def _features(module: nn.Module, count: int) -> list[str]:
    """The feature names a collection's kernel serves, in its feature order."""
    keys = getattr(module, "keys", None) or getattr(module, "_embedding_names", None) or []
    return list(keys)[:count] if len(keys) >= count else [""] * count


def breakdown(times_us: dict[str, float], lookup_bytes_read: int, device_name: str) -> dict[str, Any]:
    """Each kernel class's device time and share, the lookups' achieved bandwidth and the
    ceiling it implies (module docstring).

    Args: times_us: :func:`kernel_times`' result; lookup_bytes_read: :func:`lookup_bytes`."""
    by_class: dict[str, float] = {}
    for name, us in times_us.items():
        cls = kernel_class(name)
        by_class[cls] = by_class.get(cls, 0.0) + us
    total = sum(by_class.values())
    out: dict[str, Any] = {
        "device_ms": total / 1e3,
        "ms_by_class": {k: v / 1e3 for k, v in sorted(by_class.items())},
        "share_by_class": {k: v / total for k, v in sorted(by_class.items())} if total else {},
        "lookup_bytes": lookup_bytes_read,
        "top_kernels_ms": {k: v / 1e3 for k, v in sorted(times_us.items(), key=lambda kv: -kv[1])[:12]},
    }
    lookup_s = by_class.get("lookup", 0.0) / 1e6
    peak = peak_bandwidth_tb_s(device_name)
    out["peak_hbm_tb_s"] = peak
    if lookup_s > 0:
        out["lookup_achieved_tb_s"] = lookup_bytes_read / lookup_s / 1e12
        if peak:
            floor_ms = lookup_bytes_read / (peak * 1e12) * 1e3
            out["lookup_floor_ms"] = floor_ms
            out["lookup_share_of_peak"] = out["lookup_achieved_tb_s"] / peak
            rest = total / 1e3 - lookup_s * 1e3
            out["batch_speedup_if_lookups_at_peak"] = (total / 1e3) / (rest + floor_ms)
    return out
