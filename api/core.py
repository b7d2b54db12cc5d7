"""``compress_``: a model compressed in one call (statistics, probes, ranks, factors).

The same stages as the CLI (``afmrec stats`` then ``afmrec compress``), in memory and on
any ``nn.Module`` holding TorchRec ``EmbeddingBagCollection``\\ s and ``nn.Linear``\\ s:

1. :func:`~afmrec.pipeline.blocks.find_blocks`: every table and ``nn.Linear``;
2. :func:`~afmrec.pipeline.stats.collect_statistics`: one forward pass over the
   calibration batches, observing each block's outputs (a table's pooled rows where its
   collection returns them, or where a TorchRec ``SparseArch`` does);
3. :func:`~afmrec.pipeline.bases.spectra`: their PCA;
4. for the ``loss`` policy, :func:`~afmrec.pipeline.sensitivity.measure_sensitivity`:
   each block truncated alone, the KL divergence of the model's predictions from the
   original's measured on probe batches;
5. :func:`~afmrec.pipeline.stages.plan_model`: a rank per block;
6. :func:`~afmrec.pipeline.compress.compress_`: every planned block swapped for its
   factors (a table for a K-wide table and a projection, a Linear for two).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from afmrec.models import LowRankEmbeddingBagCollection, LowRankLinear
from afmrec.pipeline.bases import afm_bases, spectra
from afmrec.pipeline.blocks import find_blocks, select_blocks
from afmrec.pipeline.compress import CompressConfig
from afmrec.pipeline.compress import compress_ as swap_blocks_
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.ranks import RankPlan
from afmrec.pipeline.sensitivity import SensitivityConfig, measure_sensitivity, probes_to_records
from afmrec.pipeline.stages import plan_model, plan_report, summary_line, with_weights
from afmrec.pipeline.stats import Statistics, collect_statistics

from .config import AFMConfig

log = logging.getLogger("afmrec")

Feed = Callable[[nn.Module, Any], torch.Tensor]
PLAN_ATTRIBUTE = "afmrec_plan"  # the summary compress_ leaves on the model (export reads it)


@dataclass(frozen=True)
class AFMResult:
    """What :func:`compress_` did.

    Attributes:
        plan: the planner's :class:`~afmrec.pipeline.ranks.RankPlan` (ranks, the table
            format, the original's and the compressed model's served bytes).
        policy: the rank policy used (``"loss"``, ...).
        summary: the whole model: parameters, checkpoint and served bytes before and
            after, ratio, table format, serving device (what ``afmrec compress``
            records in ``model.json``).
        blocks: one row per block: rank, variance kept, parameters and bytes before and
            after, loss weight (what ``afmrec compress`` writes to ``ranks.parquet``).
        skipped: blocks that saw no calibration row (their module never ran, or its
            weight is used without calling it), left whole.
    """

    plan: RankPlan
    policy: str
    summary: dict[str, Any]
    blocks: list[dict[str, Any]]
    skipped: tuple[str, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        """``{block name: K}`` of the compressed blocks."""
        return dict(self.plan.ranks)

    @property
    def ratio(self) -> float:
        """The achieved whole-model ratio of served bytes."""
        return self.plan.ratio

    @property
    def table_format(self) -> str:
        """The tables' served row format the ratio counts (``fp32``, ``fp16``, ``int8``)."""
        return self.plan.table_format.dtype

    def __str__(self) -> str:
        return summary_line(self.summary, self.blocks)


def _rows(batch: Any) -> int | None:
    """Rows of a TorchRec ``Batch`` (None for batches of other types)."""
    dense = getattr(batch, "dense_features", None)
    return int(dense.shape[0]) if isinstance(dense, torch.Tensor) else None


def _probe_batches(batches: Sequence[Any], config: AFMConfig) -> list[Any]:
    """The last ``probe_fraction`` of ``batches`` (at least one), at most ``probe_rows``
    rows of them (whole batches, at least one)."""
    n = max(1, round(len(batches) * config.probe_fraction))
    chosen, rows = [], 0
    for batch in batches[len(batches) - n:]:
        size = _rows(batch)
        if chosen and config.probe_rows is not None and size is not None and rows + size > config.probe_rows:
            break
        chosen.append(batch)
        rows += size or 0
    return chosen


def _observed(stats: Statistics) -> tuple[Statistics, tuple[str, ...]]:
    """The statistics of the blocks that saw rows, and the names of those that saw none."""
    empty = tuple(sorted(name for name, m in stats.moments.items() if int(m.n) == 0))
    if len(empty) == len(stats.moments):
        raise InputError("compress_: no calibration row reached the model's blocks (are the "
                         "calibration batches empty, or does `forward` not run the model?)")
    if empty:
        log.warning("compress_: %d blocks saw no calibration row and stay whole: %s", len(empty),
                    ", ".join(empty))
    kept = {name: m for name, m in stats.moments.items() if name not in empty}
    return Statistics(kept, stats.meta), empty


