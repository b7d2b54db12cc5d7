"""2-rank DistributedModelParallel on CPU (gloo): sharded results equal unsharded ones.

Each spawn runs many checks (a spawn costs seconds of start-up), and every worker
returns what it computed; the comparisons run here, in the pytest process, against
the unsharded model. Tables are compared as full tensors assembled from the local
shards every rank returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import LowRankEmbeddingBagCollection, build_model
from afmrec.pipeline.train import TrainConfig, label_loss, make_optimizer
from afmrec.sharding.checkpoint import load_state_, save_state
from afmrec.sharding.dmp import shard_model, unwrap
from afmrec.sharding.env import (
    DistEnv,
    barrier,
    destroy_distributed,
    init_distributed,
    is_rank_zero,
)
from afmrec.sharding.plan import ShardingConfig, build_plan, find_collections, planner_plan

from .conftest import random_batch, tiny_config
from .dist_utils import run_distributed

pytestmark = pytest.mark.multiproc

WORLD = 2
HALF = 4  # rows per rank; the global batch has WORLD * HALF rows
BATCH_SEED = 7
TOL = 1e-5

# name -> (arch, embedding_dim, table_sharding). Column-wise shards must be a multiple
# of 4 wide (FBGEMM's fused kernel asserts it, on CPU too), hence D = 8 there.
FORWARD_CASES: dict[str, tuple[str, int, dict[str, str]]] = {
    "table_wise": ("dlrm", 4, {"*": "table_wise"}),
    "row_wise": ("dlrm", 4, {"*": "row_wise"}),
    "column_wise": ("dlrm", 8, {"*": "column_wise"}),
    "table_row_wise": ("dlrm", 4, {"*": "table_row_wise"}),
    "data_parallel": ("dlrm", 4, {"*": "data_parallel"}),
    "dcn_mixed": ("dcn", 8, {"*": "table_wise", "t1": "row_wise", "t2": "column_wise"}),
    "deepfm_mixed": ("deepfm", 4, {"*": "row_wise", "t0": "data_parallel", "t2": "table_wise"}),
    "lowrank_mixed": ("lowrank", 8, {"*": "column_wise", "t0": "row_wise", "t1": "table_wise"}),
}
# Trained with the project's make_optimizer; "fused" is then saved and resharded.
TRAIN_CASES = {
    "fused": {"*": "table_wise"},
    "with_data_parallel": {"*": "row_wise", "t0": "data_parallel"},
}
RESHARD_TYPES = ("row_wise", "column_wise", "table_row_wise")
STEPS = 2
# sparse_lr is that of shard_model's default sparse optimizer (the fused tables' lr).
TRAIN_CONFIG = TrainConfig(dense_lr=1e-2, sparse_lr=0.05)

# Shard pieces: key -> (global shape, [(offsets, local tensor), ...]) of one rank.
Pieces = dict[str, tuple[tuple[int, ...], list[tuple[tuple[int, ...], torch.Tensor]]]]


# ---------------------------------------------------------------- helpers (both sides)


def _init_model(arch: str, dim: int, sparse_device: str | None = None) -> torch.nn.Module:
    """A seeded tiny model; ``"lowrank"`` is a DLRM whose t0 and t1 are 4-wide low-rank."""
    torch.manual_seed(0)
    base = "dlrm" if arch == "lowrank" else arch
    model = build_model(tiny_config(base, embedding_dim=dim), sparse_device=sparse_device)
    if arch == "lowrank":  # its EmbeddingBagCollection sits at ...embedding_bag_collection.codes
        tables = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
        model.sparse_arch.embedding_bag_collection = LowRankEmbeddingBagCollection(
            tables, {"t0": 4, "t1": 4}, device=sparse_device
        )
    return model


def _global_batch() -> Batch:
    return random_batch(WORLD * HALF, 3, seed=BATCH_SEED)


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of a batch (the KJT sliced key by key)."""
    kjt = batch.sparse_features
    lengths, values = [], []
    for jt in kjt.to_dict().values():
        offsets = jt.offsets()
        lengths.append(jt.lengths()[start:stop])
        values.append(jt.values()[offsets[start] : offsets[stop]])
    sparse = KeyedJaggedTensor.from_lengths_sync(kjt.keys(), torch.cat(values), torch.cat(lengths))
    return Batch(batch.dense_features[start:stop], sparse, batch.labels[start:stop])


