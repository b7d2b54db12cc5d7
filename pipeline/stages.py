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
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from afmrec.models import ModelConfig, TableSpec, build_model
from afmrec.sharding.checkpoint import CHECKSUMS
from afmrec.sharding.compress import fold_table
from afmrec.sharding.dmp import unwrap
from afmrec.sharding.env import DistEnv, barrier
from afmrec.sharding.plan import ShardingConfig

from .artifacts import (MODEL, REPORT, STATISTICS, STATISTICS_FORMAT, _broadcast, atomic_file,
                        check_not_input, check_replaceable, file_fingerprint, fingerprint,
                        load_checked, save_checked, versions)
from .bases import Bases, Spectrum, afm_bases, spectra, weight_svd_bases
from .blocks import Block, find_blocks, select_blocks
from .budget import DENSE_BYTES, original_bytes, served_bytes
from .compress import CompressConfig, compress_
from .data import DataSchema, ParquetBatches, read_schema
from .errors import InputError
from .evaluate import count_parameters, evaluate, measure_latency, model_bytes
from .model_io import (ModelRecord, build_sharded, load_model, load_record, save_model,
                       skeleton)
from .ranks import RankConfig, RankPlan, select_ranks
from .sensitivity import (SensitivityConfig, measure_sensitivity, probes_from_records,
                          probes_to_records, sensitivity_weights)
from .report import write_report
from .runinfo import StageMeter
from .stats import Statistics, StatsCheckpoint, collect_statistics, resolve_precision
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
    # The dense columns in the order a model reads them (matched by name, see
    # _check_matching_schema); None: the dataset's order.
    dense: tuple[str, ...] | None = None

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

    def probe_slice(self) -> "DataRef":
        """The default rows of the loss probes: this range's last tenth."""
        return self.split(0.1)[1]

    def split(self, fraction: float) -> tuple["DataRef", "DataRef"]:
        """(first ``1 - fraction``, last ``fraction``) of this range."""
        cut = self.stop - (self.stop - self.start) * fraction
        return dataclasses.replace(self, stop=cut), dataclasses.replace(self, start=cut)

    def schema(self) -> DataSchema:
        return read_schema(self.path)

    def batches(self, batch_size: int, env: DistEnv | None = None, **kwargs: Any) -> ParquetBatches:
        """This rank's batches (every rank gets as many: see :class:`ParquetBatches`)."""
        if env is not None:
            kwargs.update(rank=env.rank, world_size=env.world_size)
        reader = ParquetBatches(self.path, batch_size, row_range=(self.start, self.stop), **kwargs)
        if self.dense is not None and self.dense != reader.schema.dense:
            # The reader selects every column by name through its schema (conform_table,
            # make_batch): the same names in the model's order are read in that order.
            reader.schema = dataclasses.replace(reader.schema, dense=self.dense)
        return reader

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
        return ModelConfig(arch=arch, tables=tables, num_dense=len(schema.dense),
                           dense_names=schema.dense, **overrides)
    except ValueError as e:
        raise InputError(f"model config: {e}") from None


def _check_matching_schema(record: ModelRecord, data: DataRef) -> DataRef:
    """``data`` as the model reads it: its tables must be the model's (names and sizes) and
    its dense columns the model's, matched by name (in any order) where the model records
    their names, by count for a model of an earlier version.

    Raises:
        InputError: the data does not match the model, saying how.
    """
    schema = data.schema()
    want = {t.name: t.num_embeddings for t in record.model.tables}
    have = schema.table_sizes()
    names = record.model.dense_names
    if want != have or record.model.num_dense != len(schema.dense):
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise InputError(
            f"{data}: the data does not match the model (tables differ: {diff[:4]}; "
            f"dense {len(schema.dense)} vs {record.model.num_dense})"
        )
    if names is None:
        if schema.dense:
            log.warning("the model records no names of its dense features (written by an earlier "
                        "afmrec): the columns of %s are read by position, %s", data, list(schema.dense))
        return data
    if set(names) != set(schema.dense):
        raise InputError(f"{data}: the data's dense columns {list(schema.dense)} are not the "
                         f"model's {list(names)}")
    return dataclasses.replace(data, dense=names)


