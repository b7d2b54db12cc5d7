"""Streaming output statistics of every block: ``n``, ``sum y``, ``sum y y^T`` in float64.

"Prepare, run the caller's forward loop, convert" (as torchao's calibration): the
:class:`StatsCollector` installs forward hooks, the caller runs its own loop, and
:meth:`StatsCollector.result` returns mergeable :class:`Statistics`.

Where tables are observed: at the output of the module that owns the collection (TorchRec's
``SparseArch``), i.e. where the dense part consumes the pooled features. Under
``DistributedModelParallel`` the collection itself returns a lazy awaitable, but
``SparseArch`` returns a plain (B, F, D) tensor on every rank, so one hook serves both.
Empty bags are not counted: their output is exactly 0 before and after compression.

The package, by concern:

* :mod:`.moments`: the maths: :class:`Moments` of one block, :func:`batch_moments` (the
  products of a batch, in a chosen precision) and :class:`Statistics` (moments by block).
* :mod:`.observers`: the forward hooks' side: what a forward pass held, and how its
  moments are added to the sums.
* :mod:`.graphs`: the CUDA-graph capture of that update.
* :mod:`.collector`: :class:`StatsCollector` and :func:`collect_statistics`, the pass.
* :mod:`.checkpoint`: :class:`StatsCheckpoint`, periodic saves that a killed pass
  resumes from.
"""

from .checkpoint import StatsCheckpoint
from .collector import StatsCollector, collect_statistics
from .moments import (
    PRECISIONS,
    Moments,
    Statistics,
    add_batch_moments_,
    batch_moments,
    check_precision,
    moments_from_state,
    moments_state,
    resolve_precision,
)

__all__ = [
    "PRECISIONS",
    "Moments",
    "Statistics",
    "StatsCheckpoint",
    "StatsCollector",
    "add_batch_moments_",
    "batch_moments",
    "check_precision",
    "collect_statistics",
    "moments_from_state",
    "moments_state",
    "resolve_precision",
]
