"""How much each block's truncation costs in loss: weights for the global rank budget.

Retained variance alone misjudges blocks (DESIGN.md section 2): a hidden layer can keep 99%
of its output variance and still cost more AUC than a table cut to a quarter of its
variance. So each block is truncated *alone* to a few ranks (its AFM factors at rank ``k``,
every other block whole), the calibration loss is measured, and the increase per unit of
dropped (normalised) variance becomes the block's weight:

    w_b = sum_k d_bk * dL_bk / sum_k d_bk^2       (least squares through the origin)

with ``d_bk = 1 - energy_b(k)`` and ``dL_bk`` the loss increase at rank ``k``. The greedy of
:func:`afmrec.pipeline.ranks.select_ranks` multiplies variance gains by ``w_b``
(``RankConfig.weights``), so it spends the budget where a parameter saves the most
estimated loss rather than the most variance.

Example::

    probes = measure_sensitivity(model, blocks, spec, calibration_batches)
    ranks = select_ranks(blocks, spec, RankConfig(mode="ratio", ratio=16,
                                                  weights=sensitivity_weights(probes)))
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from torch import nn
from torchrec.datasets.utils import Batch

from .bases import Spectrum, afm_bases
from .blocks import Block
from .compress import CompressConfig, compress_
from .errors import InputError
from .evaluate import evaluate
from .ranks import energy_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityConfig:
    """Which ranks to probe, and how to turn the probes into weights.

    Args:
        energies: each block is probed at the smallest ranks keeping these fractions of
            its output variance (distinct ranks only, below full rank).
        floor: a weight is at least ``floor`` times the mean weight, so that a block whose
            truncation showed no loss increase on the calibration rows is still not free.
    """

    energies: tuple[float, ...] = (0.7, 0.9, 0.97, 0.99)
    floor: float = 0.05

    def __post_init__(self) -> None:
        if not self.energies or not all(0 < e < 1 for e in self.energies):
            raise InputError(f"sensitivity energies must be in (0, 1), got {self.energies}")
        if self.floor < 0:
            raise InputError(f"sensitivity floor must be >= 0, got {self.floor}")


@dataclass(frozen=True)
class Probe:
    """One block truncated alone.

    Attributes:
        block: the block's name.
        rank: the rank it was cut to.
        dropped: fraction of its output variance the rank drops (``1 - energy``).
        delta_loss: calibration logloss of the truncated model minus the original's.
    """

    block: str
    rank: int
    dropped: float
    delta_loss: float


def probe_ranks(spectrum: Spectrum, energies: Iterable[float], max_rank: int) -> list[int]:
    """The distinct ranks, at most ``max_rank``, that first keep each of ``energies`` (none
    for a constant output: every rank keeps all of it)."""
    ranks = {energy_rank(spectrum, e) for e in energies}
    return sorted(k for k in ranks if k <= max_rank and spectrum.energy(k) < 1.0)


def measure_sensitivity(
    model: nn.Module,
    blocks: Sequence[Block],
    spectra: Mapping[str, Spectrum],
    batches: Sequence[Batch],
    config: SensitivityConfig = SensitivityConfig(),
) -> list[Probe]:
    """Truncates each block alone at the probed ranks and measures the calibration loss.

    Args:
        model: the trained, uncompressed model (left unchanged: each probe compresses a copy).
        blocks: the blocks to probe.
        spectra: their output spectra.
        batches: labelled calibration batches (kept in memory: each probe runs over them).
        config: the probed energies.
    Returns:
        One :class:`Probe` per block and probed rank.
    """
    base = evaluate(model, batches).logloss
    probes = []
    for block in blocks:
        spectrum = spectra[block.name]
        for k in probe_ranks(spectrum, config.energies, min(block.in_features, block.out_features)):
            truncated = compress_(copy.deepcopy(model), afm_bases(spectra, {block.name: k}),
                                  CompressConfig())
            loss = evaluate(truncated, batches).logloss
            probes.append(Probe(block.name, k, 1.0 - spectrum.energy(k), loss - base))
    return probes


def sensitivity_weights(probes: Iterable[Probe], floor: float = SensitivityConfig.floor) -> dict[str, float]:
    """Loss increase per unit of dropped variance, by block (see the module docstring).

    Negative increases (noise on the calibration rows) count as 0; weights are floored at
    ``floor`` times the mean weight. Blocks without probes get no weight (1.0 in the
    greedy: their variance is all kept at any rank, so it never matters).
    """
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for p in probes:
        num[p.block] = num.get(p.block, 0.0) + p.dropped * max(p.delta_loss, 0.0)
        den[p.block] = den.get(p.block, 0.0) + p.dropped**2
    raw = {name: num[name] / den[name] for name in num if den[name] > 0}
    if not raw:
        return {}
    low = floor * sum(raw.values()) / len(raw)
    if low <= 0:
        return {}  # no measurable effect anywhere: fall back to variance alone
    return {name: max(w, low) for name, w in raw.items()}