def _check_teacher(student: ModelRecord, teacher: ModelRecord, teacher_dir: Path) -> None:
    """A teacher reads the student's batches: it needs the same tables and dense features
    (by name, in the same order).

    Raises:
        InputError: the teacher's inputs differ from the student's.
    """
    s, t = student.model, teacher.model
    same_tables = ({x.name: x.num_embeddings for x in s.tables}
                   == {x.name: x.num_embeddings for x in t.tables})
    same_dense = s.num_dense == t.num_dense and (
        None in (s.dense_names, t.dense_names) or s.dense_names == t.dense_names)
    if not (same_tables and same_dense):
        raise InputError(f"{teacher_dir}: the teacher's inputs are not the student's (tables "
                         f"{[(x.name, x.num_embeddings) for x in t.tables][:4]}, dense "
                         f"{list(t.dense_names or [t.num_dense])}; the student has "
                         f"{[(x.name, x.num_embeddings) for x in s.tables][:4]}, dense "
                         f"{list(s.dense_names or [s.num_dense])})")


LOCAL = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def _model_fingerprint(model_dir: Path) -> str:
    """Architecture plus checkpoint content. A checkpoint's ``checksums.json`` already
    holds the SHA-256 of each of its files (verified whenever it is loaded), so hashing
    it stands for hashing them all, without reading gigabytes a second time."""
    checkpoint = model_dir / "checkpoint"
    checksums = checkpoint / CHECKSUMS
    content = file_fingerprint(checksums if checksums.is_file() else checkpoint)
    return fingerprint([load_record(model_dir).fingerprint, content])


def plan_ranks(
    record: ModelRecord, spectra_by_block: Mapping[str, Spectrum], rank_config: RankConfig,
    fuse: bool = True,
) -> tuple[list[Block], RankPlan]:
    """The blocks that have statistics, and the plan of ranks to compress them to.

    The parameters outside those blocks count toward the whole-model ratio; ``fuse`` as
    the compression's (:class:`CompressConfig`): whether a cross layer's second factor
    folds into its ``up``.
    """
    return plan_model(skeleton(record), spectra_by_block, rank_config, fuse)


def plan_model(
    model: torch.nn.Module, spectra_by_block: Mapping[str, Spectrum], rank_config: RankConfig,
    fuse: bool = True,
) -> tuple[list[Block], RankPlan]:
    """:func:`plan_ranks` of a model (or its skeleton) itself."""
    blocks = [b for b in find_blocks(model, fuse=fuse) if b.name in spectra_by_block]
    other = count_parameters(model) - sum(b.params for b in blocks)
    return blocks, select_ranks(blocks, spectra_by_block, rank_config, other_params=other)


def with_weights(rank_config: RankConfig, stats: Statistics, source: object = "statistics") -> RankConfig:
    """``rank_config`` with the loss weights of the probes ``stats`` carries (the ``loss``
    policy's input; other policies are returned as they are)."""
    if rank_config.policy != "loss":
        return rank_config
    recorded = stats.meta.get("sensitivity")
    if not recorded:
        raise InputError(
            f"{source}: these statistics carry no loss probes (collected with --no-probes or "
            "by an older version), which the default rank policy 'loss' needs: rerun "
            "`afmrec stats`, or choose --policy variance")
    probes = probes_from_records(recorded.get("probes", []))
    weights = sensitivity_weights(probes, recorded.get("floor", SensitivityConfig.floor))
    return dataclasses.replace(rank_config, weights=weights)


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
    train_data = _check_matching_schema(record, train_data)
    val_data = val_data and _check_matching_schema(record, val_data)
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
    inputs = {"model": _model_fingerprint(model_dir)}
    if teacher_dir is not None:
        _check_teacher(record, load_record(teacher_dir), teacher_dir)
        teacher, _ = load_model(teacher_dir, env=env, sharding=sharding)
        teacher.eval()  # its logits are computed under no_grad (train_)
        inputs["teacher"] = _model_fingerprint(teacher_dir)
    return fit(model, record, out, train_data, val_data, config, env=env, batch_size=batch_size,
               teacher=teacher, inputs=inputs, overwrite=overwrite, progress=progress)


