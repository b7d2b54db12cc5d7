"""``AFMConfig``: what :func:`afmrec.compress_` is asked for, checked when it is made."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from afmrec.pipeline.budget import POLICIES, RATIO_POLICIES, SERVE_DEVICES, TABLE_FORMATS
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.ranks import RankConfig
from afmrec.pipeline.sensitivity import SensitivityConfig
from afmrec.pipeline.stats import PRECISIONS


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class AFMConfig:
    """How :func:`afmrec.compress_` compresses a model. Give exactly one of ``ratio``,
    ``energy`` or ``rank``.

    Args:
        ratio: the whole model this many times smaller in served bytes (> 1): the
            original's fp32 parameters against the compressed model with its tables in
            ``table_format``, rows padded as on ``serve_device``. The plan lands within
            10% of it (``afmrec.pipeline.ranks.TOLERANCE``) or compression stops with
            an error saying which ratios can be reached.
        energy: per block, the smallest rank keeping this fraction of its output
            variance, in (0, 1] (1.0: exact; a block no rank makes smaller stays whole).
        rank: one rank K for every block (>= 1; blocks at most K wide stay whole).
        policy: how ranks are chosen (``afmrec.pipeline.ranks``): ``"loss"`` (the
            default with ``ratio``: the byte budget goes where it saves the most loss,
            measured by per-block probes), ``"variance"``, ``"uniform"``; ``"energy"``
            and ``"rank"`` (the defaults with those values).
        table_format: the tables' served row format that the ratio counts: ``"auto"``
            (the plan in fp32, fp16 or int8 that drops the least estimated loss),
            ``"fp32"``, ``"fp16"`` or ``"int8"``. :func:`afmrec.export` uses it.
        serve_device: ``"cuda"`` (rows padded to 16 bytes, as FBGEMM serves them) or
            ``"cpu"`` (unpadded).
        probe_fraction: the ``loss`` policy's probes run on the last this fraction of the
            calibration batches (at least one batch) unless ``probe_batches`` are given.
        probe_rows: at most this many probe rows (each probe is a forward pass over them;
            counted for TorchRec ``Batch``\\ es); ``None``: all.
        precision: the statistics pass's batch products: ``"auto"`` (bfloat16 on CUDA,
            float32 on a CPU), ``"float64"``, ``"float32"`` or ``"bfloat16"``.
        target: block-name globs to compress (default all; names are module paths, plus
            the table name for tables: ``ebc.t0``).
        exclude: block-name globs to leave whole.
        table_multiple: table ranks are multiples of this (4: FBGEMM's fused kernels).
        dense_ratio: with ``ratio`` (``loss`` or ``variance``), also make the Linear
            layers this many times smaller, i.e. as many times fewer multiply-adds per
            sample (``afmrec compress --dense-ratio``); ``None``: bytes alone decide.
        progress: show progress bars.
    """

    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    policy: str | None = None
    table_format: str = "auto"
    serve_device: str = "cuda"
    probe_fraction: float = SensitivityConfig.fraction
    probe_rows: int | None = SensitivityConfig.rows
    precision: str = "auto"
    target: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    table_multiple: int = 4
    dense_ratio: float | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        given = [n for n in ("ratio", "energy", "rank") if getattr(self, n) is not None]
        if len(given) != 1:
            raise InputError(f"AFMConfig: give exactly one of ratio, energy, rank (got {given or 'none'})")
        if self.ratio is not None and not (_real(self.ratio) and self.ratio > 1):
            raise InputError(f"AFMConfig: ratio must be a number > 1, got {self.ratio!r}")
        if self.energy is not None and not (_real(self.energy) and 0 < self.energy <= 1):
            raise InputError(f"AFMConfig: energy must be a number in (0, 1], got {self.energy!r}")
        if self.rank is not None and not (isinstance(self.rank, numbers.Integral)
                                          and not isinstance(self.rank, bool) and self.rank >= 1):
            raise InputError(f"AFMConfig: rank must be an integer >= 1, got {self.rank!r}")
        if self.policy is not None:
            if self.policy not in POLICIES:
                raise InputError(f"AFMConfig: policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
            want = "ratio" if self.policy in RATIO_POLICIES else self.policy
            if want != given[0]:
                raise InputError(f"AFMConfig: policy {self.policy!r} takes {want}=, not {given[0]}=")
        _one_of("table_format", self.table_format, TABLE_FORMATS)
        _one_of("serve_device", self.serve_device, SERVE_DEVICES)
        _one_of("precision", self.precision, ("auto", *PRECISIONS))
        if not (_real(self.probe_fraction) and 0 < self.probe_fraction <= 1):
            raise InputError(f"AFMConfig: probe_fraction must be in (0, 1], got {self.probe_fraction!r}")
        if self.probe_rows is not None and not (isinstance(self.probe_rows, numbers.Integral)
                                                and self.probe_rows >= 1):
            raise InputError(f"AFMConfig: probe_rows must be an integer >= 1 or None, got {self.probe_rows!r}")
        if not (isinstance(self.table_multiple, numbers.Integral) and self.table_multiple >= 1):
            raise InputError(f"AFMConfig: table_multiple must be an integer >= 1, got {self.table_multiple!r}")
        for name in ("target", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise InputError(f"AFMConfig: {name} must be a sequence of glob strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self.rank_config()  # the planner's own checks

    @property
    def rank_policy(self) -> str:
        """The policy in effect (``policy``, or the default for the value given)."""
        return self.policy or ("loss" if self.ratio is not None else "energy" if self.energy is not None
                               else "rank")

    def rank_config(self) -> RankConfig:
        """The planner's :class:`~afmrec.pipeline.ranks.RankConfig` (without loss weights)."""
        return RankConfig.from_policy(
            self.policy, ratio=self.ratio, energy=self.energy, rank=self.rank,
            table_format=self.table_format, serve_device=self.serve_device,
            table_multiple=self.table_multiple, dense_ratio=self.dense_ratio)


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"AFMConfig: {name} must be one of {', '.join(choices)}, got {value!r}")
