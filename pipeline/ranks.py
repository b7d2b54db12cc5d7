"""Rank selection: which rank each block keeps.

Five named policies, one vocabulary for the CLI, the Python API and the benchmarks:

    loss      whole-model byte budget (``ratio``), spent greedily where a byte saves the
              most *estimated calibration loss*: each block's retained variance weighted
              by its measured loss sensitivity (:mod:`afmrec.pipeline.sensitivity`).
              The default.
    variance  the same budget and greedy on retained variance alone.
    uniform   every block the same ratio smaller, that ratio set so the whole model
              reaches ``ratio``.
    energy    per block the smallest rank keeping ``energy`` of its output variance.
    rank      ``rank`` everywhere.

A ratio counts bytes (:mod:`afmrec.pipeline.budget`): the original's fp32 checkpoint
against the compressed model with its tables in ``table_format``, padded as the serving
kernels pad rows. ``auto`` plans in fp32, fp16 and int8 and keeps the plan that drops the
least estimated loss: a narrower format holds higher ranks in the same bytes (a width-16
table served in 16-byte rows keeps rank 4 in fp32, 8 in fp16, 12 in int8), and row-wise
rounding costs far less than a dropped direction.
With ``dense_ratio`` (``loss`` and ``variance``), the Linear blocks together get a second
budget inside the first: their bytes, which are their multiply-adds per sample (a Linear's
factors hold ``k (n + m)`` weights and cost as many multiply-adds), at least that many
times fewer than whole. The same greedy spends both: a Linear block's next rank unit must
fit both budgets, a table's the first. A byte budget alone leaves the Linears whole
wherever the tables hold the bytes (a DLRM's Linears are often under 1% of them), so it
buys no dense compute.
A plan lands within :data:`TOLERANCE` of the target (above it where a plan can, else
just below) or the planner says why it cannot and what would reach it. Where the greedy
stops far smaller than asked (a large table's coarse next step no longer fits after the
small blocks' cheap ones), one such step is taken first and the rest planned again. A block left out of the plan stays whole. Table ranks are
multiples of ``table_multiple`` (4: FBGEMM's fused kernels, on CPU as on CUDA).
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

from .bases import Spectrum
from .blocks import Block, resolve_pattern_map
from .budget import (DENSE_BYTES, DTYPES, POLICIES, RATIO_POLICIES, SERVE_DEVICES, TABLE_FORMATS,
                     TableFormat, original_bytes, served_bytes)
from .errors import InputError

log = logging.getLogger(__name__)

TOLERANCE = 0.10  # an achieved ratio may exceed its target by this fraction


@dataclass(frozen=True)
class RankConfig:
    """How to choose ranks.

    Args:
        policy: one of :data:`POLICIES` (module docstring).
        ratio: the whole-model byte ratio of ``loss``, ``variance`` and ``uniform``.
        energy: the variance fraction of ``energy``.
        rank: the rank of ``rank``.
        rank_pattern: ``{glob: K}`` per-block overrides, applied under every policy.
        table_format: the tables' served row format, one of :data:`TABLE_FORMATS`.
        serve_device: ``cuda`` or ``cpu``: the row padding of the serving kernels.
        table_multiple: table ranks are multiples of this (4: FBGEMM's fused kernels).
        linear_multiple: Linear ranks are multiples of this (8 keeps the factors' GEMMs
            on aligned tensor-core kernels on a GPU).
        table_rounding: what an explicit table rank (``rank``, ``rank_pattern``) that is
            not a multiple of ``table_multiple`` gets: ``"round"`` up, with a logged
            warning, or ``"error"``. Ranks the policy picks itself are always multiples.
        weights: the ``loss`` policy's per-block multipliers of the variance gains
            (:func:`afmrec.pipeline.sensitivity.sensitivity_weights`); required by it.
        tolerance: how far (a fraction) the achieved ratio may fall from the target.
        dense_ratio: with ``loss`` or ``variance``, the Linear blocks' bytes and
            multiply-adds are made at least this many times fewer (module docstring).
    """

    policy: str = "loss"
    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    table_format: str = "auto"
    serve_device: str = "cuda"
    table_multiple: int = 4
    linear_multiple: int = 1
    table_rounding: str = "round"
    weights: Mapping[str, float] | None = None
    tolerance: float = TOLERANCE
    dense_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"rank policy must be one of {POLICIES}, got {self.policy!r}")
        need = "ratio" if self.policy in RATIO_POLICIES else self.policy
        value = getattr(self, need)
        if value is None:
            raise InputError(f"rank policy {self.policy!r} needs --{need}")
        if self.policy == "rank" and value < 1:
            raise InputError(f"rank must be >= 1, got {value}")
        if self.policy == "energy" and not 0 < value <= 1:
            raise InputError(f"energy must be in (0, 1], got {value}")
        if self.policy in RATIO_POLICIES and not value > 1:
            raise InputError(f"ratio must be > 1, got {value}")
        if self.table_format not in TABLE_FORMATS:
            raise InputError(f"table format must be one of {TABLE_FORMATS}, got {self.table_format!r}")
        if self.serve_device not in SERVE_DEVICES:
            raise InputError(f"serve device must be one of {SERVE_DEVICES}, got {self.serve_device!r}")
        if self.table_multiple < 1 or self.linear_multiple < 1:
            raise InputError("table_multiple and linear_multiple must be >= 1")
        if not self.tolerance >= 0:
            raise InputError(f"tolerance must be >= 0, got {self.tolerance}")
        if self.dense_ratio is not None and self.policy not in ("loss", "variance"):
            raise InputError(f"--dense-ratio works with the loss and variance policies, not {self.policy!r}")
        if self.dense_ratio is not None and not self.dense_ratio > 1:
            raise InputError(f"dense ratio must be > 1, got {self.dense_ratio}")
        if self.table_rounding not in ("round", "error"):
            raise InputError(f"table_rounding must be 'round' or 'error', got {self.table_rounding!r}")

    @property
    def formats(self) -> list[TableFormat]:
        """The formats to plan in, widest rows first (the first is kept on a tie)."""
        dtypes = DTYPES if self.table_format == "auto" else (self.table_format,)
        if self.policy not in RATIO_POLICIES:
            dtypes = dtypes[:1]
        return [TableFormat(d, self.serve_device) for d in dtypes]

    @classmethod
    def from_policy(cls, policy: str | None = None, *, ratio: float | None = None,
                    energy: float | None = None, rank: int | None = None, **options: Any) -> "RankConfig":
        """The config of whichever one of ``ratio``, ``energy`` or ``rank`` is given (as the
        CLI and batch manifests state a policy); ``policy`` defaults to ``loss`` for a
        ratio and to the value's own name otherwise; ``options``: the other fields."""
        given = [name for name, value in (("ratio", ratio), ("energy", energy), ("rank", rank))
                 if value is not None]
        if len(given) != 1:
            raise InputError(f"give exactly one of ratio, energy, rank (got {given or 'none'})")
        policy = policy or ("loss" if given[0] == "ratio" else given[0])
        want = "ratio" if policy in RATIO_POLICIES else policy
        if want != given[0]:
            raise InputError(f"rank policy {policy!r} takes --{want}, not --{given[0]}")
        return cls(policy=policy, rank=rank, energy=energy, ratio=ratio, **options)


@dataclass(frozen=True)
class RankPlan:
    """The chosen ranks and what they cost.

    Attributes:
        ranks: ``{block name: K}`` of the blocks to compress (others stay whole).
        table_format: the format the bytes are counted in.
        original_bytes: the original model's fp32 bytes.
        bytes: the compressed model's bytes, tables in ``table_format``.
        dense_ratio: how many times smaller the Linear blocks are (:func:`dense_ratio`).
    """

    ranks: dict[str, int]
    table_format: TableFormat
    original_bytes: int
    bytes: int
    dense_ratio: float | None

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.bytes

    @classmethod
    def of(cls, blocks: Sequence[Block], ranks: Mapping[str, int], fmt: TableFormat,
           other_params: int = 0) -> "RankPlan":
        """The plan of given ``ranks`` (blocks not in it whole), its bytes counted in ``fmt``."""
        cost = _Cost(blocks, fmt, other_params)
        return cls(dict(ranks), fmt, cost.original, cost.total(blocks, ranks), dense_ratio(blocks, ranks))


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


def uniform_rank(block: Block, ratio: float) -> int:
    """The rank whose factors come closest to ``ratio`` times fewer parameters (at least 1).

    ``Block.compressed_params(k)`` is ``compressed_params(0)`` (``b2``, none where the
    second factor is fused) plus ``k * params_per_rank``: the nearest integer to the ``k``
    where that line meets ``params / ratio`` is the closest rank (a tie rounds up).
    """
    fixed = block.compressed_params(0)
    k = math.floor((block.params / ratio - fixed) / block.params_per_rank + 0.5)
    return max(1, k)


def _cap(block: Block, config: RankConfig, fmt: TableFormat) -> int:
    """Largest rank (a multiple of the block's unit) at which the factors are smaller."""
    u = _unit(block, config)
    whole = served_bytes(block, None, fmt)
    k = min(block.in_features, block.out_features) // u * u
    while k > 0 and served_bytes(block, k, fmt) >= whole:
        k -= u
    return k


class _Cost:
    """Bytes of every block at its planned rank (``None``: whole)."""

    def __init__(self, blocks: Sequence[Block], fmt: TableFormat, other_params: int) -> None:
        self.fmt = fmt
        self.fixed = DENSE_BYTES * other_params
        self.original = self.fixed + sum(original_bytes(b) for b in blocks)

    def total(self, blocks: Sequence[Block], ranks: Mapping[str, int]) -> int:
        return self.fixed + sum(served_bytes(b, ranks.get(b.name), self.fmt) for b in blocks)


def _greedy(blocks: list[Block], spectra: Mapping[str, Spectrum], config: RankConfig,
            fmt: TableFormat, budget: int, pinned: Mapping[str, int],
            cap: tuple[Collection[str], int] | None = None) -> dict[str, int]:
    """Spends ``budget`` bytes (the blocks' share) on the free blocks, one rank unit at a
    time, always where a byte buys the most normalised (and weighted) retained variance;
    ``cap``: (block names, bytes) that those blocks together may not exceed either (their
    smallest ranks fit it: :func:`_dense_cap` checks).

    Every block starts at one unit (``pinned`` blocks at their rank). Past its largest
    useful rank a block's next step is to stay whole (gain: the variance still missing;
    cost: the rest of its size). Blocks that no rank makes smaller stay whole.
    """
    weights = config.weights or {}
    heap: list[tuple[float, str, int, bool]] = []
    caps = {b.name: _cap(b, config, fmt) for b in blocks}

    def push(b: Block, k: int) -> None:
        ev = spectra[b.name].eigenvalues
        total = float(ev.sum()) or 1.0
        u = _unit(b, config)
        whole = k + u > caps[b.name]
        gain = float(ev[k:].sum() if whole else ev[k: k + u].sum()) / total
        now = served_bytes(b, k, fmt)
        cost = served_bytes(b, None if whole else k + u, fmt) - now
        score = weights.get(b.name, 1.0) * gain / max(cost, 1)
        heapq.heappush(heap, (-score, b.name, cost, whole))

    by_name = {b.name: b for b in blocks}
    capped, cap_bytes = cap if cap is not None else ((), 0)
    ranks = _smallest_ranks(blocks, config, fmt, pinned)
    for b in blocks:
        if b.name in ranks and b.name not in pinned:
            push(b, ranks[b.name])
    spent = sum(served_bytes(b, ranks.get(b.name), fmt) for b in blocks)
    capped_spent = sum(served_bytes(b, ranks.get(b.name), fmt) for b in blocks if b.name in capped)
    if spent > budget:
        raise _Unreachable()
    while heap:
        _, name, cost, whole = heapq.heappop(heap)
        if spent + cost > budget or (name in capped and capped_spent + cost > cap_bytes):
            continue  # a cheaper step of another block may still fit
        spent += cost
        capped_spent += cost if name in capped else 0
        if whole:
            del ranks[name]
        else:
            ranks[name] += _unit(by_name[name], config)
            push(by_name[name], ranks[name])
    return ranks


class _Unreachable(Exception):
    """The smallest ranks already exceed the budget."""


def _uniform(blocks: list[Block], config: RankConfig, cost: _Cost, budget: int,
             pinned: Mapping[str, int]) -> dict[str, int]:
    """One per-block ratio for every free block, bisected so that the whole model fits
    ``budget`` (blocks that cannot shrink and the other parameters stay whole, so the
    per-block ratio has to exceed the target)."""
    caps = {b.name: _cap(b, config, cost.fmt) for b in blocks}

    def ranks(r: float) -> dict[str, int]:
        out = dict(pinned)
        for b in blocks:
            if b.name in pinned:
                continue
            k = _round(b, uniform_rank(b, r), config)
            if 0 < k <= caps[b.name]:
                out[b.name] = k
        return out

    lo, hi = 1.0, config.ratio
    while cost.total(blocks, ranks(hi)) > budget:
        if hi > 1e6:
            raise _Unreachable()
        lo, hi = hi, hi * 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost.total(blocks, ranks(mid)) <= budget else (mid, hi)
    return ranks(hi)


def max_ratio(blocks: Sequence[Block], config: RankConfig, fmt: TableFormat, other_params: int = 0) -> float:
    """The largest byte ratio any plan reaches in ``fmt``: every block at its smallest
    rank, or whole where that is smaller."""
    cost = _Cost(blocks, fmt, other_params)
    return cost.original / cost.total(blocks, _smallest_ranks(blocks, config, fmt, {}))


def _smallest_ranks(blocks: Sequence[Block], config: RankConfig, fmt: TableFormat,
                    pinned: Mapping[str, int]) -> dict[str, int]:
    """Where every plan starts: ``pinned`` blocks at their rank, the others at one rank
    unit where a rank makes them smaller (absent: whole)."""
    return {b.name: pinned.get(b.name, _unit(b, config)) for b in blocks
            if b.name in pinned or _cap(b, config, fmt) > 0}


def _unreachable_message(blocks: Sequence[Block], config: RankConfig, other_params: int) -> str:
    lines = []
    for device in SERVE_DEVICES:
        for dtype in DTYPES:
            fmt = TableFormat(dtype, device)
            lines.append(f"{dtype} on {device} {max_ratio(blocks, config, fmt, other_params):.2f}x")
    tried = ", ".join(f.dtype for f in config.formats)
    return (f"target ratio {config.ratio:g} is unreachable with {tried} tables served on "
            f"{config.serve_device} (table ranks are multiples of {config.table_multiple}); the "
            f"largest ratios by table format and serving device are: {'; '.join(lines)}. Ask for "
            "one of those (--ratio, --table-format, --serve-device)")


def _linears(blocks: Sequence[Block]) -> list[Block]:
    return [b for b in blocks if b.kind != "table"]


def _linear_bytes(linears: Sequence[Block], ranks: Mapping[str, int]) -> int:
    """Bytes of the Linear blocks at ``ranks`` (absent: whole); the format is the tables'
    concern alone."""
    return sum(served_bytes(b, ranks.get(b.name), TableFormat()) for b in linears)


def dense_ratio(blocks: Sequence[Block], ranks: Mapping[str, int]) -> float | None:
    """How many times fewer bytes (and multiply-adds per sample) the Linear blocks have at
    ``ranks`` than whole; None for a model without Linear blocks."""
    linears = _linears(blocks)
    return _linear_bytes(linears, {}) / _linear_bytes(linears, ranks) if linears else None


def _dense_cap(blocks: list[Block], config: RankConfig, pinned: Mapping[str, int]) -> tuple[set[str], int]:
    """The Linear blocks and their budget under ``config.dense_ratio``, which their
    smallest ranks (the same in every table format) must fit."""
    linears = _linears(blocks)
    if not linears:
        raise InputError("--dense-ratio: the model has no Linear blocks to compress")
    budget = int(_linear_bytes(linears, {}) / config.dense_ratio)
    smallest = _smallest_ranks(linears, config, TableFormat(), pinned)
    if _linear_bytes(linears, smallest) > budget:
        raise InputError(f"dense ratio {config.dense_ratio:g} is unreachable: at their smallest ranks the "
                         f"Linear blocks are {dense_ratio(linears, smallest):.2f}x smaller")
    return {b.name for b in linears}, budget


def select_ranks(
    blocks: list[Block],
    spectra: Mapping[str, Spectrum],
    config: RankConfig,
    *,
    other_params: int = 0,
) -> RankPlan:
    """Chooses a rank per block.

    Args:
        blocks: the blocks that may be compressed.
        spectra: their output spectra (see :func:`afmrec.pipeline.bases.spectra`).
        config: the rank policy.
        other_params: parameters of the model outside ``blocks`` (fp32, counted in the ratio).

    Returns:
        The plan: ranks of the blocks to compress (those that get smaller) and bytes.

    Raises:
        InputError: the target ratio cannot be met within :data:`TOLERANCE` (the message
            says which ratios can), or an explicit rank does not fit its block.
    """
    missing = [b.name for b in blocks if b.name not in spectra]
    if missing:
        raise InputError(f"no statistics for blocks {missing}: rerun the stats stage")
    if config.policy == "loss" and config.weights is None:
        raise InputError("rank policy 'loss' needs the blocks' loss sensitivity (the probes "
                         "`afmrec stats` measures); or choose --policy variance")
    overrides = resolve_pattern_map(dict(config.rank_pattern), [b.name for b in blocks])
    for b in blocks:
        if overrides.get(b.name, 0) > b.out_features:
            raise InputError(f"block {b.name}: rank {overrides[b.name]} is larger than its "
                             f"width {b.out_features}")
    free = [b for b in blocks if b.name not in overrides]
    if config.policy == "rank" and free and all(config.rank > b.out_features for b in free):
        raise InputError(f"rank {config.rank} is larger than the width of every block (the "
                         f"widest is {max(b.out_features for b in free)})")
    pinned = {b.name: _round(b, overrides[b.name], config) for b in blocks if b.name in overrides}
    if config.policy not in RATIO_POLICIES:
        fmt = config.formats[0]
        ranks = _fixed_ranks(free, spectra, config)
        ranks.update(overrides)
        return _finish(blocks, ranks, config, fmt, other_params, set(overrides))
    cap = _dense_cap(blocks, config, pinned) if config.dense_ratio is not None else None
    plans: list[RankPlan] = []
    nearest: RankPlan | None = None
    for fmt in config.formats:
        plan = _plan_in(fmt, blocks, spectra, config, pinned, other_params, cap)
        if plan is not None and abs(math.log(plan.ratio / config.ratio)) <= math.log1p(config.tolerance) + 1e-12:
            plans.append(plan)
        nearest = nearest or plan
    if plans:
        # the format whose plan drops the least estimated loss (a narrower format holds
        # higher ranks in the same bytes; its rounding costs far less than a dropped
        # direction); a tie keeps the wider format
        return min(plans, key=lambda p: estimated_loss(p.ranks, blocks, spectra, config.weights))
    if nearest is None:
        raise InputError(_unreachable_message(blocks, config, other_params))
    raise InputError(
        f"target ratio {config.ratio:g} cannot be met within {config.tolerance:.0%}: with "
        f"{nearest.table_format} the ranks step past it (the nearest plan is "
        f"{nearest.ratio:.2f}x: the next rank unit of any block costs more than the rest of the "
        f"budget). Ask for --ratio {nearest.ratio:.2f}, or a lower ratio")


def _plan_in(fmt: TableFormat, blocks: list[Block], spectra: Mapping[str, Spectrum], config: RankConfig,
             pinned: Mapping[str, int], other_params: int,
             cap: tuple[Collection[str], int] | None = None) -> RankPlan | None:
    """The plan of a ratio policy in one format: with the target's budget, or (where the
    ranks step far past the target) the budget of a ratio just inside the tolerance
    below it, or (where the greedy still stops far past it) that budget's plan with one
    coarse step taken first (:func:`_pay_for_a_step`); ``None`` where even the smallest
    ranks exceed both. ``cap``: the Linear blocks' own budget (:func:`_greedy`)."""
    cost = _Cost(blocks, fmt, other_params)
    plan = None
    for budget in (int(cost.original / config.ratio), int(cost.original * (1 + config.tolerance) / config.ratio)):
        try:
            if config.policy == "uniform":
                ranks = _uniform(blocks, config, cost, budget, pinned)
            else:
                ranks = _greedy(blocks, spectra, config, fmt, budget - cost.fixed, pinned, cap)
        except _Unreachable:
            continue
        plan = _finish(blocks, ranks, config, fmt, other_params, set(pinned))
        if plan.ratio <= config.ratio * (1 + config.tolerance):
            return plan
    if plan is not None and config.policy != "uniform":
        # the greedy's ranks and budget are the tolerance's (the larger) budget's
        band = (math.ceil(cost.original / (config.ratio * (1 + config.tolerance))), budget)
        paid = _pay_for_a_step(blocks, spectra, config, cost, ranks, band, pinned, cap)
        if paid is not None:
            return _finish(blocks, paid, config, fmt, other_params, set(pinned))
    return plan


def _pay_for_a_step(blocks: list[Block], spectra: Mapping[str, Spectrum], config: RankConfig, cost: _Cost,
                    ranks: Mapping[str, int], band: tuple[int, int], pinned: Mapping[str, int],
                    cap: tuple[Collection[str], int] | None) -> dict[str, int] | None:
    """Where the greedy's plan ``ranks`` stops far smaller than asked (every block's next
    step costs more than the bytes left: coarse rank units), the plans that take one of
    those steps first: the block pinned one unit further (or whole, past its largest
    useful rank), the greedy run again for the others in the same bytes. Of those that
    land in ``band`` (the whole model's bytes, at least and at most, as ``cost`` counts
    them), the one that drops the least estimated loss; None where none does. ``cap``:
    the Linear blocks' own budget."""
    fmt, (floor, budget) = cost.fmt, band
    capped, cap_bytes = cap if cap is not None else ((), 0)

    def within_cap(plan: Mapping[str, int]) -> bool:
        return cap is None or _linear_bytes([x for x in blocks if x.name in capped], plan) <= cap_bytes

    share = budget - cost.fixed  # the blocks' bytes, as _greedy takes its budget
    best, best_loss = None, math.inf
    for b in blocks:
        if b.name in pinned or b.name not in ranks:
            continue  # whole already, or not the planner's to move
        k = ranks[b.name] + _unit(b, config)
        if k <= _cap(b, config, fmt):
            others, spend, pins = blocks, share, {**pinned, b.name: k}
        else:  # its next step is to stay whole: plan the others in the bytes it leaves
            others, spend, pins = [x for x in blocks if x is not b], share - served_bytes(b, None, fmt), pinned
        try:
            plan = _greedy(others, spectra, config, fmt, spend, pins, cap)
        except _Unreachable:
            continue
        loss = estimated_loss(plan, blocks, spectra, config.weights)
        if floor <= cost.total(blocks, plan) <= budget and within_cap(plan) and loss < best_loss:
            best, best_loss = plan, loss
    return best


def estimated_loss(ranks: Mapping[str, int], blocks: Sequence[Block], spectra: Mapping[str, Spectrum],
                   weights: Mapping[str, float] | None = None) -> float:
    """The greedy's objective: each compressed block's dropped share of its output
    variance, times its loss weight (1 without weights)."""
    weights = weights or {}
    return sum(weights.get(b.name, 1.0) * (1.0 - spectra[b.name].energy(ranks[b.name]))
               for b in blocks if b.name in ranks)


def _fixed_ranks(free: list[Block], spectra: Mapping[str, Spectrum], config: RankConfig) -> dict[str, int]:
    if config.policy == "rank":
        return {b.name: config.rank for b in free}
    return {b.name: energy_rank(spectra[b.name], config.energy) for b in free}


def _finish(blocks: list[Block], wanted: Mapping[str, int], config: RankConfig, fmt: TableFormat,
            other_params: int, overridden: Collection[str]) -> RankPlan:
    """Rounds the wanted ranks to the blocks' units and drops those that would not make
    their block smaller; ``overridden``: the blocks whose rank ``rank_pattern`` gave."""
    out = {}
    for b in blocks:
        if b.name not in wanted:
            continue
        want = wanted[b.name]
        if want >= b.out_features:  # a --rank above a narrow block's width
            log.info("block %s: rank %d is not below its width %d; kept whole", b.name, want,
                     b.out_features)
            continue
        k = _round(b, want, config)
        explicit = config.policy == "rank" or b.name in overridden
        if k != want and explicit and b.kind == "table" and config.table_rounding == "error":
            raise InputError(
                f"block {b.name}: table rank {want} is not a multiple of --table-multiple "
                f"{config.table_multiple} (what FBGEMM's fused kernels need)"
            )
        if k != want and (explicit or config.policy == "energy"):
            log.warning("block %s: rank %d rounded up to %d", b.name, want, k)
        if served_bytes(b, k, fmt) >= served_bytes(b, None, fmt):
            log.info("block %s: rank %d would not make it smaller; kept whole", b.name, k)
            continue
        out[b.name] = k
    return RankPlan.of(blocks, out, fmt, other_params)