def stats_stage(
    model_dir: Path,
    data: DataRef,
    out: Path,
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    batch_size: int = 4096,
    target: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = (),
    precision: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int | None = None,
    probe_data: DataRef | None = None,
    sensitivity: SensitivityConfig = SensitivityConfig(),
) -> Statistics:
    """One forward pass over ``data`` with observers on the selected blocks, then the
    loss probes over ``probe_data``.

    Each rank observes its own rows; the moments are summed over ranks (one all-reduce
    per block) and rank 0 writes them.

    With ``probe_data`` (at most ``sensitivity.rows`` of its rows) every block is
    then truncated alone at a few ranks and the loss increase measured
    (:func:`~afmrec.pipeline.sensitivity.measure_sensitivity`): the input of the default
    rank policy, ``loss``, stored as ``meta["sensitivity"]`` with the rows it ran on.

    With ``checkpoint_every`` each rank saves its moments every that many batches in a
    hidden folder beside ``out`` (``.NAME.partial``), and a rerun after a kill resumes
    from the last save, without reading the batches it counts, with the same result as
    an uninterrupted pass; the folder is removed once ``out`` is written. Saves of another
    model, data, batch size, world size or block selection are ignored.

    ``meta["throughput"]`` (:class:`~afmrec.pipeline.runinfo.RunInfo`) holds each rank's
    rows and seconds of the pass (of a resumed pass: the rows run after the resume) and
    its peak memory from the model's loading on.
    """
    check_not_input(out, model_dir, data.path)
    check_replaceable(out, overwrite, folder=False)
    precision = resolve_precision(precision, env.device)  # "auto" is recorded as what it ran
    meter = StageMeter("stats", env)
    model, record = load_model(model_dir, env=env, sharding=sharding)
    if record.compressed:
        raise InputError(f"{model_dir}: statistics are collected on an uncompressed model")
    data = _check_matching_schema(record, data)
    if probe_data is not None:
        probe_data = _check_matching_schema(record, probe_data)
    blocks = select_blocks(find_blocks(skeleton(record)), target, exclude)
    model_fingerprint, data_fingerprint = _model_fingerprint(model_dir), data.fingerprint()
    checkpoint = None
    if checkpoint_every is not None:
        key = fingerprint([model_fingerprint, data_fingerprint, batch_size, env.world_size,
                           precision, sorted(b.name for b in blocks)])
        checkpoint = StatsCheckpoint(out.with_name(f".{out.name}.partial"), checkpoint_every,
                                     key, env.rank)
    start = time.perf_counter()
    # A resumed pass starts the reader at its first batch not saved: the meter counts the
    # batches run, and no others are read.
    batches = meter.count(data.batches(batch_size, env))
    with meter.timed():
        stats = collect_statistics(unwrap(model), blocks, batches,
                                   progress=progress and env.rank == 0, forward=model,
                                   precision=precision, checkpoint=checkpoint)
    if env.is_distributed:
        stats.all_reduce_()
    stats.check_finite()
    probes = None
    if probe_data is not None:
        probes = _probe_sensitivity(model, blocks, stats, probe_data, sensitivity,
                                    env=env, batch_size=batch_size, progress=progress)
    stats.meta = {
        "format": "afmrec.stats/1",
        "model": model_fingerprint,
        "model_dir": str(model_dir),
        "data": {"path": str(data), "fingerprint": data_fingerprint},
        "world_size": env.world_size,
        "precision": precision,
        "versions": versions(),
        "seconds": time.perf_counter() - start,
        "resumed_from_batch": stats.meta["resumed_from_batch"],
        "throughput": meter.gather().to_dict(),
        "sensitivity": probes,
    }
    if env.rank == 0:
        save_statistics(stats, out, overwrite=overwrite)
    barrier()
    if checkpoint is not None:
        checkpoint.clear()
    return stats


def _probe_sensitivity(
    model: torch.nn.Module, blocks: list[Block], stats: Statistics, data: DataRef,
    config: SensitivityConfig, *, env: DistEnv, batch_size: int, progress: bool,
) -> dict[str, Any]:
    """The loss probes of :func:`stats_stage`, as the statistics file records them.

    The spectra come from rank 0 (every rank then truncates along the same directions)."""
    spec = spectra(stats) if env.rank == 0 else None
    if env.is_distributed:
        spec = _broadcast(spec)
    batches = data.batches(batch_size, env, limit_rows=config.rows)
    probes = measure_sensitivity(unwrap(model), blocks, spec, batches, config, forward=model,
                                 progress=progress and env.rank == 0)
    return {
        "data": str(data),
        "fingerprint": data.fingerprint(),
        "rows": batches.total_rows,
        "energies": list(config.energies),
        "floor": config.floor,
        "probes": probes_to_records(probes),
    }


