"""Side-by-side timings: what a stage costs relative to its baseline, in one run."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from afmrec.sharding.dmp import unwrap
from afmrec.sharding.env import DistEnv
from afmrec.sharding.plan import ShardingConfig

from torchrec.datasets.utils import Batch

from ..blocks import Block, find_blocks
from ..evaluate import eval_mode, forward_logits, model_device
from ..model_io import load_model, skeleton
from ..runinfo import fastest_interleaved
from ..stages import LOCAL, DataRef
from ..stats import StatsCollector, resolve_precision


@dataclass(frozen=True)
class StatsTiming:
    """Samples/s of a forward-only pass and of the statistics pass, same model and data."""

    forward_samples_per_s: float
    stats_samples_per_s: float
    ratio: float
    precision: str
    rows: int
    blocks: int
    world_size: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_stats_vs_forward(
    model_dir: Path,
    data: DataRef,
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    batch_size: int = 4096,
    repeats: int = 3,
    precision: str = "auto",
) -> StatsTiming:
    """:func:`time_stats_vs_forward_batches` for a saved model over a dataset (read into
    memory first, so that reading is timed in neither)."""
    model, record = load_model(model_dir, env=env, sharding=sharding)
    blocks = find_blocks(skeleton(record))
    return time_stats_vs_forward_batches(model, blocks, list(data.batches(batch_size, env)),
                                         env, repeats=repeats, precision=precision)


def passes(model: torch.nn.Module, blocks: list[Block], batches: list[Batch],
           precision: str = "auto") -> tuple[Callable[[], None], Callable[[], None]]:
    """A forward-only pass and a statistics pass (Gram products in ``precision``) over
    ``batches``, as two callables."""
    inner = unwrap(model)
    device = model_device(inner)

    def forward() -> None:
        with eval_mode(model), torch.no_grad():
            for b in batches:
                forward_logits(model, b)

    def stats() -> None:
        with eval_mode(model), StatsCollector(inner, blocks, device, precision), torch.no_grad():
            for b in batches:
                forward_logits(model, b)

    return forward, stats


def time_stats_vs_forward_batches(
    model: torch.nn.Module,
    blocks: list[Block],
    batches: list[Batch],
    env: DistEnv = LOCAL,
    *,
    repeats: int = 3,
    precision: str = "auto",
) -> StatsTiming:
    """Times a forward-only pass and the statistics pass over the same batches.

    The two are interleaved ``repeats`` times and the fastest of each is kept, so that
    other load on the machine affects both alike. Samples/s are of the whole job (all
    ranks' rows over the wall time).
    """
    rows = sum(b.labels.numel() for b in batches) * env.world_size
    device = model_device(unwrap(model))
    precision = resolve_precision(precision, device)
    forward, stats = passes(model, blocks, batches, precision)
    forward()  # warm-up (allocator, lazy initialisation)
    f, s = fastest_interleaved([forward, stats], device, env, repeats)
    fwd, st = rows / f, rows / s
    return StatsTiming(fwd, st, st / fwd, precision, rows, len(blocks), env.world_size, repeats)