def _rank_batch(rank: int) -> Batch:
    return _rows(_global_batch(), rank * HALF, (rank + 1) * HALF)


def _checkpoint_dir(root: Path, arch: str, dim: int) -> Path:
    return root / f"init_{arch}_{dim}"


def _local_pieces(state: dict[str, Any]) -> Pieces:
    """This rank's part of every tensor of a (sharded) state dict, cloned."""
    pieces: Pieces = {}
    for key, value in state.items():
        if isinstance(value, ShardedTensor):
            parts = [
                (tuple(s.metadata.shard_offsets), s.tensor.detach().clone())
                for s in value.local_shards()
            ]
            pieces[key] = (tuple(value.size()), parts)
        elif isinstance(value, torch.Tensor):
            pieces[key] = (tuple(value.shape), [((0,) * value.dim(), value.detach().clone())])
    return pieces


def _assemble(per_rank: list[Pieces]) -> dict[str, torch.Tensor]:
    """Full tensors from every rank's pieces; each element must be covered."""
    full: dict[str, torch.Tensor] = {}
    for key, (shape, _) in per_rank[0].items():
        out = torch.full(shape, float("nan"))
        for pieces in per_rank:
            for offsets, tensor in pieces[key][1]:
                index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
                out[index] = tensor
        assert not out.isnan().any(), f"{key}: the shards do not cover the tensor"
        full[key] = out
    return full


def _assert_states_equal(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), f"{key} differs"


# ---------------------------------------------------------------- workers (spawned)


def _sharded(env: DistEnv, arch: str, dim: int, table_sharding: dict[str, str], ckpt: Path):
    dmp = shard_model(_init_model(arch, dim, "meta"), env, ShardingConfig(table_sharding))
    load_state_(dmp, ckpt)
    return dmp


def _forward_worker(env: DistEnv, root: Path) -> dict[str, Any]:
    """Per case: this rank's logits and state pieces, or the error text."""
    batch = _rank_batch(env.rank)
    results: dict[str, Any] = {}
    for name, (arch, dim, table_sharding) in FORWARD_CASES.items():
        try:
            dmp = _sharded(env, arch, dim, table_sharding, _checkpoint_dir(root, arch, dim))
            with torch.no_grad():
                logits = dmp(batch.dense_features, batch.sparse_features).view(-1)
            results[name] = {"logits": logits, "pieces": _local_pieces(dmp.state_dict())}
        except Exception as e:  # reported per case, judged by the parent
            results[name] = f"{type(e).__name__}: {e}"
    return results


def _train_(model: torch.nn.Module, batches: list[Batch]) -> torch.nn.Module:
    """``STEPS`` steps of the project's trainer step (make_optimizer, BCE) on each batch."""
    optimizer = make_optimizer(model, TRAIN_CONFIG)
    for _ in range(STEPS):
        optimizer.zero_grad()
        for batch in batches:
            logits = model(batch.dense_features, batch.sparse_features).view(-1)
            label_loss(logits, batch).backward()
        optimizer.step()
    return model


