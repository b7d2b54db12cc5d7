"""A row of a batch, run in its folder a stage after the other; the results table."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from afmrec.models import ModelConfig
from afmrec.sharding.env import DistEnv, barrier, broadcast_object, fail_job
from afmrec.sharding.plan import ShardingConfig

from ..artifacts import (BATCH_RESULTS, MODEL, atomic_dir, atomic_file, fingerprint, read_json,
                         write_json)
from ..errors import InputError
from ..evaluate import count_parameters
from ..hints import typed_dataclass
from ..model_io import ModelRecord, load_record, skeleton
from ..report import read_report
from ..stages import LOCAL, DataRef, compress_stage, evaluate_stage, finetune_stage, stats_stage
from ..train import TrainConfig
from .manifest import BatchRow

log = logging.getLogger(__name__)

# The files of a row's folder (see afmrec.pipeline.batch).
ORIGINAL, STATS, COMPRESSED, FINETUNED = "original", "stats.pt", "compressed", "finetuned"
REPORT, LEDGER, RESULT = "report.parquet", "stages.json", "result.json"


# ------------------------------------------------------------------------- stage keys


def _files_key(path: Path | None) -> Any:
    """Names, sizes and modification times of a file or of every file under a folder: a
    replaced checkpoint or dataset changes it, without reading gigabytes to hash them."""
    if path is None:
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return fingerprint([(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in files])


def _data_key(ref: DataRef | None) -> Any:
    return None if ref is None else [str(ref), _files_key(ref.path)]


def stage_keys(row: BatchRow) -> dict[str, str]:
    """The key of each of the row's stages, in order (see :mod:`afmrec.pipeline.batch`)."""
    keys = {"stats": fingerprint(["stats", _files_key(row.checkpoint), _files_key(row.model_config),
                                  _data_key(row.calibration), _data_key(row.probe), row.batch_size])}
    keys["compress"] = fingerprint(["compress", keys["stats"], repr(row.rank_config()),
                                    row.compress_config().to_dict(), row.method])
    if row.finetune is not None:
        keys["finetune"] = fingerprint(["finetune", keys["compress"], _data_key(row.finetune),
                                        row.finetune_epochs, row.finetune_batch_size])
    if row.eval is not None:
        keys["evaluate"] = fingerprint(["evaluate", *keys.values(), _data_key(row.eval)])
    return keys


def _json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object that a run wrote in a row's folder (``stages.json``, ``result.json``),
    or None where it is absent, unreadable or of another shape: they record what was done,
    and the row redoing it rebuilds them."""
    try:
        found = read_json(path) if path.is_file() else None
    except InputError:
        return None
    return found if isinstance(found, dict) else None


class _Ledger:
    """``out/stages.json``: the key each finished stage of the row was computed from."""

    def __init__(self, out: Path, env: DistEnv) -> None:
        self.path = out / LEDGER
        self.env = env
        found = _json_object(self.path) or {}
        self.keys: dict[str, str] = {k: v for k, v in found.items() if isinstance(v, str)}

    def todo(self, stage: str, key: str, output: Path) -> bool:
        """Whether the stage must run; every rank gets rank 0's answer."""
        answer = self.keys.get(stage) != key or not output.exists()
        return broadcast_object(answer) if self.env.is_distributed else answer

    def mark(self, stage: str, key: str) -> None:
        self.keys[stage] = key
        if self.env.rank == 0:
            write_json(self.path, self.keys, overwrite=True)


def _claim(out: Path, env: DistEnv) -> None:
    """Makes ``out`` the row's folder; one that holds something else is refused."""
    problem = None
    if env.rank == 0:
        if out.is_dir() and any(out.iterdir()) and not (out / LEDGER).is_file():
            problem = (f"{out}: folder exists and is not a batch row's (no {LEDGER}); "
                       "refusing to write into it")
        elif not (out / LEDGER).is_file():
            write_json(out / LEDGER, {})
    if env.is_distributed:  # every rank fails, or none: a lone failure would hang the rest
        problem = broadcast_object(problem)
    if problem:
        raise InputError(problem)


# ----------------------------------------------------------------------------- a row