def save_statistics(stats: Statistics, out: Path, *, overwrite: bool = False) -> None:
    """Writes ``stats`` with the checksum of its content (see :func:`load_statistics`)."""
    with atomic_file(out, overwrite=overwrite, kind=STATISTICS) as tmp:
        save_checked(stats.to_state(), tmp, STATISTICS_FORMAT)


def load_statistics(path: Path) -> Statistics:
    """Statistics that :func:`save_statistics` wrote, their checksum verified (files of
    earlier versions, which have none, load with a warning)."""
    state = load_checked(path, STATISTICS_FORMAT, "statistics file",
                         legacy=lambda obj: isinstance(obj, dict) and "moments" in obj)
    try:
        stats = Statistics.from_state(state)
    except Exception as e:
        raise InputError(f"{path}: not a readable statistics file ({type(e).__name__})") from None
    if not stats.moments:
        raise InputError(f"{path}: the statistics cover no block")
    return stats


def _compress_sharded(
    model: torch.nn.Module, record: ModelRecord, bases: Bases, config: CompressConfig
) -> dict[str, Any]:
    """The compressed model's state dict, tables folded where their shards live.

    A skeleton of the original (tables on ``meta``) takes this rank's copy of the dense
    weights and is compressed with :func:`compress_`: that folds every Linear and builds
    the projections, and only shapes the tables. Each table ``E`` is then replaced by
    ``E U`` computed from ``dmp.state_dict()``'s local shards (:func:`fold_table`).
    """
    sharded = model.state_dict()
    compressed = skeleton(record)
    dense = {k: v for k, v in sharded.items() if not isinstance(v, (ShardedTensor, DTensor))}
    skeleton_state = compressed.state_dict()
    compressed.load_state_dict(
        {k: v for k, v in dense.items() if k in skeleton_state and not skeleton_state[k].is_meta},
        strict=False,
    )
    tables = {b.name: b for b in find_blocks(compressed) if b.kind == "table"}
    compress_(compressed, bases, config)
    full = compressed.state_dict()
    state = {k: v for k, v in full.items() if not v.is_meta}
    for name, block in sorted(tables.items()):
        src = f"{block.module}.embedding_bags.{block.table}.weight"
        dst = f"{block.module}.codes.embedding_bags.{block.table}.weight"
        key = dst if dst in full else src
        basis = bases.bases.get(name)
        state[key] = sharded[src] if basis is None else fold_table(sharded[src], basis.components)
    return state


def compress_stage(
    model_dir: Path,
    stats_path: Path,
    out: Path,
    rank_config: RankConfig,
    compress_config: CompressConfig = CompressConfig(),
    *,
    env: DistEnv = LOCAL,
    sharding: ShardingConfig | None = None,
    method: str = "afm",
    overwrite: bool = False,
) -> tuple[ModelRecord, list[dict[str, Any]]]:
    """Bases from the statistics (or weight SVD), ranks, ``compress_``, and a new model dir.

    In a job of several ranks the original is loaded sharded and every table is folded on
    the ranks that hold its rows (never gathered); rank 0 computes the bases and ranks
    and sends them to the others.

    The provenance's ``throughput`` (:class:`~afmrec.pipeline.runinfo.RunInfo`, without
    samples) holds each rank's wall time and peak memory of loading, planning and
    folding (not of writing the checkpoint, which follows it).

    Returns:
        the new record (``record.plan``: the policy, table format, bytes and ratios of the
        whole model) and one row per block (rank, energy kept, parameters and bytes
        before and after, loss weight, policy), also written to ``out/ranks.parquet``.
    """
    if method not in ("afm", "svd"):
        raise InputError(f"method must be 'afm' or 'svd', got {method!r}")
    check_not_input(out, model_dir, stats_path)
    check_replaceable(out, overwrite, folder=True)
    record = load_record(model_dir)
    if record.compressed:
        raise InputError(f"{model_dir}: this model is already compressed")
    meter = StageMeter("compress", env)
    with meter.timed():
        model, record = load_model(model_dir, env=env, sharding=sharding)
        plan = None
        if env.rank == 0:
            plan = _plan_compression(model_dir, stats_path, record, rank_config, method,
                                     compress_config.fuse, None if env.is_distributed else model)
        if env.is_distributed:
            plan = _broadcast(plan)
        bases, rows, summary = plan
        if env.is_distributed:
            state: Any = _compress_sharded(model, record, bases, compress_config)
        else:
            state = compress_(model, bases, compress_config)
    new = ModelRecord(
        record.model, bases.ranks, compress_config, method,
        provenance={"stage": "compress", "world_size": env.world_size,
                    "inputs": {"model": bases.meta["stats"]["model"], "stats": str(stats_path)},
                    "throughput": meter.gather().to_dict()},
        plan=summary,
    )
    # The bases and the ranks go into the folder before it appears: a kill never leaves
    # a compressed model without them.
    extra = {"bases.pt": lambda path: torch.save(bases.to_state(), path),
             "ranks.parquet": lambda path: _write_rows(rows, path)}
    save_model(state, new, out, overwrite=overwrite, extra=extra)
    return new, rows


