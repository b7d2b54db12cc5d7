"""The speed benchmark's workload: the MLPerf DLRMv2 model shape and its synthetic,
production-shaped batches (``afmrec bench speed``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import ModelConfig, TableSpec

from ...errors import InputError

# MLPerf DLRMv2 (Criteo 1TB multi-hot): rows and bag size of each of the 26 tables.
CRITEO_1TB_ROWS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)
MLPERF_BAG_SIZES = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)

SEEDS = {"train": 0, "infer": 1, "latency": 2, "calibration": 3, "probes": 4, "fit": 5, "eval": 6, "labels": 7}
"""Seeds of the batch sets: each set is drawn apart, so the statistics and the loss probes
that calibrate the AFM variants are held out from the batches that time them, and the
batches that train the model (``fit``) from those that measure the variants' AUC
(``eval``); ``labels``: the hidden model that labels both
(:mod:`afmrec.pipeline.benchmarks.speed.labels`)."""


@dataclass(frozen=True)
class SpeedShape:
    """The benchmark's model and batch shape.

    Attributes:
        table_cap: rows per table at most (the Criteo-1TB cardinalities capped).
        embedding_dim: D, every table's width.
        num_dense: dense features.
        dense_arch, over_arch: the MLPs' widths.
        dcn_num_layers, dcn_low_rank_dim: the cross network's layers and rank.
        train_batch: rows of a training batch and of a batch of the statistics pass.
        infer_batch: rows of a timed inference batch.
        latency_batches: the CPU latency stage's batch sizes.
        zipf_exponent: the ids' power law.
        steps: timed training steps.
        stats_batches: the statistics pass, defined once: ``stats_batches`` batches of
            ``train_batch`` rows (200 x 8,192 = 1.6M rows at the production shape). The
            AFM variants are calibrated on such a pass over held-out batches, and the
            statistics stage times such a pass against a forward-only pass over the same
            batches (its set-up, a first eager batch and a captured CUDA graph, costs a
            few batches' time once, which a pass of 50 batches still showed).
        probe_rows: rows of the loss probes (``afmrec stats --probe-rows``; held out from
            the statistics' batches too).
        repeats: timed repeats of each side-by-side measurement (training, the
            statistics pass, each served artifact); the fastest is kept.
        fit_steps: the served model is first trained this many steps of ``train_batch``
            rows on labels with a signal (:mod:`~afmrec.pipeline.benchmarks.speed.labels`),
            then calibrated and compressed: its variants' plans are a trained model's,
            and their AUC is measured. 0: served at its initialisation (no AUC).
        eval_batches: batches of ``infer_batch`` labelled rows, held out from training,
            over which every served artifact's AUC is measured.
    """

    table_cap: int = 4_000_000
    embedding_dim: int = 128
    num_dense: int = 13
    dense_arch: tuple[int, ...] = (512, 256, 128)
    over_arch: tuple[int, ...] = (1024, 1024, 512, 256, 1)
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 512
    train_batch: int = 8192
    infer_batch: int = 65536
    latency_batches: tuple[int, ...] = (1, 64, 2048)
    zipf_exponent: float = 1.1
    steps: int = 50
    stats_batches: int = 200
    probe_rows: int = 16_384
    repeats: int = 3
    fit_steps: int = 300
    eval_batches: int = 8

    def __post_init__(self) -> None:
        counts = ("table_cap", "embedding_dim", "num_dense", "dcn_num_layers", "dcn_low_rank_dim", "train_batch",
                  "infer_batch", "steps", "stats_batches", "probe_rows", "repeats", "eval_batches")
        bad = [f"{name}={getattr(self, name)}" for name in counts if getattr(self, name) < 1]
        bad += [f"fit_steps={self.fit_steps}"] if self.fit_steps < 0 else []
        if bad:
            raise InputError(f"speed shape: {', '.join(bad)} (counts must be >= 1, fit_steps >= 0)")

    @classmethod
    def small(cls) -> "SpeedShape":
        """The same structure at a size a 2-core CPU runs in about a minute."""
        return cls(table_cap=20_000, embedding_dim=64, dense_arch=(128, 64), over_arch=(128, 64, 1),
                   dcn_low_rank_dim=32, train_batch=1024, infer_batch=4096, steps=6, stats_batches=6,
                   probe_rows=256, repeats=2, fit_steps=300, eval_batches=4)

    @property
    def table_rows(self) -> tuple[int, ...]:
        return tuple(min(n, self.table_cap) for n in CRITEO_1TB_ROWS)

    def model_config(self) -> ModelConfig:
        tables = tuple(TableSpec(f"t{i}", n) for i, n in enumerate(self.table_rows))
        return ModelConfig("dcn", tables, num_dense=self.num_dense, embedding_dim=self.embedding_dim,
                           dense_arch=self.dense_arch, over_arch=self.over_arch,
                           dcn_num_layers=self.dcn_num_layers, dcn_low_rank_dim=self.dcn_low_rank_dim)


def iter_batches(shape: SpeedShape, batch_size: int, count: int, device: torch.device,
                 seed: int = 0) -> Iterator[Batch]:
    """``count`` batches of multi-hot bags (MLPerf bag sizes) with power-law ids, made one
    at a time (a pass over many holds one on the device).

    A table's ids are its popularity ranks scattered by a multiplicative hash (a
    bijection of the table's rows), so hot rows are spread over the table. Dense
    features (B, num_dense) are standard normal, labels (B,) 1 with probability 0.25.
    """
    from ...data.synth import zipf_ranks

    rng = np.random.default_rng(seed)
    keys = [t.name for t in shape.model_config().tables]
    for _ in range(count):
        values, lengths = [], []
        for rows, bag in zip(shape.table_rows, MLPERF_BAG_SIZES):
            ranks = zipf_ranks(rng, rows, batch_size * bag, shape.zipf_exponent)
            values.append((ranks * 2654435761) % rows)
            lengths.append(np.full(batch_size, bag))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.from_numpy(np.concatenate(values)),
            lengths=torch.from_numpy(np.concatenate(lengths)).int(),
        )
        dense = torch.from_numpy(rng.standard_normal((batch_size, shape.num_dense), dtype=np.float32))
        labels = torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32))
        yield Batch(dense, kjt, labels).to(device)


def make_batches(shape: SpeedShape, batch_size: int, count: int, device: torch.device,
                 seed: int = 0) -> list[Batch]:
    """:func:`iter_batches`, as a list."""
    return list(iter_batches(shape, batch_size, count, device, seed))