def _check_inputs(row: BatchRow) -> None:
    named = [("checkpoint", row.checkpoint), ("model_config", row.model_config),
             ("calibration data", row.calibration.path),
             ("finetune data", row.finetune and row.finetune.path),
             ("eval data", row.eval and row.eval.path)]
    for what, path in named:
        if path is not None and not path.exists():
            raise InputError(f"{what} not found: {path}")
    if row.model_config is None and not (row.checkpoint / "model.json").is_file():
        raise InputError(f"{row.checkpoint}: no model.json; give the row a model_config")


def _read_model_config(path: Path) -> ModelRecord:
    """A ``model.json``, or a bare :class:`ModelConfig` object (every field's type checked)."""
    d = read_json(path)
    if isinstance(d, dict) and "format" in d:
        return ModelRecord.from_dict(d, str(path))
    return ModelRecord(typed_dataclass(ModelConfig, d, f"{path} (a model config)"),
                       provenance={"model_config": str(path)})


def _original(row: BatchRow, env: DistEnv) -> Path:
    """The model folder of the row's checkpoint: the checkpoint itself, or with a
    model_config a folder ``out/original`` of that config and a link to the weights."""
    if row.model_config is None:
        return row.checkpoint
    view = row.out / ORIGINAL
    weights = row.checkpoint / "checkpoint"
    weights = (weights if weights.is_dir() else row.checkpoint).resolve()
    record = _read_model_config(row.model_config)
    current = view / "model.json"
    fresh = (current.is_file() and (view / "checkpoint").resolve() == weights
             and ModelRecord.from_dict(read_json(current)).model == record.model)
    if env.rank == 0 and not fresh:
        with atomic_dir(view, overwrite=True, kind=MODEL) as tmp:
            write_json(tmp / "model.json", record.to_dict())
            (tmp / "checkpoint").symlink_to(weights)
    barrier()
    return view


def _params(model_dir: Path) -> int:
    """Parameters of a saved model, counted on its skeleton (no weights read)."""
    return count_parameters(skeleton(load_record(model_dir)))


def _run_stages(
    row: BatchRow, keys: dict[str, str], env: DistEnv, sharding: ShardingConfig | None,
    checkpoint_every: int | None, progress: bool,
) -> dict[str, Any]:
    """stats -> compress -> (finetune) -> (evaluate), each skipped if its ledger entry
    holds its key (``keys``: :func:`stage_keys`); the measures."""
    _check_inputs(row)
    _claim(row.out, env)
    ledger = _Ledger(row.out, env)
    original = _original(row, env)
    stats, compressed = row.out / STATS, row.out / COMPRESSED
    final = row.out / FINETUNED if row.finetune is not None else compressed
    common: dict[str, Any] = {"env": env, "sharding": sharding}
    # Outputs in the row's own folder are ours: a stale one (another key) is replaced.
    if ledger.todo("stats", keys["stats"], stats):
        probe = row.probe if row.probe is not None else row.calibration.probe_slice()
        stats_stage(original, row.calibration, stats, batch_size=row.batch_size, overwrite=True,
                    probe_data=probe,
                    progress=progress, checkpoint_every=checkpoint_every, **common)
        ledger.mark("stats", keys["stats"])
    if ledger.todo("compress", keys["compress"], compressed):
        compress_stage(original, stats, compressed, row.rank_config(), row.compress_config(),
                       method=row.method, overwrite=True, **common)
        ledger.mark("compress", keys["compress"])
    if row.finetune is not None and ledger.todo("finetune", keys["finetune"], final):
        train, val = row.finetune.split(0.1)
        config = TrainConfig(epochs=row.finetune_epochs, eval_at_start=True)
        finetune_stage(compressed, final, train, val, config, batch_size=row.finetune_batch_size,
                       overwrite=True, progress=progress, **common)
        ledger.mark("finetune", keys["finetune"])
    measures: dict[str, Any] = {"model_dir": str(final), "params_before": _params(original),
                                "params_after": _params(final)}
    measures["ratio"] = measures["params_before"] / measures["params_after"]
    plan = load_record(compressed).plan or {}
    measures.update(bytes_ratio=plan.get("ratio"), policy=plan.get("policy"),
                    table_format=plan.get("table_format"))
    if row.eval is not None:
        report = row.out / REPORT
        if ledger.todo("evaluate", keys["evaluate"], report):
            models = {"original": original, "compressed": compressed}
            if row.finetune is not None:
                models["finetuned"] = final
            evaluate_stage(models, row.eval, report, progress=progress, **common)
            ledger.mark("evaluate", keys["evaluate"])
        auc = {r["variant"]: r["auc"] for r in read_report(report)}
        measures.update(auc_before=auc["original"], auc_compressed=auc["compressed"],
                        auc_after=auc.get("finetuned", auc["compressed"]))
        measures["delta_auc"] = measures["auc_after"] - measures["auc_before"]
    return measures


