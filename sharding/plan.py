"""Sharding plans for the embedding-bag collections of a model.

Two ways to plan:

* :func:`build_plan` builds the plan explicitly from a :class:`ShardingConfig` with
  TorchRec's per-type helpers (``table_wise``, ``row_wise``, ...). It places every table
  where the config says, on CPU as on GPU (TorchRec's planner refuses ``row_wise`` and
  ``table_row_wise`` on CPU), and needs no process group, so one process can inspect
  the plan a job will use.
* :func:`planner_plan` lets TorchRec's ``EmbeddingShardingPlanner`` choose, from a
  topology that describes the real devices (for production runs on GPUs).

Both name tables by the paths of their collections in ``model.named_modules()``, so a
collection anywhere in the model is sharded (a ``LowRankEmbeddingBagCollection`` holds
its K-wide tables at ``...embedding_bag_collection.codes``).
"""

from __future__ import annotations

import fnmatch
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ParameterSharding, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from afmrec.common.errors import InputError

from .env import DistEnv

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
# The kernels that train a table in TorchRec's sharded collections ("fused_uvm*" need CUDA).
COMPUTE_KERNELS = tuple(
    k.value
    for k in (
        EmbeddingComputeKernel.DENSE,
        EmbeddingComputeKernel.FUSED,
        EmbeddingComputeKernel.FUSED_UVM,
        EmbeddingComputeKernel.FUSED_UVM_CACHING,
    )
)
# FBGEMM's kernels (TorchRec asserts it for every non-dense kernel, on CPU too) reject
# local widths that are not multiples of 4, and TorchRec's column_wise helper silently
# keeps one shard when the shard width is not one.
_WIDTH_MULTIPLE = 4


@dataclass(frozen=True)
class ShardingConfig:
    """How to shard the embedding tables.

    Args:
        table_sharding: table-name glob -> sharding type (one of :data:`SHARDING_TYPES`).
            Every table takes the type of the last glob it matches, so put ``"*"`` first
            and exceptions after it. A glob that matches no table, or a table that no
            glob matches, is an error (checked when the plan is built).
        compute_kernel: the kernel of the sharded tables; ``None`` picks ``"fused"``
            (the optimizer runs inside the backward kernel) for every table but the
            ``data_parallel`` ones, which need ``"dense"`` (they are replicated and
            updated by the dense optimizer after DDP's all-reduce).
        column_shards: number of column shards of each ``column_wise`` table
            (``None``: one per rank). Each shard must be a multiple of 4 wide.

    Example::

        config = ShardingConfig({"*": "table_wise", "big_*": "row_wise"})
        config.sharding_types(["t0", "big_user"])  # {'t0': 'table_wise', 'big_user': 'row_wise'}
    """

    table_sharding: Mapping[str, str] = field(default_factory=lambda: {"*": "table_wise"})
    compute_kernel: str | None = None
    column_shards: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "table_sharding", dict(self.table_sharding))
        if not self.table_sharding:
            raise InputError("ShardingConfig: table_sharding is empty (use {'*': 'table_wise'})")
        for pattern, kind in self.table_sharding.items():
            if kind not in SHARDING_TYPES:
                raise InputError(
                    f"ShardingConfig: {pattern!r} -> {kind!r} is not one of {SHARDING_TYPES}"
                )
        if self.compute_kernel is not None and self.compute_kernel not in COMPUTE_KERNELS:
            raise InputError(
                f"ShardingConfig: compute_kernel must be one of {COMPUTE_KERNELS}, "
                f"got {self.compute_kernel!r}"
            )
        if "data_parallel" in self.table_sharding.values() and self.compute_kernel not in (
            None,
            "dense",
        ):
            raise InputError(
                "ShardingConfig: data_parallel tables need the dense kernel, "
                f"got compute_kernel={self.compute_kernel!r}"
            )
        if self.column_shards is not None and self.column_shards < 1:
            raise InputError(
                f"ShardingConfig: column_shards must be >= 1, got {self.column_shards}"
            )

    def sharding_types(self, table_names: list[str]) -> dict[str, str]:
        """Resolves the globs: table name -> sharding type.

        Raises:
            InputError: a glob matches none of ``table_names``, or a table matches no glob.
        """
        resolved: dict[str, str] = {}
        for pattern, kind in self.table_sharding.items():
            matched = [n for n in table_names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise InputError(
                    f"ShardingConfig: pattern {pattern!r} matches no table of {sorted(table_names)}"
                )
            resolved.update(dict.fromkeys(matched, kind))
        unmatched = [name for name in table_names if name not in resolved]
        if unmatched:
            raise InputError(
                f"ShardingConfig: tables {unmatched} match no pattern (add '*' for the rest)"
            )
        return {name: resolved[name] for name in table_names}

    def kernel(self, sharding_type: str) -> str:
        """The compute kernel of a table of this sharding type."""
        if self.compute_kernel is not None:
            return self.compute_kernel
        return "dense" if sharding_type == "data_parallel" else "fused"


def find_collections(model: nn.Module) -> dict[str, EmbeddingBagCollection]:
    """Every TorchRec ``EmbeddingBagCollection`` in ``model``, by module path.

    Raises:
        InputError: the model has none.
    """
    found = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, EmbeddingBagCollection)
    }
    if not found:
        raise InputError(f"{type(model).__name__} has no EmbeddingBagCollection to shard")
    return found


