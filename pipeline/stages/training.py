"""The ``train`` and ``finetune`` stages: a model trained, then saved with its provenance."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import torch

from afmrec.models import ModelConfig, build_model
from afmrec.sharding.env import DistEnv
from afmrec.sharding.plan import ShardingConfig

from ..artifacts import MODEL, check_not_input, check_replaceable
from ..model_io import ModelRecord, build_sharded, load_model, load_record, save_model
from ..runinfo import StageMeter
from ..train import TrainConfig, TrainResult, train_
from .inputs import LOCAL, DataRef, check_matching_schema, check_teacher, model_fingerprint


def fit(
    model: torch.nn.Module,
    record: ModelRecord,
    out: Path,
    train_data: DataRef,
    val_data: DataRef | None,
    config: TrainConfig,
    *,
    env: DistEnv = LOCAL,
    batch_size: int = 1024,
    teacher: torch.nn.Module | None = None,
    inputs: Mapping[str, str] = {},
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Trains ``model`` in place (labels, or distillation from ``teacher``) and saves it.

    The provenance keeps the history (samples/s of the training steps alone) and adds
    ``throughput`` (:class:`~afmrec.pipeline.runinfo.RunInfo`): each rank's training rows
    over the wall time of the whole run, validation passes included, and peak memory.
    """
    stage = "finetune" if record.compressed else "train"
    meter = StageMeter(stage, env)
    train_data = check_matching_schema(record, train_data)
    val_data = val_data and check_matching_schema(record, val_data)
    batches = train_data.batches(batch_size, env, shuffle=True, seed=config.seed, drop_last=True)
    val = val_data.batches(batch_size, env) if val_data is not None else None
    with meter.timed():
        result = train_(model, meter.count(batches), config, val_batches=val, teacher=teacher,
                        progress=progress and env.rank == 0)
    record.provenance = {
        "stage": stage,
        "train_config": dataclasses.asdict(config),
        "train_data": {"path": str(train_data), "fingerprint": train_data.fingerprint()},
        "val_data": str(val_data) if val_data else None,
        "world_size": env.world_size,
        "inputs": dict(inputs),
        "history": [dataclasses.asdict(r) for r in result.history],
        "throughput": meter.gather().to_dict(),
    }
    save_model(model, record, out, overwrite=overwrite)
    return result


def train_stage(
    out: Path,
    model_config: ModelConfig,
    train_data: DataRef,
    val_data: DataRef | None,
    config: TrainConfig,
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    batch_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Builds a fresh model from ``model_config``, trains it and writes ``out``."""
    check_not_input(out, train_data.path)
    check_replaceable(out, overwrite, kind=MODEL)  # now, not after hours of training
    torch.manual_seed(config.seed)
    record = ModelRecord(model_config)
    model = build_sharded(record, env, sharding) if env.is_distributed else build_model(model_config)
    return fit(model, record, out, train_data, val_data, config, env=env,
               batch_size=batch_size, overwrite=overwrite, progress=progress)


def finetune_stage(
    model_dir: Path,
    out: Path,
    train_data: DataRef,
    val_data: DataRef | None,
    config: TrainConfig,
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    teacher_dir: Path | None = None,
    batch_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tunes a saved (compressed) model with labels, or from a teacher's logits."""
    check_not_input(out, model_dir, train_data.path, *(teacher_dir and [teacher_dir] or []))
    check_replaceable(out, overwrite, kind=MODEL)  # now, not after hours of training
    model, record = load_model(model_dir, env=env, sharding=sharding)
    teacher = None
    inputs = {"model": model_fingerprint(model_dir)}
    if teacher_dir is not None:
        check_teacher(record, load_record(teacher_dir), teacher_dir)
        teacher, _ = load_model(teacher_dir, env=env, sharding=sharding)
        teacher.eval()  # its logits are computed under no_grad (train_)
        inputs["teacher"] = model_fingerprint(teacher_dir)
    return fit(model, record, out, train_data, val_data, config, env=env, batch_size=batch_size,
               teacher=teacher, inputs=inputs, overwrite=overwrite, progress=progress)