def _plan_compression(
    model_dir: Path,
    stats_path: Path,
    record: ModelRecord,
    rank_config: RankConfig,
    method: str,
    fuse: bool,
    model: torch.nn.Module | None,
) -> tuple[Bases, list[dict[str, Any]], dict[str, Any]]:
    """Spectra, ranks and bases, the per-block rows and the whole model's summary (rank
    0's part of :func:`compress_stage`)."""
    stats = load_statistics(stats_path)
    if stats.meta.get("model") != _model_fingerprint(model_dir):
        raise InputError(
            f"{stats_path}: statistics were computed for another model or checkpoint "
            f"({stats.meta.get('model_dir')}), not {model_dir}"
        )
    spec = spectra(stats)
    rank_config = with_weights(rank_config, stats, stats_path)
    blocks, plan = plan_ranks(record, spec, rank_config, fuse)
    ranks = plan.ranks
    if method == "afm":
        bases = afm_bases(spec, ranks)
    elif model is None:
        raise InputError("--method svd runs in one process (it reads whole tables)")
    else:
        bases = weight_svd_bases(model, blocks, ranks)
    bases.meta = {"stats": stats.meta, "rank_config": repr(rank_config)}
    rows, summary = plan_report(blocks, spec, plan, rank_config, method)
    summary["sensitivity_data"] = (stats.meta.get("sensitivity") or {}).get("data")
    return bases, rows, summary


def plan_report(
    blocks: list[Block], spec: Mapping[str, Spectrum], plan: RankPlan, rank_config: RankConfig,
    method: str = "afm",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per block (rank, energy kept, parameters and bytes before and after, loss
    weight, policy: ``ranks.parquet``) and the whole model's summary (``record.plan``:
    policy, table format, parameters, bytes and ratio) of a rank plan."""
    ranks = plan.ranks
    fmt = plan.table_format
    weights = rank_config.weights or {}
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
            "bytes_before": original_bytes(b),
            "bytes_after": served_bytes(b, ranks.get(b.name), fmt),
            "loss_weight": weights.get(b.name),
            "policy": rank_config.policy,
            "table_format": fmt.dtype,
            "serve_device": fmt.serve_device,
        }
        for b in blocks
    ]
    other = plan.original_bytes // DENSE_BYTES - sum(b.params for b in blocks)
    params_after = other + sum(r["params_after"] for r in rows)
    summary = {
        "policy": rank_config.policy,
        "method": method,
        "target_ratio": rank_config.ratio,
        "table_format": fmt.dtype,
        "serve_device": fmt.serve_device,
        "params_before": plan.original_bytes // DENSE_BYTES,
        "params_after": params_after,
        "checkpoint_bytes_before": plan.original_bytes,
        "checkpoint_bytes_after": DENSE_BYTES * params_after,
        "served_bytes_after": plan.bytes,
        "ratio": plan.ratio,
    }
    return rows, summary


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
        read = _check_matching_schema(record, data)
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
