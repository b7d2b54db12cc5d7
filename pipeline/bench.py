"""Side-by-side timings: what a stage costs relative to its baseline, in one run."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from afmrec.sharding.dmp import unwrap
from afmrec.sharding.env import DistEnv
from afmrec.sharding.plan import ShardingConfig

from .blocks import find_blocks
from .evaluate import eval_mode, forward_logits
from .model_io import build_from_record, load_model
from .stages import LOCAL, DataRef
from .stats import StatsCollector


@dataclass(frozen=True)
class StatsTiming:
    """Samples/s of a forward-only pass and of the statistics pass, same model and data."""

    forward_samples_per_s: float
    stats_samples_per_s: float
    ratio: float
    rows: int
    blocks: int
    world_size: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _best_time(fn: Callable[[], None], env: DistEnv) -> float:
    if env.is_distributed:
        torch.distributed.barrier()
    start = time.perf_counter()
    fn()
    if env.is_distributed:
        torch.distributed.barrier()
    return time.perf_counter() - start


def time_stats_vs_forward(
    model_dir: Path,
    data: DataRef,
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    batch_size: int = 4096,
    repeats: int = 3,
) -> StatsTiming:
    """Times a forward-only pass and the statistics pass over the same in-memory batches.

    The two are interleaved ``repeats`` times and the fastest of each is kept, so that
    other load on the machine affects both alike. Samples/s are of the whole job (all
    ranks' rows over the wall time).
    """
    model, record = load_model(model_dir, env=env, sharding=sharding)
    blocks = find_blocks(build_from_record(record, "cpu", sparse_device="meta"))
    batches = list(data.batches(batch_size, env))
    rows = sum(b.labels.numel() for b in batches) * env.world_size
    inner = unwrap(model)

    def forward() -> None:
        with eval_mode(model), torch.no_grad():
            for b in batches:
                forward_logits(model, b)

    def stats() -> None:
        with eval_mode(model), StatsCollector(inner, blocks), torch.no_grad():
            for b in batches:
                forward_logits(model, b)

    forward()  # warm-up (allocator, lazy initialisation)
    f, s = [], []
    for _ in range(repeats):
        f.append(_best_time(forward, env))
        s.append(_best_time(stats, env))
    fwd, st = rows / min(f), rows / min(s)
    return StatsTiming(fwd, st, st / fwd, rows, len(blocks), env.world_size, repeats)