def compress_(
    model: nn.Module,
    batches: Iterable[Any],
    config: AFMConfig,
    *,
    forward: Feed | None = None,
    probe_batches: Iterable[Any] | None = None,
) -> AFMResult:
    """Compresses ``model`` in place with low-rank factors (AFM) and returns the plan.

    Every ``EmbeddingBagCollection`` table (D wide, V rows) and every ``nn.Linear`` (n ->
    m) of ``model`` is a block. From one forward pass over ``batches`` each block's output
    covariance gives its principal directions ``U`` (m x K) and mean; a table becomes a
    K-wide table ``E U`` (V x K) plus a projection K -> D, a Linear becomes n -> K -> m,
    each returning what the block returned at full rank (outputs equal up to float
    rounding where K keeps all the variance, ``AFMConfig(energy=1.0)``).

    Args:
        model: an unsharded ``nn.Module`` (any architecture) on the device it runs on;
            its collections' outputs (``KeyedTensor``) or its TorchRec ``SparseArch``'s
            (B, F, D) fields are observed. Modules are swapped in place.
        batches: calibration batches, TorchRec ``Batch``\\ es (dense (B, N), sparse
            KJT, labels unused) unless ``forward`` says how to run them. For the ``loss``
            policy without ``probe_batches`` they are read into a list (the probes run
            on the last ``config.probe_fraction`` of them); otherwise iterated once.
        config: the target (ratio, energy or rank) and the rank policy.
        forward: ``forward(model, batch) -> logits`` (any shape, each entry one
            Bernoulli logit), the batch on the model's device: how a batch is fed to
            the model. Default: ``model(batch.dense_features, batch.sparse_features)``,
            the batch moved to the model's device.
        probe_batches: the ``loss`` policy's probe batches (ideally rows the model was
            not trained on); default: the last ``config.probe_fraction`` of ``batches``.

    Returns:
        The plan and its summary (``str(result)``: one line). The summary is also left
        on the model as ``model.afmrec_plan`` (:func:`afmrec.export` takes its table
        format).

    Raises:
        InputError (a ``ValueError``): the model has no block, is already compressed,
            no row reached it, or the target cannot be met (the message says what can).

    Example::

        result = compress_(model, batches, AFMConfig(ratio=4))
        result.ratio, result.policy, result.ranks  # 4.1, 'loss', {'ebc.t0': 4, ...}
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"compress_: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, AFMConfig):
        raise InputError(f"compress_: config must be an afmrec.AFMConfig, got {type(config).__name__}")
    if forward is not None and not callable(forward):
        raise InputError(f"compress_: forward must be callable as forward(model, batch), got {forward!r}")
    if any(isinstance(m, (LowRankLinear, LowRankEmbeddingBagCollection)) for m in model.modules()):
        raise InputError("compress_: the model is already compressed (compress the original)")
    found = find_blocks(model)
    if not found:
        raise InputError(f"compress_: {type(model).__name__} holds no EmbeddingBagCollection table or "
                         "nn.Linear to compress")
    blocks = select_blocks(found, config.target, config.exclude)
    loss = config.rank_policy == "loss"
    if loss and probe_batches is None:
        batches = list(batches)
        if not batches:
            raise InputError("compress_: no calibration batches")
        probe_batches = _probe_batches(batches, config)
    stats = collect_statistics(model, blocks, batches, precision=config.precision, feed=forward,
                               progress=config.progress)
    stats, skipped = _observed(stats)
    blocks = [b for b in blocks if b.name in stats.moments]
    spec = spectra(stats)
    if loss:
        sensitivity = SensitivityConfig(rows=config.probe_rows)
        probes = measure_sensitivity(model, blocks, spec, probe_batches, sensitivity, feed=forward,
                                     progress=config.progress)
        stats.meta["sensitivity"] = {"probes": probes_to_records(probes), "floor": sensitivity.floor}
    rank_config = with_weights(config.rank_config(), stats, "compress_")
    compression = CompressConfig()
    planned, plan = plan_model(model, spec, rank_config, compression.fuse)
    swap_blocks_(model, afm_bases(spec, plan.ranks), compression)
    rows, summary = plan_report(planned, spec, plan, rank_config)
    setattr(model, PLAN_ATTRIBUTE, summary)
    return AFMResult(plan, rank_config.policy, summary, rows, skipped, dict(rank_config.weights or {}))