def row_key(row: BatchRow) -> str:
    """The key of the row's last stage: what its ``result.json`` must hold to be reused."""
    return list(stage_keys(row).values())[-1]


def _identity(row: BatchRow) -> dict[str, Any]:
    return {"name": row.name, "checkpoint": str(row.checkpoint), "out": str(row.out),
            "skipped": False}


def failed_result(row: BatchRow, error: str, wall_s: float | None = None) -> dict[str, Any]:
    """The result of a row that did not finish."""
    return {**_identity(row), "status": "failed", "wall_s": wall_s, "error": error}


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"


def run_row(
    row: BatchRow,
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    checkpoint_every: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs one row's stages in ``row.out`` (collectively, in a job of several ranks).

    Args:
        row: the row.
        env: this rank's place in the job.
        sharding: how models are sharded over the job's ranks.
        checkpoint_every: save the statistics pass every this many batches (resumable).
        progress: progress bars.
    Returns:
        The row's result (:data:`RESULT_SCHEMA`'s columns). A failure is caught and
        reported in it (status ``"failed"`` and the error), so one row never stops the
        others; a finished row's result is also written to ``out/result.json``.
    """
    start = time.perf_counter()
    try:
        keys = stage_keys(row)  # (hashes every input file: once per row)
        measures = _run_stages(row, keys, env, sharding, checkpoint_every, progress)
    except Exception as e:  # the row fails alone; its log keeps the traceback of a bug
        # In a job of several ranks, the rank that records the result (rank 0) may have
        # stopped only because another rank left a collective: the error is the one that
        # rank claimed (fail_job), not "connection closed by peer".
        e = fail_job(e)  # type: ignore[assignment]
        log.error("row %s failed: %s", row.name, _describe(e), exc_info=not isinstance(e, InputError))
        return failed_result(row, _describe(e), time.perf_counter() - start)
    result = {**_identity(row), **measures, "status": "ok", "error": None,
              "wall_s": time.perf_counter() - start, "key": list(keys.values())[-1]}
    if env.rank == 0:
        write_json(row.out / RESULT, result, overwrite=True)
    log.info("row %s finished in %.1f s", row.name, result["wall_s"])
    return result


def finished_result(row: BatchRow) -> dict[str, Any] | None:
    """The result of an earlier run that finished the row as it is now, or None."""
    result = _json_object(row.out / RESULT)  # unreadable: the row runs again
    if result is None or result.get("status") != "ok" or result.get("key") != row_key(row):
        return None
    return {**result, "skipped": True}


# ----------------------------------------------------------------------------- results

RESULT_SCHEMA = pa.schema([
    ("name", pa.string()),
    ("status", pa.string()),
    ("ratio", pa.float64()),
    ("bytes_ratio", pa.float64()),
    ("policy", pa.string()),
    ("table_format", pa.string()),
    ("params_before", pa.int64()),
    ("params_after", pa.int64()),
    ("auc_before", pa.float64()),
    ("auc_compressed", pa.float64()),
    ("auc_after", pa.float64()),
    ("delta_auc", pa.float64()),
    ("wall_s", pa.float64()),
    ("skipped", pa.bool_()),
    ("error", pa.string()),
    ("checkpoint", pa.string()),
    ("out", pa.string()),
    ("model_dir", pa.string()),
])


def write_results(results: list[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Writes one row per checkpoint (:data:`RESULT_SCHEMA`), replacing an older table
    (never a file of another kind): it is a view of the rows' own results, rebuilt by
    every run of the manifest."""
    table = pa.Table.from_pylist([{c: r.get(c) for c in RESULT_SCHEMA.names} for r in results],
                                 schema=RESULT_SCHEMA)
    with atomic_file(path, overwrite=True, kind=BATCH_RESULTS) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)
