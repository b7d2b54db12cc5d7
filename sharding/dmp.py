"""Wraps a model in TorchRec's ``DistributedModelParallel`` (DMP).

Build the model with its tables on ``meta`` (``build_model(config, device,
sparse_device="meta")``): DMP materialises only this rank's shards. DMP initialises the
table weights itself (it does not keep an unsharded model's weights, on CPU at least),
so weights are loaded after sharding, from a DCP checkpoint
(:func:`afmrec.sharding.checkpoint.load_state_`), under any plan or world size.

Example::

    env = init_distributed()
    model = build_model(model_config, env.device, sparse_device="meta")
    dmp = shard_model(model, env, ShardingConfig({"*": "table_wise", "big_*": "row_wise"}))
    load_state_(dmp, checkpoint_dir)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import apply_optimizer_in_backward

from afmrec.common.errors import InputError

from .env import DistEnv
from .plan import ShardingConfig, build_plan, find_collections

# (optimizer class, its keyword arguments), e.g. (torch.optim.Adagrad, {"lr": 0.05}).
SparseOptimizer = tuple[type[torch.optim.Optimizer], dict[str, Any]]

# Adagrad as ``torch.optim.Adagrad`` runs it in one process (and as
# ``afmrec.pipeline.train.make_optimizer`` gives it to unsharded tables): FBGEMM's own
# default eps is 1e-8, torch's 1e-10, which matters for rows with tiny gradients.
DEFAULT_SPARSE_OPTIMIZER: SparseOptimizer = (torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-10})


def shard_model(
    model: nn.Module,
    env: DistEnv,
    config: ShardingConfig = ShardingConfig(),
    *,
    sparse_optimizer: SparseOptimizer | None = DEFAULT_SPARSE_OPTIMIZER,
    plan: ShardingPlan | None = None,
) -> DistributedModelParallel:
    """Shards ``model``'s embedding tables over the job's ranks.

    Tables of a fused kernel are trained inside the backward pass by
    ``sparse_optimizer``, attached to them here with TorchRec's
    ``apply_optimizer_in_backward`` (without it the fused kernel silently trains with
    SGD at lr 0.01). The update happens inside the backward pass; its state and
    learning rate are reached through ``dmp.fused_optimizer`` (whose ``zero_grad`` and
    ``step`` push ``param_groups[i]["lr"]`` to the kernel). Tables of the dense kernel
    (``data_parallel`` ones, and all of them under ``compute_kernel="dense"``) and every
    other parameter are left to the caller's optimizer.
    Sparse gradients are averaged over ranks like DDP's dense ones, so one step on W
    ranks equals one step on the global batch in one process.

    Args:
        model: the unsharded model, tables preferably on ``meta``; modified in place
            (its collections are replaced by sharded ones) and owned by the result.
        env: the job's world, from :func:`afmrec.sharding.env.init_distributed`; needs
            a process group (run under torchrun or SLURM, even with one rank).
        config: how to shard the tables (ignored when ``plan`` is given).
        sparse_optimizer: the fused tables' optimizer (a class TorchRec maps to an
            FBGEMM optimizer: ``torch.optim.SGD``, ``Adagrad``, ``Adam`` or
            ``torchrec.optim.RowWiseAdagrad``...). ``None`` only when the caller has
            already applied one to every fused table.
        plan: a ready plan (e.g. from :func:`afmrec.sharding.plan.planner_plan`).
    Returns:
        The ``DistributedModelParallel`` wrapping ``model``.
    Raises:
        InputError: no process group, no collection in the model, a plan that does not
            fit the config (see :func:`~afmrec.sharding.plan.build_plan`), or a fused
            table without an optimizer or with two.
    """
    if not env.is_distributed:
        raise InputError(
            "shard_model needs a process group: run under torchrun or SLURM "
            "(init_distributed() found no env:// variables)"
        )
    collections = find_collections(model)
    plan = plan if plan is not None else build_plan(collections, config, env)
    fused = _fused_tables(collections, plan)
    applied = [hasattr(p, "_optimizer_classes") for p in fused]
    if sparse_optimizer is None and not all(applied):
        raise InputError("shard_model: fused tables need a sparse_optimizer (none was applied)")
    if sparse_optimizer is not None:
        if any(applied):  # TorchRec takes one optimizer per table
            raise InputError(
                "shard_model: the tables already have an in-backward optimizer; "
                "pass sparse_optimizer=None to keep it"
            )
        optimizer_class, kwargs = sparse_optimizer
        apply_optimizer_in_backward(optimizer_class, fused, dict(kwargs))
    return DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=env.device,
        plan=plan,
        sharders=[EmbeddingBagCollectionSharder()],
    )


def _fused_tables(
    collections: dict[str, EmbeddingBagCollection], plan: ShardingPlan
) -> list[nn.Parameter]:
    """The table weights that the plan gives a kernel other than ``dense``."""
    return [
        ebc.embedding_bags[name].weight
        for path, ebc in collections.items()
        for name, sharding in (plan.get_plan_for_module(path) or {}).items()
        if sharding.compute_kernel != "dense"
    ]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DMP (and its DDP wrapper); ``model`` itself when not wrapped.

    Its ``named_modules()`` names blocks as the unsharded model does (no
    ``_dmp_wrapped_module.`` or ``module.`` prefix); its collections are TorchRec's
    sharded ones.
    """
    return get_unwrapped_module(model)
