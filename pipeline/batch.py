"""Batch compression: many checkpoints listed in a manifest, each in its own folder.

A manifest is a CSV or Parquet table with one row per checkpoint (:class:`BatchRow`
lists the columns). Relative paths in it are relative to the manifest's folder.
:func:`run_row` runs one row in its folder ``out``, a stage after the other::

    out/original/        (only with model_config) the checkpoint with its architecture
    out/stats.pt         statistics over the calibration data (resumable)
    out/compressed/      the compressed model (+ ranks.parquet, bases.pt)
    out/finetuned/       (with finetune data) the fine-tuned compressed model
    out/report.parquet   (with eval data) AUC, size and latency of every model
    out/stages.json      the key each finished stage was computed from
    out/result.json      the row's result, once it has finished

A stage's key hashes its settings and the names, sizes and modification times of its
input files, chained through the stages before it: a stage is skipped when its output
exists under the same key, and redone (with every later stage) when a setting or an
input changes. A row is finished when ``result.json`` holds the key of its last stage.
A row that fails reports why in its result and leaves the other rows alone.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import math
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from afmrec.models import ModelConfig
from afmrec.sharding.env import DistEnv, barrier, broadcast_object, fail_job
from afmrec.sharding.plan import ShardingConfig

from .artifacts import (BATCH_RESULTS, MODEL, atomic_dir, atomic_file, fingerprint, read_json,
                        write_json)
from .compress import CompressConfig
from .errors import InputError
from .evaluate import count_parameters
from .hints import scalar_type, typed_dataclass
from .model_io import ModelRecord, load_record, skeleton
from .ranks import RankConfig
from .report import read_report
from .stages import LOCAL, DataRef, compress_stage, evaluate_stage, finetune_stage, stats_stage
from .train import TrainConfig

log = logging.getLogger(__name__)

# The files of a row's folder (see the module docstring).
ORIGINAL, STATS, COMPRESSED, FINETUNED = "original", "stats.pt", "compressed", "finetuned"
REPORT, LEDGER, RESULT = "report.parquet", "stages.json", "result.json"


@dataclass(frozen=True)
class BatchRow:
    """One manifest row: a checkpoint, how to compress it, where the results go.

    Args:
        checkpoint: a model folder (``model.json`` + ``checkpoint/``, from
            ``afmrec train``), or, with ``model_config``, a folder holding a DCP
            checkpoint (itself, or its ``checkpoint/``).
        calibration: statistics data, ``DIR`` or ``DIR@START:STOP``.
        out: the row's folder (created; not shared with another row).
        name: the row's name in the results (default: the name of ``out``).
        model_config: a JSON file of the architecture (a ``ModelConfig``, or a
            ``model.json``), for a checkpoint without ``model.json``.
        ratio, energy, rank: the rank policy's value, exactly one of them (as ``afmrec
            compress --ratio/--energy/--rank``).
        policy, table_format, serve_device, table_multiple, method, activation: as
            ``afmrec compress`` (``policy`` none: its default for the value given).
        probe: labelled rows of the loss probes (default: the last tenth of ``calibration``).
        finetune: fine-tuning data (its last tenth validates); none: no fine-tuning.
        finetune_epochs, finetune_batch_size: fine-tuning passes and rows per step.
        eval: test data for AUC before and after; none: no evaluation.
        batch_size: rows per statistics batch.
    """

    checkpoint: Path
    calibration: DataRef
    out: Path
    name: str = ""
    model_config: Path | None = None
    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    policy: str | None = None
    table_format: str = "auto"
    serve_device: str = "cuda"
    probe: DataRef | None = None
    table_multiple: int = 4
    method: str = "afm"
    activation: str | None = None
    finetune: DataRef | None = None
    finetune_epochs: int = 1
    finetune_batch_size: int = 1024
    eval: DataRef | None = None
    batch_size: int = 4096

    def __post_init__(self) -> None:
        # Plain strings are accepted from Python callers; a manifest's cells are converted.
        for attr in ("checkpoint", "out", "model_config"):
            if isinstance(getattr(self, attr), str):
                object.__setattr__(self, attr, Path(getattr(self, attr)))
        for attr in ("calibration", "finetune", "eval", "probe"):
            if isinstance(getattr(self, attr), str):
                object.__setattr__(self, attr, DataRef.parse(getattr(self, attr)))
        if not self.name:
            object.__setattr__(self, "name", self.out.name)
        if self.method not in ("afm", "svd"):
            raise InputError(f"method must be 'afm' or 'svd', got {self.method!r}")
        if min(self.finetune_epochs, self.finetune_batch_size, self.batch_size) < 1:
            raise InputError("finetune_epochs, finetune_batch_size and batch_size must be >= 1")
        # their own checks (exactly one of ratio, energy, rank...), before any job starts
        self.rank_config(), self.compress_config()

    def rank_config(self) -> RankConfig:
        return RankConfig.from_policy(self.policy, ratio=self.ratio, energy=self.energy, rank=self.rank,
                                      table_format=self.table_format, serve_device=self.serve_device,
                                      table_multiple=self.table_multiple)

    def compress_config(self) -> CompressConfig:
        return CompressConfig(activation=self.activation)


# ---------------------------------------------------------------------------- manifest


def _read_table(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).to_pylist()
        except pa.ArrowInvalid as e:
            raise InputError(f"{path}: not a Parquet table ({e})") from None
    if path.suffix != ".csv":
        raise InputError(f"{path}: a manifest is a .csv or .parquet file")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _is_blank(value: Any) -> bool:
    """Empty CSV cells, Parquet nulls, and the NaN that pandas writes for missing floats."""
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _convert(kind: type, value: Any, base: Path) -> Any:
    """A cell as the field's type; paths relative to ``base`` (the manifest's folder)."""
    if kind is Path:
        return base / str(value).strip()
    if kind is DataRef:
        ref = DataRef.parse(str(value).strip())
        return dataclasses.replace(ref, path=base / ref.path)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(value)
    converted = kind(value.strip() if isinstance(value, str) else value)
    if kind is float and not math.isfinite(converted):  # "nan" and "inf" parse as floats
        raise ValueError(value)
    return converted


@functools.cache
def _row_hints() -> dict[str, Any]:
    return typing.get_type_hints(BatchRow)


def _row(record: Mapping[str, Any], base: Path, where: str) -> BatchRow:
    hints = _row_hints()
    values = {}
    for column, value in record.items():
        if _is_blank(value):
            continue
        kind = scalar_type(hints[column])
        try:
            values[column] = _convert(kind, value, base)
        except InputError as e:  # a malformed DIR@START:STOP says what is wrong itself
            raise InputError(f"{where}, column {column!r}: {e}") from None
        except ValueError:
            raise InputError(f"{where}, column {column!r}: expected {kind.__name__}, got {value!r}") from None
    for f in dataclasses.fields(BatchRow):
        if f.default is dataclasses.MISSING and f.name not in values:
            raise InputError(f"{where}: column {f.name!r} is empty")
    try:
        return BatchRow(**values)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def read_manifest(path: str | os.PathLike[str]) -> list[BatchRow]:
    """The rows of a CSV or Parquet manifest, validated before any job starts.

    Raises:
        InputError: the file is missing or not CSV/Parquet; a column is unknown or a
            required one is absent; a cell has the wrong type; a row's settings are
            invalid; two rows share a name or an ``out`` folder. The message names the
            file, the row (1 = the first after the header) and the column.
    """
    path = Path(path)
    records = _read_table(path)
    columns = list(records[0]) if records else []
    known = [f.name for f in dataclasses.fields(BatchRow)]
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise InputError(f"{path}: unknown column(s) {unknown} (known: {', '.join(known)})")
    if not records:
        raise InputError(f"{path}: the manifest has no rows")
    required = [f.name for f in dataclasses.fields(BatchRow) if f.default is dataclasses.MISSING]
    absent = [c for c in required if c not in columns]
    if absent:
        raise InputError(f"{path}: no column(s) {absent}")
    base = path.resolve().parent
    rows = [_row(r, base, f"{path}, row {i + 1}") for i, r in enumerate(records)]
    for attr in ("name", "out"):
        seen: dict[Any, int] = {}
        for i, row in enumerate(rows):
            j = seen.setdefault(getattr(row, attr), i)
            if j != i:
                raise InputError(f"{path}: rows {j + 1} and {i + 1} have the same {attr} "
                                 f"({getattr(row, attr)})")
    return rows


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
    """The key of each of the row's stages, in order (see the module docstring)."""
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
