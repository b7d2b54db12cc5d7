"""Rank selection: a fixed rank, an energy threshold, or a whole-model compression ratio.

All three give, for every selected block, the rank ``K`` to keep; a block left out of the
result stays as it is (compression would not make it smaller, or the budget preferred it
whole). Tables can be rounded up to a multiple (4 for FBGEMM on CUDA).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass, field
from typing import Mapping

from .bases import Spectrum
from .blocks import Block, resolve_pattern_map
from .errors import InputError

log = logging.getLogger(__name__)

MODES = ("fixed", "energy", "ratio")


@dataclass(frozen=True)
class RankConfig:
    """How to choose ranks.

    Args:
        mode: ``"fixed"`` (``rank`` everywhere), ``"energy"`` (smallest K keeping
            ``energy`` of the variance) or ``"ratio"`` (whole model ``ratio`` times smaller,
            greedy on retained variance per parameter).
        rank / energy / ratio: the value for the chosen mode.
        rank_pattern: ``{glob: K}`` per-block overrides, applied in every mode.
        table_multiple: round table ranks up to a multiple of this (4 for FBGEMM on CUDA).
        weights: optional per-block multipliers of the variance gains (e.g. measured
            sensitivity of the loss to the block); 1.0 when absent.
    """

    mode: str = "ratio"
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    table_multiple: int = 1
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"rank mode must be one of {MODES}, got {self.mode!r}")
        need = {"fixed": "rank", "energy": "energy", "ratio": "ratio"}[self.mode]
        value = getattr(self, need)
        if value is None:
            raise InputError(f"rank mode {self.mode!r} needs --{need}")
        if self.mode == "fixed" and value < 1:
            raise InputError(f"rank must be >= 1, got {value}")
        if self.mode == "energy" and not 0 < value <= 1:
            raise InputError(f"energy must be in (0, 1], got {value}")
        if self.mode == "ratio" and value <= 1:
            raise InputError(f"ratio must be > 1, got {value}")
        if self.table_multiple < 1:
            raise InputError("table_multiple must be >= 1")


def _unit(block: Block, config: RankConfig) -> int:
    return config.table_multiple if block.kind == "table" else 1


def _round(block: Block, k: int, config: RankConfig) -> int:
    u = _unit(block, config)
    return min(-(-k // u) * u, block.out_features)


def _energy_rank(spectrum: Spectrum, energy: float) -> int:
    total = float(spectrum.eigenvalues.sum())
    if total <= 0:
        return 1
    cum = (spectrum.eigenvalues.cumsum(0) / total).tolist()
    return next((i + 1 for i, c in enumerate(cum) if c >= energy - 1e-12), len(cum))


def _cap(block: Block, config: RankConfig) -> int:
    """Largest rank (a multiple of the block's unit) at which the factors are smaller."""
    u = _unit(block, config)
    return block.max_useful_rank() // u * u


def _greedy_ratio(
    blocks: list[Block],
    spectra: Mapping[str, Spectrum],
    config: RankConfig,
    budget: int,
) -> dict[str, int]:
    """Spends ``budget`` parameters on the blocks, one rank unit at a time, always where a
    parameter buys the most normalised (and weighted) retained variance.

    Every compressible block starts at one unit. Past its largest useful rank a block's
    next step is to stay whole (gain: the variance still missing; cost: the rest of its
    size). Blocks that no rank makes smaller stay whole and count as fixed.
    """
    ranks: dict[str, int] = {}
    heap: list[tuple[float, str, int, bool]] = []

    def push(b: Block, k: int) -> None:
        ev = spectra[b.name].eigenvalues
        total = float(ev.sum()) or 1.0
        u = _unit(b, config)
        whole = k + u > _cap(b, config)
        gain = float(ev[k:].sum() if whole else ev[k : k + u].sum()) / total
        cost = b.params - b.compressed_params(k) if whole else u * b.params_per_rank
        score = config.weights.get(b.name, 1.0) * gain / cost
        heapq.heappush(heap, (-score, b.name, cost, whole))

    spent = 0
    for b in blocks:
        if _cap(b, config) == 0:
            spent += b.params
            continue
        ranks[b.name] = _unit(b, config)
        spent += b.compressed_params(ranks[b.name])
        push(b, ranks[b.name])
    if spent > budget:
        raise InputError(
            f"target ratio {config.ratio} is unreachable: the smallest ranks already need "
            f"{spent:,} parameters of a budget of {budget:,}"
        )
    by_name = {b.name: b for b in blocks}
    while heap:
        _, name, cost, whole = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # a cheaper step of another block may still fit
        spent += cost
        if whole:
            del ranks[name]
        else:
            ranks[name] += _unit(by_name[name], config)
            push(by_name[name], ranks[name])
    return ranks


def select_ranks(
    blocks: list[Block],
    spectra: Mapping[str, Spectrum],
    config: RankConfig,
    *,
    other_params: int = 0,
) -> dict[str, int]:
    """Chooses a rank per block.

    Args:
        blocks: the blocks that may be compressed.
        spectra: their output spectra (see :func:`afmrec.pipeline.bases.spectra`).
        config: the rank policy.
        other_params: parameters of the model outside ``blocks`` (counted in the ratio).

    Returns:
        ``{block name: K}`` for the blocks to compress (those that get smaller).
    """
    missing = [b.name for b in blocks if b.name not in spectra]
    if missing:
        raise InputError(f"no statistics for blocks {missing}: rerun the stats stage")
    overrides = resolve_pattern_map(dict(config.rank_pattern), [b.name for b in blocks])
    free = [b for b in blocks if b.name not in overrides]
    if config.mode == "ratio":
        total = other_params + sum(b.params for b in blocks)
        pinned = 0
        for b in blocks:
            if b.name in overrides:
                pinned += b.compressed_params(_round(b, overrides[b.name], config))
        budget = int(total / config.ratio) - other_params - pinned
        ranks = _greedy_ratio(free, spectra, config, budget)
    else:
        ranks = {}
        for b in free:
            k = config.rank if config.mode == "fixed" else _energy_rank(spectra[b.name], config.energy)
            ranks[b.name] = k
    for b in blocks:
        if b.name in overrides:
            ranks[b.name] = overrides[b.name]
    out = {}
    for b in blocks:
        if b.name not in ranks:
            continue
        k = _round(b, ranks[b.name], config)
        if k != ranks[b.name] and config.mode != "ratio":
            log.warning("block %s: rank %d rounded up to %d", b.name, ranks[b.name], k)
        if b.compressed_params(k) >= b.params:
            log.info("block %s: rank %d would not make it smaller; kept whole", b.name, k)
            continue
        out[b.name] = k
    return out