def table_sharding_types(
    collections: Mapping[str, EmbeddingBagCollection], config: ShardingConfig
) -> dict[str, dict[str, str]]:
    """Collection path -> (table name -> sharding type), the globs resolved over all tables."""
    names = [t.name for ebc in collections.values() for t in ebc.embedding_bag_configs()]
    types = config.sharding_types(names)
    return {
        path: {t.name: types[t.name] for t in ebc.embedding_bag_configs()}
        for path, ebc in collections.items()
    }


def build_plan(
    collections: Mapping[str, EmbeddingBagCollection], config: ShardingConfig, env: DistEnv
) -> ShardingPlan:
    """Builds the sharding plan the config asks for, without TorchRec's planner.

    Placement: ``table_wise`` tables go to ranks round-robin in table order;
    ``column_wise`` tables take their shards from the same round-robin; ``row_wise``
    tables span all ranks; ``table_row_wise`` tables span the ranks of one host, hosts
    taken round-robin; ``data_parallel`` tables are replicated on every rank.

    Args:
        collections: path in the model -> collection (see :func:`find_collections`);
            the tables may be on ``meta``.
        config: the sharding types and kernel.
        env: the job's world (world size, ranks per host, devices).
    Returns:
        A ``ShardingPlan`` for ``DistributedModelParallel``.
    Raises:
        InputError: a glob matches nothing, a table matches no glob, a column-wise
            table cannot be split into ``column_shards`` shards of a multiple of 4
            columns, or a shard of a fused-kernel table is not a multiple of 4 wide.

    Example::

        plan = build_plan(find_collections(model), ShardingConfig({"*": "row_wise"}), env)
    """
    types = table_sharding_types(collections, config)
    ranks = _RoundRobin(env.world_size)
    hosts = _RoundRobin(max(env.world_size // env.local_world_size, 1))
    sharder = EmbeddingBagCollectionSharder()
    plan = {}
    for path, ebc in collections.items():
        generators = {
            table.name: _generator(types[path][table.name], table, config, env, ranks, hosts)
            for table in ebc.embedding_bag_configs()
        }
        module_plan = construct_module_sharding_plan(
            ebc,
            generators,
            sharder=sharder,
            local_size=env.local_world_size,
            world_size=env.world_size,
            device_type=env.device.type,
        )
        for name, sharding in module_plan.items():
            # Set here rather than through the helpers: not all of them take a kernel
            # argument in every TorchRec version we support.
            sharding.compute_kernel = config.kernel(types[path][name])
            _check_widths(name, sharding)
            _place_(sharding, env)
        plan[path] = module_plan
    return ShardingPlan(plan)


class _RoundRobin:
    """Hands out ``0, 1, ..., n-1, 0, 1, ...``."""

    def __init__(self, n: int) -> None:
        self._cycle: Iterator[int] = itertools.cycle(range(n))

    def take(self, count: int = 1) -> list[int]:
        return [next(self._cycle) for _ in range(count)]


def _generator(
    sharding_type: str,
    table: EmbeddingBagConfig,
    config: ShardingConfig,
    env: DistEnv,
    ranks: _RoundRobin,
    hosts: _RoundRobin,
) -> ParameterShardingGenerator:
    """TorchRec's generator of one table's ``ParameterSharding``."""
    if sharding_type == "table_wise":
        return table_wise(rank=ranks.take()[0])
    if sharding_type == "row_wise":
        return row_wise()
    if sharding_type == "table_row_wise":
        return table_row_wise(host_index=hosts.take()[0])
    if sharding_type == "data_parallel":
        return data_parallel()
    shards = config.column_shards or env.world_size
    width, rest = divmod(table.embedding_dim, shards)
    if rest or (shards > 1 and width % _WIDTH_MULTIPLE):
        raise InputError(
            f"table {table.name}: embedding_dim {table.embedding_dim} cannot be split into "
            f"{shards} column shards of a multiple of {_WIDTH_MULTIPLE} columns"
        )
    return column_wise(ranks=ranks.take(shards))


def _check_widths(table: str, sharding: ParameterSharding) -> None:
    """Fails early, with a way out, where TorchRec would assert while sharding."""
    if sharding.compute_kernel == "dense" or sharding.sharding_spec is None:
        return
    widths = sorted({s.shard_sizes[1] for s in sharding.sharding_spec.shards})
    if any(w % _WIDTH_MULTIPLE for w in widths):
        raise InputError(
            f"table {table}: shards {widths} columns wide, but the {sharding.compute_kernel!r} "
            f"kernel needs multiples of {_WIDTH_MULTIPLE}; use compute_kernel='dense' or "
            f"a width (rank) that is a multiple of {_WIDTH_MULTIPLE}"
        )


def _place_(sharding: ParameterSharding, env: DistEnv) -> None:
    """Names on every shard the device its rank really uses.

    TorchRec writes ``cuda:{rank % local_size}``, which is wrong where each process is
    restricted to its own GPU (submitit's default, where every rank uses ``cuda:0``);
    the sharded tensors then fail their device check.
    """
    if sharding.sharding_spec is None:  # data_parallel: no shards
        return
    for shard in sharding.sharding_spec.shards:
        rank = shard.placement.rank()
        shard.placement = dist._remote_device(f"rank:{rank}/{env.device_of(rank)}")


def planner_plan(
    model: nn.Module,
    env: DistEnv,
    topology_kwargs: Mapping[str, Any] | None = None,
    *,
    config: ShardingConfig | None = None,
    batch_size: int | None = None,
) -> ShardingPlan:
    """A plan chosen by TorchRec's ``EmbeddingShardingPlanner`` (collectively, under a group).

    The planner's cost model assumes default device characteristics (an HBM bandwidth
    of 897 GB/s, ...) and penalises narrow tables: pass the real device's numbers in
    ``topology_kwargs`` and check the plan it picks. On CPU it offers neither
    ``row_wise`` nor ``table_row_wise``; use :func:`build_plan` there.

    Args:
        model: the unsharded model (tables may be on ``meta``).
        env: the job's world.
        topology_kwargs: extra arguments of ``torchrec.distributed.planner.Topology``,
            e.g. ``{"hbm_cap": 80 * 2**30, "hbm_mem_bw": 3.35e12 / 1e3}`` (bandwidths in
            bytes per millisecond, as TorchRec counts them).
        config: optional constraints: each table's sharding type and kernel as resolved
            from the config (and, for ``column_wise``, the shard width).
        batch_size: per-rank batch size the planner assumes (its default: 512).
    Returns:
        The planner's ``ShardingPlan``, with shard devices as :func:`build_plan` names them.
    """
    topology = Topology(
        world_size=env.world_size,
        local_world_size=env.local_world_size,
        compute_device=env.device.type,
        **dict(topology_kwargs or {}),
    )
    constraints = _constraints(find_collections(model), config, env) if config else None
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints
    )
    sharders = [EmbeddingBagCollectionSharder()]
    if env.is_distributed:
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    else:
        plan = planner.plan(model, sharders)
    for module_plan in plan.plan.values():
        for sharding in module_plan.values():
            _place_(sharding, env)
    return plan


def _constraints(
    collections: Mapping[str, EmbeddingBagCollection], config: ShardingConfig, env: DistEnv
) -> dict[str, ParameterConstraints]:
    """The planner's per-table constraints that say what ``config`` says."""
    types = table_sharding_types(collections, config)
    constraints = {}
    for path, ebc in collections.items():
        for table in ebc.embedding_bag_configs():
            kind = types[path][table.name]
            shards = config.column_shards or env.world_size
            constraints[table.name] = ParameterConstraints(
                sharding_types=[kind],
                compute_kernels=[config.kernel(kind)],
                min_partition=table.embedding_dim // shards if kind == "column_wise" else None,
            )
    return constraints