def _train_reshard_worker(env: DistEnv, root: Path) -> dict[str, Any]:
    """Trains under each TRAIN_CASES plan; the "fused" result is saved and resharded."""
    ckpt = _checkpoint_dir(root, "dlrm", 8)
    trained = {
        name: _train_(_sharded(env, "dlrm", 8, table_sharding, ckpt), [_rank_batch(env.rank)])
        for name, table_sharding in TRAIN_CASES.items()
    }
    results: dict[str, Any] = {name: _local_pieces(m.state_dict()) for name, m in trained.items()}
    dmp = trained["fused"]
    save_state(dmp, root / "trained")
    barrier()
    results["env"] = (env, is_rank_zero())
    results["fused_keys"] = sorted(dmp.fused_optimizer.state_dict()["state"])
    results["block_names"] = [n for n, _ in unwrap(dmp).named_modules()]
    for kind in RESHARD_TYPES:
        resharded = _sharded(env, "dlrm", 8, {"*": kind}, root / "trained")
        results[f"reshard_{kind}"] = _local_pieces(resharded.state_dict())
    return results


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Initial checkpoints of every model the workers shard (saved unsharded, one process)."""
    path = tmp_path_factory.mktemp("sharding")
    for arch, dim in {(arch, dim) for arch, dim, _ in FORWARD_CASES.values()}:
        save_state(_init_model(arch, dim), _checkpoint_dir(path, arch, dim))
    return path


@pytest.fixture(scope="module")
def forward_results(root) -> list[dict[str, Any]]:
    return run_distributed(_forward_worker, WORLD, root, timeout_s=120)


@pytest.fixture(scope="module")
def train_results(root) -> list[dict[str, Any]]:
    return run_distributed(_train_reshard_worker, WORLD, root, timeout_s=120)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_sharded_forward_matches_unsharded(forward_results, case):
    arch, dim, _ = FORWARD_CASES[case]
    per_rank = [r[case] for r in forward_results]
    for result in per_rank:
        assert not isinstance(result, str), result
    model = _init_model(arch, dim).eval()
    with torch.no_grad():
        for rank, result in enumerate(per_rank):
            batch = _rank_batch(rank)
            expected = model(batch.dense_features, batch.sparse_features).view(-1)
            assert (result["logits"] - expected).abs().max() <= TOL
    # The checkpoint saved by one process loaded exactly into the 2-rank DMP (1 -> 2).
    _assert_states_equal(_assemble([r["pieces"] for r in per_rank]), model.state_dict())


def _check_training(train_results, case: str) -> None:
    trained = _assemble([r[case] for r in train_results])
    initial = _init_model("dlrm", 8).state_dict()
    for key, value in initial.items():
        assert not torch.equal(trained[key], value), f"{key} was not trained"
    # The same steps in one process on the global batch.
    expected = _train_(_init_model("dlrm", 8), [_global_batch()]).state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(trained[key], value, atol=TOL, rtol=0, msg=key)


def test_training_equals_one_process(train_results):
    _check_training(train_results, "fused")


def test_training_with_data_parallel_table_equals_one_process(train_results):
    _check_training(train_results, "with_data_parallel")


def test_workers_see_their_env(train_results):
    envs = [r["env"] for r in train_results]
    assert envs == [
        (DistEnv(rank, WORLD, rank, torch.device("cpu"), "gloo", WORLD), rank == 0)
        for rank in range(WORLD)
    ]


def test_fused_optimizer_and_block_names_under_dmp(train_results):
    result = train_results[0]
    assert len(result["fused_keys"]) == 2, "the fused optimizer holds the Adagrad state"
    assert "sparse_arch.embedding_bag_collection" in result["block_names"]
    assert not any(n.startswith(("_dmp_wrapped_module", "module.")) for n in result["block_names"])


def test_checkpoint_reshards_exactly(root, train_results):
    trained = _assemble([r["fused"] for r in train_results])
    for kind in RESHARD_TYPES:  # 2 -> 2, saved under table_wise, loaded under another plan
        _assert_states_equal(_assemble([r[f"reshard_{kind}"] for r in train_results]), trained)
    model = _init_model("dlrm", 8)  # 2 -> 1: one process, no process group
    load_state_(model, root / "trained")
    _assert_states_equal(model.state_dict(), trained)


def _failing_worker(env: DistEnv, root: Path) -> None:
    if env.rank == 1:
        raise ValueError("rank 1 gives up")
    barrier()  # never completed: rank 1 is gone


def test_run_distributed_reports_a_failed_rank(tmp_path):
    with pytest.raises(AssertionError, match="(?s)rank 1 failed.*rank 1 gives up"):
        run_distributed(_failing_worker, WORLD, tmp_path, timeout_s=60)


# ---------------------------------------------------------------- one process


def _env(world_size: int = WORLD, local_world_size: int = WORLD) -> DistEnv:
    return DistEnv(0, world_size, 0, torch.device("cpu"), "gloo", local_world_size)


def _table_plan(config: ShardingConfig, env: DistEnv | None = None, dim: int = 8):
    collections = find_collections(_init_model("dlrm", dim, "meta"))
    (path,) = collections
    return build_plan(collections, config, env or _env()).plan[path]


def test_plan_places_tables_as_configured():
    config = ShardingConfig({"*": "table_wise", "t1": "column_wise", "t2": "data_parallel"})
    plan = _table_plan(config)
    assert {name: p.sharding_type for name, p in plan.items()} == {
        "t0": "table_wise",
        "t1": "column_wise",
        "t2": "data_parallel",
    }
    assert plan["t0"].ranks == [0] and plan["t1"].ranks == [1, 0]  # one round-robin
    assert [p.compute_kernel for p in plan.values()] == ["fused", "fused", "dense"]
    widths = [s.shard_sizes for s in plan["t1"].sharding_spec.shards]
    assert widths == [[40, 4], [40, 4]]


def test_plan_table_row_wise_takes_hosts_round_robin():
    plan = _table_plan(ShardingConfig({"*": "table_row_wise"}), _env(4, 2))
    assert [p.ranks for p in plan.values()] == [[0, 1], [2, 3], [0, 1]]


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(table_sharding={"*": "diagonal"}), "is not one of"),
        (dict(table_sharding={}), "empty"),
        (dict(compute_kernel="fast"), "compute_kernel"),
        (dict(table_sharding={"*": "data_parallel"}, compute_kernel="fused"), "dense kernel"),
        (dict(column_shards=0), "column_shards"),
    ],
)
def test_config_rejects_bad_values(config, message):
    with pytest.raises(ValueError, match=message):
        ShardingConfig(**config)


@pytest.mark.parametrize(
    "config, message",
    [
        (ShardingConfig({"*": "table_wise", "user_*": "row_wise"}), "matches no table"),
        (ShardingConfig({"t0": "row_wise"}), r"match no pattern"),
        (ShardingConfig({"*": "column_wise"}, column_shards=4), "multiple of 4"),
    ],
)
def test_plan_rejects_configs_that_do_not_fit(config, message):
    with pytest.raises(ValueError, match=message):
        _table_plan(config)


def test_plan_needs_the_dense_kernel_for_widths_not_a_multiple_of_4():
    """TorchRec 1.8 asserts "local_cols=6 not divisible by 4" for fused tables, on CPU too."""
    with pytest.raises(ValueError, match="compute_kernel='dense'"):
        _table_plan(ShardingConfig({"*": "row_wise"}), dim=6)
    plan = _table_plan(ShardingConfig({"*": "row_wise"}, compute_kernel="dense"), dim=6)
    assert {p.compute_kernel for p in plan.values()} == {"dense"}


def test_planner_plan_follows_the_config():
    config = ShardingConfig({"*": "column_wise"})
    plan = planner_plan(_init_model("dlrm", 8, "meta"), _env(), {"hbm_cap": 2**30}, config=config)
    (module_plan,) = plan.plan.values()
    for sharding in module_plan.values():
        assert (sharding.sharding_type, sharding.compute_kernel) == ("column_wise", "fused")
        assert [s.shard_sizes[1] for s in sharding.sharding_spec.shards] == [4, 4]


def test_shard_model_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        shard_model(_init_model("dlrm", 4, "meta"), _env(1, 1), ShardingConfig())


_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_init_distributed_without_env_is_one_process(monkeypatch):
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert env == DistEnv(0, 1, 0, torch.device("cpu"), "gloo", 1)
    assert not env.is_distributed and is_rank_zero()
    barrier()
    destroy_distributed()


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, "incomplete"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "inconsistent"),
        ({"WORLD_SIZE": "two", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "integers"),
    ],
)
def test_init_distributed_rejects_bad_env(monkeypatch, variables, message):
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        init_distributed("cpu")


def test_init_distributed_rejects_unknown_device_kind():
    with pytest.raises(ValueError, match="device_kind"):
        init_distributed("tpu")


@pytest.mark.parametrize("visible, expected", [(1, [0, 0, 0, 0]), (2, [0, 1, 0, 1])])
def test_cuda_device_of_each_rank(monkeypatch, visible, expected):
    """torchrun: cuda:{local rank}; one visible GPU per process (submitit): cuda:0."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    env = DistEnv(0, 4, 0, torch.device("cuda", 0), "nccl", 2)
    assert [env.device_of(rank) for rank in range(4)] == [torch.device("cuda", i) for i in expected]
