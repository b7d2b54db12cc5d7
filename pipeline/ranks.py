"""Rank selection: a fixed rank, an energy threshold, a whole-model compression ratio, or
the same ratio for every block.

All four give, for every selected block, the rank ``K`` to keep; a block left out of the
result stays as it is (compression would not make it smaller, or the budget preferred it
whole). Tables can be rounded up to a multiple (4 for FBGEMM on CUDA).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .bases import Spectrum
from .blocks import Block, resolve_pattern_map
from .errors import InputError

log = logging.getLogger(__name__)

MODES = ("fixed", "energy", "ratio", "uniform")


@dataclass(frozen=True)
class RankConfig:
    """How to choose ranks.

    Args:
        mode: ``"fixed"`` (``rank`` everywhere), ``"energy"`` (smallest K keeping
            ``energy`` of the variance) or ``"ratio"`` (whole model ``ratio`` times smaller,
            greedy on retained variance per parameter) or ``"uniform"`` (every block
            ``ratio`` times smaller: the baseline the global budget is compared with).
        rank / energy / ratio: the value for the chosen mode (``ratio`` for both ratio modes).
        rank_pattern: ``{glob: K}`` per-block overrides, applied in every mode.
        table_multiple: round table ranks up to a multiple of this (4 for FBGEMM on CUDA).
        linear_multiple: round Linear ranks up to a multiple of this (8: the GEMMs of the
            factors keep 32-byte aligned rows, which tensor-core kernels need; an odd rank
            such as 111 sends them to slow unaligned kernels on an H100).
        table_rounding: what an explicit table rank (``rank``, ``rank_pattern``) that is
            not a multiple of ``table_multiple`` gets: ``"round"`` up, with a logged
            warning, or ``"error"``. Ranks the policy picks itself are always rounded.
        weights: optional per-block multipliers of the variance gains (e.g. measured
            sensitivity of the loss to the block); 1.0 when absent.
    """

    mode: str = "ratio"
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    table_multiple: int = 1
    linear_multiple: int = 1
    table_rounding: str = "round"
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"rank mode must be one of {MODES}, got {self.mode!r}")
        need = {"fixed": "rank", "energy": "energy", "ratio": "ratio", "uniform": "ratio"}[self.mode]
        value = getattr(self, need)
        if value is None:
            raise InputError(f"rank mode {self.mode!r} needs --{need}")
        if self.mode == "fixed" and value < 1:
            raise InputError(f"rank must be >= 1, got {value}")
        if self.mode == "energy" and not 0 < value <= 1:
            raise InputError(f"energy must be in (0, 1], got {value}")
        if self.mode in ("ratio", "uniform") and value <= 1:
            raise InputError(f"ratio must be > 1, got {value}")
        if self.table_multiple < 1 or self.linear_multiple < 1:
            raise InputError("table_multiple and linear_multiple must be >= 1")
        if self.table_rounding not in ("round", "error"):
            raise InputError(f"table_rounding must be 'round' or 'error', got {self.table_rounding!r}")

    @classmethod
    def from_policy(cls, *, ratio: float | None = None, energy: float | None = None,
                    rank: int | None = None, **options: Any) -> "RankConfig":
        """The config of whichever one of ``ratio`` (mode ``"ratio"``), ``energy`` or
        ``rank`` (``"fixed"``) is given, as the CLI and batch manifests state a policy;
        ``options``: the other fields."""
        given = [name for name, value in (("ratio", ratio), ("energy", energy), ("rank", rank))
                 if value is not None]
        if len(given) != 1:
            raise InputError(f"give exactly one of ratio, energy, rank (got {given or 'none'})")
        mode = {"ratio": "ratio", "energy": "energy", "rank": "fixed"}[given[0]]
        return cls(mode=mode, rank=rank, energy=energy, ratio=ratio, **options)


def _unit(block: Block, config: RankConfig) -> int:
    return config.table_multiple if block.kind == "table" else config.linear_multiple


def _round(block: Block, k: int, config: RankConfig) -> int:
    u = _unit(block, config)
    return min(-(-k // u) * u, block.out_features)


def energy_rank(spectrum: Spectrum, energy: float) -> int:
    """The smallest rank that keeps ``energy`` of the variance (1 for a constant output)."""
    total = float(spectrum.eigenvalues.sum())
    if total <= 0:
        return 1
    cum = (spectrum.eigenvalues.cumsum(0) / total).tolist()
    return next((i + 1 for i, c in enumerate(cum) if c >= energy - 1e-12), len(cum))


def _uniform_rank(block: Block, ratio: float) -> int:
    """The rank whose factors come closest to ``ratio`` times fewer parameters (at least 1).

    ``Block.compressed_params(k)`` is ``compressed_params(0)`` (``b2``, none where the
    second factor is fused) plus ``k * params_per_rank``: the nearest integer to the ``k``
    where that line meets ``params / ratio`` is the closest rank (a tie rounds up).
    """
    fixed = block.compressed_params(0)
    k = math.floor((block.params / ratio - fixed) / block.params_per_rank + 0.5)
    return max(1, k)


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
    for b in blocks:
        if overrides.get(b.name, 0) > b.out_features:
            raise InputError(f"block {b.name}: rank {overrides[b.name]} is larger than its "
                             f"width {b.out_features}")
    free = [b for b in blocks if b.name not in overrides]
    if config.mode == "fixed" and free and all(config.rank > b.out_features for b in free):
        raise InputError(f"rank {config.rank} is larger than the width of every block (the "
                         f"widest is {max(b.out_features for b in free)})")
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
            if config.mode == "fixed":
                ranks[b.name] = config.rank
            elif config.mode == "uniform":
                ranks[b.name] = _uniform_rank(b, config.ratio)
            else:
                ranks[b.name] = energy_rank(spectra[b.name], config.energy)
    for b in blocks:
        if b.name in overrides:
            ranks[b.name] = overrides[b.name]
    out = {}
    for b in blocks:
        if b.name not in ranks:
            continue
        want = ranks[b.name]
        if want >= b.out_features:  # a --rank above a narrow block's width
            log.info("block %s: rank %d is not below its width %d; kept whole", b.name, want,
                     b.out_features)
            continue
        k = _round(b, want, config)
        explicit = config.mode == "fixed" or b.name in overrides
        if k != want and explicit and b.kind == "table" and config.table_rounding == "error":
            raise InputError(
                f"block {b.name}: table rank {want} is not a multiple of --table-multiple "
                f"{config.table_multiple} (what FBGEMM's fused kernels need)"
            )
        if k != want and config.mode in ("fixed", "energy"):
            log.warning("block %s: rank %d rounded up to %d", b.name, want, k)
        if b.compressed_params(k) >= b.params:
            log.info("block %s: rank %d would not make it smaller; kept whole", b.name, k)
            continue
        out[b.name] = k
    return out
