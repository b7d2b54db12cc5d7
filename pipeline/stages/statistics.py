"""The ``stats`` stage: the moments of every block's outputs, and the loss probes.

It writes the statistics file (:func:`save_statistics`, with the checksum of its content)
that ``compress`` reads (:func:`load_statistics`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from afmrec.sharding.dmp import unwrap
from afmrec.sharding.env import DistEnv, barrier, broadcast_object
from afmrec.sharding.plan import ShardingConfig

from ..artifacts import (STATISTICS, STATISTICS_FORMAT, atomic_file, check_not_input,
                         check_replaceable, fingerprint, load_checked, save_checked, versions)
from ..bases import spectra
from ..blocks import Block, find_blocks, select_blocks
from ..errors import InputError
from ..model_io import load_model, skeleton
from ..runinfo import StageMeter
from ..sensitivity import SensitivityConfig, measure_sensitivity, probes_to_records
from ..stats import Statistics, StatsCheckpoint, collect_statistics, resolve_precision
from .inputs import LOCAL, DataRef, check_matching_schema, model_fingerprint


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
    data = check_matching_schema(record, data)
    if probe_data is not None:
        probe_data = check_matching_schema(record, probe_data)
    blocks = select_blocks(find_blocks(skeleton(record)), target, exclude)
    model_print, data_print = model_fingerprint(model_dir), data.fingerprint()
    checkpoint = None
    if checkpoint_every is not None:
        key = fingerprint([model_print, data_print, batch_size, env.world_size,
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
        "model": model_print,
        "model_dir": str(model_dir),
        "data": {"path": str(data), "fingerprint": data_print},
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
        spec = broadcast_object(spec)
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
