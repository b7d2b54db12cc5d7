"""The ``evaluate`` stage: AUC, logloss, size and latency of models, as a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from afmrec.sharding.env import DistEnv, barrier
from afmrec.sharding.plan import ShardingConfig

from ..artifacts import REPORT, check_not_input, check_replaceable
from ..evaluate import count_parameters, evaluate, measure_latency, model_bytes
from ..model_io import load_model, skeleton
from ..report import write_report
from ..runinfo import StageMeter
from .inputs import LOCAL, DataRef, check_matching_schema


def evaluate_stage(
    models: Mapping[str, Path],
    data: DataRef,
    out: Path | None,
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    batch_size: int = 8192,
    latency_batch: int = 2048,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """AUC, logloss, parameters, bytes and CPU batch latency of each model on ``data``.

    The first model is the reference for the ``ratio`` (parameters) and ``bytes_ratio``
    columns. ``bytes`` are as served: a compressed model's rank plan counts its tables in
    the plan's ``table_format`` (the AUC is the fp32 checkpoint's: row-wise rounding moves
    it by about 1e-4, which ``afmrec bench quality`` measures); other models are fp32. Sizes are of the whole
    model (all shards); latency is rank 0's forward pass (collective when sharded).
    ``samples_per_s`` is the evaluation pass's rows over all ranks per second of the
    slowest rank, ``peak_memory_gib`` the largest GPU peak of any rank from the model's
    loading to its latency measurement (``None`` on the CPU), and ``throughput`` the
    per-rank record (:class:`~afmrec.pipeline.runinfo.RunInfo`) as JSON text.
    """
    if out is not None:
        check_not_input(out, data.path, *models.values())
        check_replaceable(out, True, kind=REPORT)  # an earlier report, never another file
    probe = next(iter(data.batches(latency_batch, env)))
    rows, infos = [], []
    for name, model_dir in models.items():
        meter = StageMeter("evaluate", env)
        model, record = load_model(model_dir, env=env, sharding=sharding)
        read = check_matching_schema(record, data)
        with meter.timed():
            result = evaluate(model, meter.count(read.batches(batch_size, env)))
        whole = skeleton(record)
        plan = record.plan or {}
        rows.append(
            {
                "variant": name,
                "params": count_parameters(whole),
                # as served: the rank plan's count (tables in its format), else fp32
                "bytes": plan["served_bytes_after"] if plan else model_bytes(whole),
                "table_format": plan.get("table_format", "fp32"),
                "auc": result.auc,
                "logloss": result.logloss,
                "latency_ms": measure_latency(model, probe),
                "model_dir": str(model_dir),
            }
        )
        infos.append(meter.gather())
        del model  # not held while the next one loads: each peak is one model's
    for row, info in zip(rows, infos):
        row["ratio"] = rows[0]["params"] / row["params"]
        row["bytes_ratio"] = rows[0]["bytes"] / row["bytes"]
        row["delta_auc"] = row["auc"] - rows[0]["auc"]
        row.update(info.report_columns())
    if out is not None and env.rank == 0:
        write_report(rows, out, overwrite=True)
    barrier()
    return rows
