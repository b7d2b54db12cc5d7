"""The pipeline stages, each reading artifacts and writing one new artifact atomically.

    train    DATA            -> MODEL_DIR          (model.json + DCP checkpoint)
    stats    MODEL_DIR, DATA -> STATS.pt           (moments by block + metadata)
    compress MODEL_DIR, STATS -> MODEL_DIR'        (+ bases.pt, ranks.parquet)
    finetune MODEL_DIR', DATA [, teacher] -> MODEL_DIR''
    evaluate {name: MODEL_DIR}, DATA -> report.parquet

Every stage refuses to write over an existing output (unless ``overwrite``) and over any
of its inputs, and records what produced it (versions, input fingerprints, config).

Each stage takes a :class:`~afmrec.sharding.env.DistEnv`. In a job of several ranks
(torchrun, SLURM) models are sharded with a :class:`~afmrec.sharding.plan.ShardingConfig`,
each rank reads its own contiguous part of the data (the same number of batches on every
rank: a sharded forward is collective), statistics are all-reduced, tables are compressed
where their shards live, and checkpoints are written by all ranks. Without a process group
the same code runs in one process.

The package, a module a stage:

* :mod:`.inputs`: what the stages read: :class:`DataRef` (a dataset or a range of its
  rows), the checks that data and a teacher match a model, a model's fingerprint.
* :mod:`.training`: ``train`` and ``finetune`` (:func:`fit`).
* :mod:`.statistics`: ``stats`` (moments and loss probes), and the statistics file.
* :mod:`.compression`: ``compress``: the rank plan, the bases, and the folding of
  sharded tables.
* :mod:`.evaluation`: ``evaluate``, the report.
"""

from .compression import (compress_sharded, compress_stage, plan_model, plan_ranks, plan_report, summary_line,
                          with_weights)
from .evaluation import evaluate_stage
from .inputs import (
    LOCAL,
    DataRef,
    check_matching_schema,
    check_teacher,
    model_config_from_schema,
    model_fingerprint,
)
from .statistics import load_statistics, save_statistics, stats_stage
from .training import finetune_stage, fit, train_stage


__all__ = [
    "LOCAL",
    "DataRef",
    "check_matching_schema",
    "check_teacher",
    "compress_sharded",
    "compress_stage",
    "evaluate_stage",
    "finetune_stage",
    "fit",
    "load_statistics",
    "model_config_from_schema",
    "model_fingerprint",
    "plan_model",
    "plan_ranks",
    "plan_report",
    "summary_line",
    "save_statistics",
    "stats_stage",
    "train_stage",
    "with_weights",
]
