"""The training stage of ``afmrec bench speed``: our trainer against TorchRec's own.

The baseline is what a TorchRec user runs: the model sharded by the same planner, driven
by TorchRec's ``TrainPipelineSparseDist`` (the next batch's host-to-device copy and its
input all-to-all overlap the current step), with the optimizers our trainer uses (fused
Adagrad for the tables inside the backward pass, Adam for the rest). Both sides read
the same batches from host memory, pinned on CUDA as a ``DataLoader(pin_memory=True)``
yields them, and run the same number of steps.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from afmrec.models import build_model
from afmrec.sharding.dmp import shard_model
from afmrec.sharding.env import DistEnv
from afmrec.sharding.plan import planner_plan

from ...model_io import ModelRecord
from ...runinfo import fastest_interleaved
from ...train import TrainConfig, make_optimizer, train_
from .shape import SpeedShape


TRAIN_CONFIG = TrainConfig(dense_lr=1e-4, sparse_lr=1e-3, log_every=10**9)
"""Both sides' settings. The stage repeats a few batches of random labels for hundreds of
steps, which the default rates drive to divergence (``train_`` refuses a diverged run);
the rates do not change a step's cost."""


class LossModel(nn.Module):
    """A CTR model in the form TorchRec's train pipelines drive (the role of TorchRec's
    ``DLRMTrain``): ``batch -> (loss, (loss, logits (B,), labels (B,)))``, the loss the
    mean binary cross-entropy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features).view(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def torchrec_pipeline(record: ModelRecord, env: DistEnv, batch_size: int, config: TrainConfig = TRAIN_CONFIG
                      ) -> tuple[DistributedModelParallel, TrainPipelineSparseDist]:
    """A freshly initialised model of ``record``'s shape, wrapped in :class:`LossModel`,
    sharded by TorchRec's planner for ``batch_size``, and the ``TrainPipelineSparseDist``
    that drives it with :func:`~afmrec.pipeline.train.make_optimizer`'s optimizers (rates
    of ``config``)."""
    model = LossModel(build_model(record.model, env.device, sparse_device="meta"))
    dmp: DistributedModelParallel = shard_model(model, env, plan=planner_plan(model, env, batch_size=batch_size))
    optimizer = make_optimizer(dmp, config)
    return dmp, TrainPipelineSparseDist(dmp, optimizer, env.device)


def run_pipeline(pipeline: TrainPipelineSparseDist, batches: Iterable[Batch]) -> int:
    """One training step per batch of ``batches``, through ``pipeline``; returns the steps."""
    pipeline.reset()
    it, steps = iter(batches), 0
    while True:
        try:
            pipeline.progress(it)
        except StopIteration:
            return steps
        steps += 1


def host_batches(batches: list[Batch], device: torch.device) -> list[Batch]:
    """``batches`` in host memory, as a data loader yields them (pinned for a CUDA device)."""
    on_host = [b.to(torch.device("cpu")) for b in batches]
    return [b.pin_memory() for b in on_host] if device.type == "cuda" else on_host


def bench_train(dmp: nn.Module, record: ModelRecord, batches: list[Batch], shape: SpeedShape,
                env: DistEnv) -> dict[str, float]:
    """Our ``train_`` on ``dmp`` vs :func:`torchrec_pipeline` on a model of the same shape,
    ``shape.steps`` steps of the same host batches each, interleaved ``shape.repeats``
    times, the fastest of each kept (other load on the machine affects both alike).

    Returns:
        ``train_samples_per_s`` (ours), ``torchrec_train_samples_per_s`` (the
        pipeline's) and ``train_vs_torchrec`` (ours / the pipeline's throughput; above 1
        is faster).
    """
    device = env.device
    on_host = host_batches(batches, device)
    cycle = [on_host[i % len(on_host)] for i in range(shape.steps)]
    _, pipeline = torchrec_pipeline(record, env, shape.train_batch)
    run_pipeline(pipeline, cycle[:2])  # warm-up: the pipeline's model rewrite, the kernels' first calls
    train_(dmp, cycle[:2], TRAIN_CONFIG, progress=False)
    base, mine = fastest_interleaved(
        [lambda: run_pipeline(pipeline, cycle), lambda: train_(dmp, cycle, TRAIN_CONFIG, progress=False)],
        device, repeats=shape.repeats)
    rows = shape.steps * shape.train_batch
    return {"train_samples_per_s": rows / mine, "torchrec_train_samples_per_s": rows / base,
            "train_vs_torchrec": base / mine}
