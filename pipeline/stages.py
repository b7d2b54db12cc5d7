"""The pipeline stages, each reading artifacts and writing one new artifact atomically.

    train    DATA            -> MODEL_DIR          (model.json + DCP checkpoint)
    stats    MODEL_DIR, DATA -> STATS.pt           (moments by block + metadata)
    compress MODEL_DIR, STATS -> MODEL_DIR'        (+ bases.pt, ranks.parquet)
    finetune MODEL_DIR', DATA [, teacher] -> MODEL_DIR''
    evaluate {name: MODEL_DIR}, DATA -> report.parquet

Every stage refuses to write over an existing output (unless ``overwrite``) and over any
of its inputs, and records what produced it (versions, input fingerprints, config).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from afmrec.models import ModelConfig, TableSpec, build_model

from .artifacts import atomic_file, file_fingerprint, fingerprint, versions
from .bases import Bases, afm_bases, spectra, weight_svd_bases
from .blocks import find_blocks, select_blocks
from .compress import CompressConfig, compress_
from .data import DataSchema, ParquetBatches, read_schema
from .errors import InputError
from .evaluate import count_parameters, evaluate, measure_latency, model_bytes
from .model_io import ModelRecord, load_model, load_record, save_model
from .ranks import RankConfig, select_ranks
from .report import write_report
from .stats import Statistics, collect_statistics
from .train import TrainConfig, TrainResult, train_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataRef:
    """A Parquet dataset, or a contiguous fraction ``[start, stop)`` of its rows.

    ``DIR`` is the whole dataset, ``DIR@0.9:1`` its last tenth (rows in file order):
    the way to hold out validation rows without writing a second copy.
    """

    path: Path
    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.stop <= 1.0:
            raise InputError(f"{self}: row range must satisfy 0 <= start < stop <= 1")

    @classmethod
    def parse(cls, spec: str | os.PathLike[str]) -> "DataRef":
        spec = str(spec)
        path, sep, rng = spec.rpartition("@") if "@" in spec else (spec, "", "")
        if not sep:
            return cls(Path(spec))
        try:
            a, b = rng.split(":")
            return cls(Path(path), float(a or 0), float(b or 1))
        except ValueError:
            raise InputError(f"{spec}: expected DIR or DIR@START:STOP (fractions)") from None

    def split(self, fraction: float) -> tuple["DataRef", "DataRef"]:
        """(first ``1 - fraction``, last ``fraction``) of this range."""
        cut = self.stop - (self.stop - self.start) * fraction
        return dataclasses.replace(self, stop=cut), dataclasses.replace(self, start=cut)

    def schema(self) -> DataSchema:
        return read_schema(self.path)

    def batches(self, batch_size: int, **kwargs: Any) -> ParquetBatches:
        return ParquetBatches(self.path, batch_size, row_range=(self.start, self.stop), **kwargs)

    def fingerprint(self) -> str:
        return fingerprint([file_fingerprint(self.path), self.start, self.stop])

    def __str__(self) -> str:
        full = self.start == 0.0 and self.stop == 1.0
        return str(self.path) if full else f"{self.path}@{self.start:g}:{self.stop:g}"


def model_config_from_schema(schema: DataSchema, arch: str, **overrides: Any) -> ModelConfig:
    """A model for a dataset: one table per sparse field, the dense width from the data."""
    tables = tuple(TableSpec(f.name, f.num_embeddings) for f in schema.sparse)
    dim = overrides.get("embedding_dim", ModelConfig.embedding_dim)
    overrides.setdefault("dense_arch", (max(4 * dim, 32), dim))
    try:
        return ModelConfig(arch=arch, tables=tables, num_dense=len(schema.dense), **overrides)
    except ValueError as e:
        raise InputError(f"model config: {e}") from None


def _check_not_input(out: Path, *inputs: Path) -> None:
    """Outputs never replace, hold, or sit inside an input (inputs stay byte-identical)."""
    out = Path(out).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise InputError(f"output {out} would overwrite or sit inside the input {p}")


def _check_matching_schema(record: ModelRecord, data: DataRef) -> None:
    schema = data.schema()
    want = {t.name: t.num_embeddings for t in record.model.tables}
    have = schema.table_sizes()
    if want != have or record.model.num_dense != len(schema.dense):
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise InputError(
            f"{data}: the data does not match the model (tables differ: {diff[:4]}; "
            f"dense {len(schema.dense)} vs {record.model.num_dense})"
        )


def _model_fingerprint(model_dir: Path) -> str:
    return fingerprint([load_record(model_dir).fingerprint, file_fingerprint(model_dir / "checkpoint")])


def fit(
    model: torch.nn.Module,
    record: ModelRecord,
    out: Path,
    train_data: DataRef,
    val_data: DataRef | None,
    config: TrainConfig,
    *,
    batch_size: int = 1024,
    teacher: torch.nn.Module | None = None,
    inputs: Mapping[str, str] = {},
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Trains ``model`` in place (labels, or distillation from ``teacher``) and saves it."""
    _check_matching_schema(record, train_data)
    batches = train_data.batches(batch_size, shuffle=True, seed=config.seed, drop_last=True)
    val = val_data.batches(batch_size) if val_data is not None else None
    result = train_(model, batches, config, val_batches=val, teacher=teacher, progress=progress)
    record.provenance = {
        "stage": "finetune" if record.compressed else "train",
        "train_config": dataclasses.asdict(config),
        "train_data": {"path": str(train_data), "fingerprint": train_data.fingerprint()},
        "val_data": str(val_data) if val_data else None,
        "inputs": dict(inputs),
        "history": [dataclasses.asdict(r) for r in result.history],
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
    batch_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Builds a fresh model from ``model_config``, trains it and writes ``out``."""
    _check_not_input(out, train_data.path)
    torch.manual_seed(config.seed)
    model = build_model(model_config)
    return fit(model, ModelRecord(model_config), out, train_data, val_data, config,
               batch_size=batch_size, overwrite=overwrite, progress=progress)


def finetune_stage(
    model_dir: Path,
    out: Path,
    train_data: DataRef,
    val_data: DataRef | None,
    config: TrainConfig,
    *,
    teacher_dir: Path | None = None,
    batch_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tunes a saved (compressed) model with labels, or from a teacher's logits."""
    _check_not_input(out, model_dir, train_data.path, *(teacher_dir and [teacher_dir] or []))
    model, record = load_model(model_dir)
    teacher = None
    inputs = {"model": _model_fingerprint(model_dir)}
    if teacher_dir is not None:
        teacher, _ = load_model(teacher_dir)
        teacher.eval().requires_grad_(False)
        inputs["teacher"] = _model_fingerprint(teacher_dir)
    return fit(model, record, out, train_data, val_data, config, batch_size=batch_size,
               teacher=teacher, inputs=inputs, overwrite=overwrite, progress=progress)


def stats_stage(
    model_dir: Path,
    data: DataRef,
    out: Path,
    *,
    batch_size: int = 4096,
    target: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> Statistics:
    """One forward pass over ``data`` with observers on the selected blocks."""
    _check_not_input(out, model_dir, data.path)
    model, record = load_model(model_dir)
    if record.compressed:
        raise InputError(f"{model_dir}: statistics are collected on an uncompressed model")
    _check_matching_schema(record, data)
    blocks = select_blocks(find_blocks(model), target, exclude)
    start = time.perf_counter()
    stats = collect_statistics(model, blocks, data.batches(batch_size), progress=progress)
    stats.check_finite()
    stats.meta = {
        "format": "afmrec.stats/1",
        "model": _model_fingerprint(model_dir),
        "model_dir": str(model_dir),
        "data": {"path": str(data), "fingerprint": data.fingerprint()},
        "versions": versions(),
        "seconds": time.perf_counter() - start,
    }
    save_statistics(stats, out, overwrite=overwrite)
    return stats


def save_statistics(stats: Statistics, out: Path, *, overwrite: bool = False) -> None:
    with atomic_file(out, overwrite=overwrite) as tmp:
        torch.save(stats.to_state(), tmp)


def load_statistics(path: Path) -> Statistics:
    if not Path(path).is_file():
        raise InputError(f"{path}: statistics file not found")
    try:
        return Statistics.from_state(torch.load(path, weights_only=True))
    except Exception as e:
        raise InputError(f"{path}: not a readable statistics file ({type(e).__name__})") from None


def compress_stage(
    model_dir: Path,
    stats_path: Path,
    out: Path,
    rank_config: RankConfig,
    compress_config: CompressConfig = CompressConfig(),
    *,
    method: str = "afm",
    overwrite: bool = False,
) -> tuple[ModelRecord, list[dict[str, Any]]]:
    """Bases from the statistics (or weight SVD), ranks, ``compress_``, and a new model dir.

    Returns:
        the new record and one row per block (rank, energy kept, parameters before/after),
        also written to ``out/ranks.parquet``.
    """
    if method not in ("afm", "svd"):
        raise InputError(f"method must be 'afm' or 'svd', got {method!r}")
    _check_not_input(out, model_dir, stats_path)
    model, record = load_model(model_dir)
    if record.compressed:
        raise InputError(f"{model_dir}: this model is already compressed")
    stats = load_statistics(stats_path)
    if stats.meta.get("model") != _model_fingerprint(model_dir):
        raise InputError(
            f"{stats_path}: statistics were computed for another model or checkpoint "
            f"({stats.meta.get('model_dir')}), not {model_dir}"
        )
    spec = spectra(stats)
    blocks = [b for b in find_blocks(model) if b.name in spec]
    other = count_parameters(model) - sum(b.params for b in blocks)
    ranks = select_ranks(blocks, spec, rank_config, other_params=other)
    bases: Bases = (
        afm_bases(spec, ranks) if method == "afm" else weight_svd_bases(model, blocks, ranks)
    )
    bases.meta = {"stats": stats.meta, "rank_config": repr(rank_config)}
    compress_(model, bases, compress_config)
    new = ModelRecord(
        record.model, ranks, compress_config, method,
        provenance={"stage": "compress", "inputs": {"model": stats.meta["model"], "stats": str(stats_path)}},
    )
    rows = [
        {
            "block": b.name,
            "kind": b.kind,
            "in_features": b.in_features,
            "out_features": b.out_features,
            "rank": ranks.get(b.name, b.out_features),
            "compressed": b.name in ranks,
            "energy": spec[b.name].energy(ranks.get(b.name, b.out_features)),
            "params_before": b.params,
            "params_after": b.compressed_params(ranks[b.name]) if b.name in ranks else b.params,
        }
        for b in blocks
    ]
    save_model(model, new, out, overwrite=overwrite)
    with atomic_file(out / "bases.pt") as tmp:
        torch.save(bases.to_state(), tmp)
    _write_rows(rows, out / "ranks.parquet")
    return new, rows


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def evaluate_stage(
    models: Mapping[str, Path],
    data: DataRef,
    out: Path | None,
    *,
    batch_size: int = 8192,
    latency_batch: int = 2048,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """AUC, logloss, parameters, bytes and CPU batch latency of each model on ``data``.

    The first model is the reference for the ``ratio`` column.
    """
    if out is not None:
        _check_not_input(out, data.path, *models.values())
    probe = next(iter(data.batches(latency_batch)))
    rows = []
    for name, model_dir in models.items():
        model, record = load_model(model_dir)
        _check_matching_schema(record, data)
        result = evaluate(model, data.batches(batch_size))
        rows.append(
            {
                "variant": name,
                "params": count_parameters(model),
                "bytes": model_bytes(model),
                "auc": result.auc,
                "logloss": result.logloss,
                "latency_ms": measure_latency(model, probe),
                "model_dir": str(model_dir),
            }
        )
    for row in rows:
        row["ratio"] = rows[0]["params"] / row["params"]
        row["delta_auc"] = row["auc"] - rows[0]["auc"]
    if out is not None:
        write_report(rows, out, overwrite=True)
    return rows
