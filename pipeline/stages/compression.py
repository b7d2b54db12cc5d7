"""The ``compress`` stage: ranks from the statistics, bases, and the compressed model.

:func:`plan_ranks` chooses the ranks (:mod:`afmrec.pipeline.ranks`), :func:`compress_stage`
computes the bases on rank 0, compresses the model (:func:`compress_sharded` in a job of
several ranks: every table folded where its rows live) and writes the new model folder
with its bases and the plan's rows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import torch

from afmrec.sharding.compress import compress_sharded_state
from afmrec.sharding.env import DistEnv, broadcast_object
from afmrec.sharding.plan import ShardingConfig

from ..artifacts import atomic_file, check_not_input, check_replaceable
from ..bases import Bases, Spectrum, afm_bases, spectra, weight_svd_bases
from ..blocks import Block, find_blocks
from ..budget import DENSE_BYTES, original_bytes, served_bytes
from ..compress import CompressConfig, compress_
from ..errors import InputError
from ..evaluate import count_parameters
from ..model_io import ModelRecord, load_model, load_record, save_model, skeleton
from ..ranks import RankConfig, RankPlan, select_ranks
from ..runinfo import StageMeter
from ..sensitivity import SensitivityConfig, probes_from_records, sensitivity_weights
from ..stats import Statistics
from .inputs import LOCAL, model_fingerprint
from .statistics import load_statistics


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


def compress_sharded(
    model: torch.nn.Module, record: ModelRecord, bases: Bases, config: CompressConfig
) -> dict[str, Any]:
    """The compressed model's state dict, tables folded where their shards live.

    A skeleton of the original (tables on ``meta``) takes this rank's copy of the dense
    weights and is compressed with :func:`compress_`: that folds every Linear and builds
    the projections, and only shapes the tables. Each table ``E`` is then replaced by
    ``E U`` computed from ``dmp.state_dict()``'s local shards
    (:func:`~afmrec.sharding.compress.compress_sharded_state`).
    """
    compressed = skeleton(record)
    tables = {b.name: b for b in find_blocks(compressed) if b.kind == "table"}
    folds = []
    for name, block in sorted(tables.items()):
        basis = bases.bases.get(name)
        folds.append((f"{block.module}.embedding_bags.{block.table}.weight",
                      f"{block.module}.codes.embedding_bags.{block.table}.weight",
                      None if basis is None else basis.components))
    return compress_sharded_state(model.state_dict(), compressed,
                                  lambda m: compress_(m, bases, config), folds)


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
            plan = broadcast_object(plan)
        bases, rows, summary = plan
        if env.is_distributed:
            state: Any = compress_sharded(model, record, bases, compress_config)
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
    if stats.meta.get("model") != model_fingerprint(model_dir):
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
        "target_dense_ratio": rank_config.dense_ratio,
        "dense_ratio": plan.dense_ratio,
    }
    return rows, summary


def summary_line(plan: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    """What a plan made of the model (:func:`plan_report`'s summary and rows), in one line:
    blocks, parameters, checkpoint and served bytes, and the Linear layers' ratio where
    ``--dense-ratio`` asked for one."""
    n = sum(r["compressed"] for r in rows)
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    before, ckpt, served = plan["checkpoint_bytes_before"], plan["checkpoint_bytes_after"], plan["served_bytes_after"]
    return (f"{n} of {len(rows)} blocks compressed ({plan['policy']} policy): "
            f"{plan['params_before']:,} -> {plan['params_after']:,} parameters "
            f"({plan['params_before'] / plan['params_after']:.2f}x); checkpoint {mib(before)} -> "
            f"{mib(ckpt)} ({before / ckpt:.2f}x); served with {plan['table_format']} tables on "
            f"{plan['serve_device']}: {mib(served)} ({before / served:.2f}x)"
            + (f"; Linear layers {plan['dense_ratio']:.2f}x smaller (multiply-adds likewise)"
               if plan.get("target_dense_ratio") else ""))


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
