"""The one-call API: ``afmrec.compress_``, ``afmrec.AFMConfig``, ``afmrec.export`` (issue 23),
on a module afmrec did not build and on an afmrec DLRM, with real TorchRec."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import afmrec
from afmrec.models import LowRankEmbeddingBagCollection, LowRankLinear, ModelConfig, TableSpec, build_model
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.ranks import TOLERANCE

from .conftest import served_bytes

ROOT = Path(__file__).resolve().parents[1]
NUM_DENSE = 4


class UserRec(nn.Module):
    """A user's own CTR model: one collection (tables of ``dims`` widths) read straight
    from its ``KeyedTensor``, a dense projection and a 3-layer MLP over the concatenation."""

    def __init__(self, rows=(2000, 3000, 1500, 2500), dims=(16, 16, 16, 16)) -> None:
        super().__init__()
        self.tables = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t{i}", embedding_dim=d, num_embeddings=r, feature_names=[f"f{i}"])
            for i, (r, d) in enumerate(zip(rows, dims))])
        self.dense = nn.Linear(NUM_DENSE, 16)
        self.mlp = nn.Sequential(nn.Linear(16 + sum(dims), 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 1))

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.tables(kjt).values()  # (B, sum D)
        return self.mlp(torch.cat([self.dense(dense), pooled], dim=1)).squeeze(1)


def make_batches(tables: list[EmbeddingBagConfig], n: int, rows: int = 256, seed: int = 0) -> list[Batch]:
    """``n`` batches: dense (rows, 4), bags of 0-3 ids per feature (some empty)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(0, 4, (len(tables), rows), generator=g)
        ids = torch.cat([torch.randint(0, t.num_embeddings, (int(k.sum()),), generator=g)
                         for t, k in zip(tables, lengths)])
        kjt = KeyedJaggedTensor.from_lengths_sync([t.feature_names[0] for t in tables], ids, lengths.flatten())
        out.append(Batch(torch.randn(rows, NUM_DENSE, generator=g), kjt, torch.zeros(rows)))
    return out


def logits(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(b.dense_features, b.sparse_features).view(-1) for b in batches])


def test_user_module_compresses_to_the_ratio_with_the_loss_policy():
    torch.manual_seed(0)
    model = UserRec()
    original = copy.deepcopy(model)
    batches = make_batches(model.tables.embedding_bag_configs(), 8)
    result = afmrec.compress_(model, batches, afmrec.AFMConfig(ratio=4))

    assert result.policy == "loss" and result.summary["policy"] == "loss"
    # the probes gave every block a loss weight (but the 1-wide output layer, which no rank
    # truncates), and they differ between blocks
    probed = {b.name for b in find_blocks(original) if b.out_features > 1}
    assert set(result.weights) == probed and len(set(result.weights.values())) > 1
    # every planned block is swapped for factors of its rank
    assert isinstance(model.tables, LowRankEmbeddingBagCollection)
    assert result.ranks, "nothing was compressed"
    for name, k in result.ranks.items():
        if name.startswith("tables."):
            table = name.split(".")[1]
            assert model.tables.projections[table].in_features == k
            assert model.tables.codes.embedding_bags[table].weight.shape == (original.tables.embedding_bags[table].weight.shape[0], k)
        else:
            module = model.get_submodule(name)
            assert isinstance(module, LowRankLinear) and module.rank == k
    whole = {b.name for b in find_blocks(original)} - set(result.ranks)
    for name in whole - {f"tables.t{i}" for i in range(4)}:
        assert type(model.get_submodule(name)) is nn.Linear
    # the achieved served-bytes ratio, counted here from the modules themselves
    before = 4 * sum(p.numel() for p in original.parameters())
    after = served_bytes(model, result.table_format, "cuda")
    assert (result.plan.original_bytes, result.plan.bytes) == (before, after)
    assert result.ratio == pytest.approx(before / after, rel=1e-12)
    assert abs(math.log(result.ratio / 4)) <= math.log1p(TOLERANCE) + 1e-12
    assert getattr(model, "afmrec_plan")["ratio"] == result.ratio
    assert f"({result.ratio:.2f}x)" in str(result)
    # the compressed model still runs and stays close
    fresh = make_batches(original.tables.embedding_bag_configs(), 2, seed=1)
    assert logits(model, fresh).shape == logits(original, fresh).shape


def test_dense_ratio_makes_the_linears_that_many_times_smaller():
    """``AFMConfig(dense_ratio=2)``: the Linear layers of the compressed module, counted
    from the modules, hold at most half the original's parameters (so half the
    multiply-adds per sample), and the whole model still meets its ratio."""
    torch.manual_seed(0)
    model = UserRec()
    original = copy.deepcopy(model)
    batches = make_batches(model.tables.embedding_bag_configs(), 8)
    result = afmrec.compress_(model, batches, afmrec.AFMConfig(ratio=4, dense_ratio=2))

    linears = [b.name for b in find_blocks(original) if b.kind != "table"]
    params = lambda m: sum(sum(p.numel() for p in m.get_submodule(n).parameters()) for n in linears)  # noqa: E731
    assert params(original) / params(model) >= 2
    assert result.summary["dense_ratio"] == pytest.approx(params(original) / params(model), rel=1e-12)
    assert abs(math.log(result.ratio / 4)) <= math.log1p(TOLERANCE) + 1e-12


def low_rank_user_model(rank: int = 4) -> UserRec:
    """A UserRec whose tables' rows lie in a ``rank``-dimensional subspace (their columns
    are exact copies and multiples of ``rank`` of them), mixed widths: its pooled outputs,
    and the first MLP layer's outputs, have fewer directions than widths."""
    torch.manual_seed(0)
    model = UserRec(rows=(300, 500, 400), dims=(16, 8, 16))
    with torch.no_grad():
        for bag in model.tables.embedding_bags.values():
            w = bag.weight
            base = w[:, :rank].clone()
            for j in range(rank, w.shape[1], rank):
                w[:, j:j + rank] = base * (1 + j // rank) * (-1) ** (j // rank)
    return model


def test_full_energy_is_exact_on_unseen_rows():
    model = low_rank_user_model()
    original = copy.deepcopy(model)
    configs = original.tables.embedding_bag_configs()
    result = afmrec.compress_(model, make_batches(configs, 6),
                              afmrec.AFMConfig(energy=1.0, precision="float64"))
    assert result.policy == "energy"
    # each table keeps exactly its 4 directions; the first MLP layer (input: 4 dense + 12
    # pooled directions) keeps at most 16 of its 64; the rest have full-rank outputs
    assert {n: k for n, k in result.ranks.items() if n.startswith("tables.")} == {f"tables.t{i}": 4 for i in range(3)}
    assert 4 < result.ranks["mlp.0"] <= 16 and set(result.ranks) == {*(f"tables.t{i}" for i in range(3)), "mlp.0"}
    assert isinstance(model.tables, LowRankEmbeddingBagCollection) and isinstance(model.mlp[0], LowRankLinear)
    fresh = make_batches(configs, 3, seed=7)
    want, got = logits(original, fresh), logits(model, fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_statistics_at_a_collection_are_the_pooled_rows_of_non_empty_bags():
    """Each table's moments, observed at its collection's ``KeyedTensor`` (mixed widths),
    are those of its feature's pooled rows, empty bags left out."""
    from afmrec.pipeline.stats import collect_statistics

    torch.manual_seed(0)
    model = UserRec(rows=(40, 60, 50), dims=(16, 8, 16))
    batches = make_batches(model.tables.embedding_bag_configs(), 3, rows=64)
    stats = collect_statistics(model, find_blocks(model), batches, precision="float64")
    for i in range(3):
        with torch.no_grad():
            rows = torch.cat([model.tables(b.sparse_features)[f"f{i}"][b.sparse_features[f"f{i}"].lengths() > 0]
                              for b in batches]).double()
        m = stats.moments[f"tables.t{i}"]
        assert int(m.n) == rows.shape[0] < 3 * 64
        torch.testing.assert_close(m.s, rows.sum(0))
        torch.testing.assert_close(m.g, rows.T @ rows)


def test_probes_at_a_collection_equal_compressing_the_table_alone():
    """Where no SparseArch owns the collection, tables are observed and truncated at its
    ``KeyedTensor`` (mixed widths, empty bags): each probe's loss is the KL divergence
    of the model with that block alone compressed at that rank."""
    from afmrec.pipeline.bases import afm_bases, spectra
    from afmrec.pipeline.compress import CompressConfig
    from afmrec.pipeline.compress import compress_ as swap_blocks_
    from afmrec.pipeline.sensitivity import bernoulli_kl, measure_sensitivity
    from afmrec.pipeline.stats import collect_statistics

    torch.manual_seed(0)
    model = UserRec(rows=(40, 60, 50), dims=(16, 8, 16)).eval()
    batches = make_batches(model.tables.embedding_bag_configs(), 3, rows=64)
    blocks = find_blocks(model)
    spec = spectra(collect_statistics(model, blocks, batches, precision="float64"))
    probes = [p for p in measure_sensitivity(model, blocks, spec, batches) if p.block.startswith("tables.")]
    assert {p.block for p in probes} == {"tables.t0", "tables.t1", "tables.t2"}
    base = logits(model, batches).double()
    for p in probes:
        alone = swap_blocks_(copy.deepcopy(model), afm_bases(spec, {p.block: p.rank}), CompressConfig())
        kl = bernoulli_kl(base, logits(alone, batches).double()).mean().item()
        assert p.delta_loss == pytest.approx(kl, rel=1e-3, abs=1e-9) and p.delta_loss > 0


def test_a_custom_forward_feeds_batches_of_any_type():
    """Dict batches through ``forward=``: the same rows give the same statistics, probes
    and plan as TorchRec Batches through the default feed."""
    torch.manual_seed(0)
    a = UserRec()
    b = copy.deepcopy(a)
    batches = make_batches(a.tables.embedding_bag_configs(), 6)
    dicts = [{"x": x.dense_features, "kjt": x.sparse_features} for x in batches]
    config = afmrec.AFMConfig(ratio=3, serve_device="cpu")
    default = afmrec.compress_(a, batches, config)
    custom = afmrec.compress_(b, dicts, config, forward=lambda m, batch: m(batch["x"], batch["kjt"]))
    assert custom.ranks == default.ranks and custom.weights == pytest.approx(default.weights, rel=1e-9)
    assert custom.ratio == default.ratio
    fresh = make_batches(a.tables.embedding_bag_configs(), 1, seed=3)
    torch.testing.assert_close(logits(b, fresh), logits(a, fresh), rtol=0, atol=1e-6)


class WithUnused(UserRec):
    """A Linear its forward never calls."""

    def __init__(self) -> None:
        super().__init__(rows=(300, 400, 500, 600))
        self.unused = nn.Linear(16, 16)


def test_a_block_that_sees_no_row_stays_whole():
    torch.manual_seed(0)
    model = WithUnused()
    result = afmrec.compress_(model, make_batches(model.tables.embedding_bag_configs(), 2),
                              afmrec.AFMConfig(rank=4))
    assert result.skipped == ("unused",) and type(model.unused) is nn.Linear
    assert "unused" not in result.ranks and "unused" not in {r["block"] for r in result.blocks}
    assert isinstance(model.mlp[0], LowRankLinear) and result.ranks["mlp.0"] == 4


def test_probes_run_on_the_batches_the_config_or_the_caller_names():
    """Default: the last ``probe_fraction`` of the batches, cut to ``probe_rows`` rows; or
    exactly the ``probe_batches`` given. The same probe rows give the same loss weights."""
    torch.manual_seed(0)
    model = UserRec(rows=(300, 400, 500, 600))
    batches = make_batches(model.tables.embedding_bag_configs(), 8)  # 256 rows each

    def weights(config, **kwargs):
        return afmrec.compress_(copy.deepcopy(model), batches, config, **kwargs).weights

    config = afmrec.AFMConfig(ratio=2, serve_device="cpu")
    assert weights(config) == weights(config, probe_batches=batches[-1:])  # round(8 * 0.1) = 1
    assert weights(config) != weights(config, probe_batches=batches[:1])
    halved = afmrec.AFMConfig(ratio=2, serve_device="cpu", probe_fraction=0.5, probe_rows=512)
    assert weights(halved) == weights(config, probe_batches=batches[4:6])
    assert weights(halved) != weights(config, probe_batches=batches[4:7])


def test_afmrec_dlrm_compresses_and_exports_a_torchscript_file(tmp_path):
    config = ModelConfig("dlrm", (TableSpec("user", 3000), TableSpec("item", 2000)), num_dense=NUM_DENSE,
                         dense_arch=(32, 16), over_arch=(32, 1))
    torch.manual_seed(0)
    model = build_model(config)
    tables = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    result = afmrec.compress_(model, make_batches(tables, 6), afmrec.AFMConfig(ratio=3))
    assert result.policy == "loss" and abs(math.log(result.ratio / 3)) <= math.log1p(TOLERANCE) + 1e-12
    assert isinstance(model.sparse_arch.embedding_bag_collection, LowRankEmbeddingBagCollection)

    meta = afmrec.export(model, tmp_path / "afm.pt", tables="fp32")
    assert meta["arch"] == "dlrm" and meta["features"] == ["user", "item"] and meta["num_dense"] == NUM_DENSE
    served = torch.jit.load(str(tmp_path / "afm.pt"))
    fresh = make_batches(tables, 2, seed=5)
    for batch in fresh:
        kjt = batch.sparse_features
        got = served(batch.dense_features, kjt.values(), kjt.lengths().int())
        torch.testing.assert_close(got, logits(model, [batch]), rtol=1e-5, atol=1e-5)
    # by default the tables go in the format the plan counted
    assert afmrec.export(model, tmp_path / "planned.pt")["tables"] == result.table_format


def test_a_user_module_exports_with_its_dense_width(tmp_path):
    torch.manual_seed(0)
    model = UserRec(rows=(50, 60, 70, 80))
    with pytest.raises(InputError, match=r"dense width of a UserRec: pass num_dense=N"):
        afmrec.export(model, tmp_path / "u.pt")
    afmrec.export(model, tmp_path / "u.pt", num_dense=NUM_DENSE)
    served = torch.jit.load(str(tmp_path / "u.pt"))
    batch = make_batches(model.tables.embedding_bag_configs(), 1, seed=2)[0]
    kjt = batch.sparse_features
    torch.testing.assert_close(served(batch.dense_features, kjt.values(), kjt.lengths().int()),
                               logits(model, [batch]), rtol=1e-5, atol=1e-5)


class Branchy(UserRec):
    """Python control flow on a tensor's value: fx cannot trace it."""

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        out = super().forward(dense, kjt)
        return out if float(out.sum()) > 0 else -out


def test_an_untraceable_module_gets_a_one_line_error(tmp_path):
    model = Branchy(rows=(50, 60, 70, 80))
    with pytest.raises(InputError) as err:
        afmrec.export(model, tmp_path / "b.pt", num_dense=NUM_DENSE)
    assert "cannot compile Branchy to torchscript" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "b.pt").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of ratio, energy, rank"),
    ({"ratio": 4, "energy": 0.9}, "give exactly one of ratio, energy, rank"),
    ({"ratio": 1.0}, "ratio must be a number > 1"),
    ({"ratio": "4"}, "ratio must be a number > 1"),
    ({"energy": 1.5}, r"energy must be a number in \(0, 1\]"),
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"rank": 2.5}, "rank must be an integer >= 1"),
    ({"ratio": 4, "policy": "fastest"}, "policy must be one of loss, variance"),
    ({"ratio": 4, "policy": "energy"}, "policy 'energy' takes energy=, not ratio="),
    ({"ratio": 4, "table_format": "int4"}, "table_format must be one of auto, fp32, fp16, int8"),
    ({"ratio": 4, "serve_device": "tpu"}, "serve_device must be one of cuda, cpu"),
    ({"ratio": 4, "probe_fraction": 0}, r"probe_fraction must be in \(0, 1\]"),
    ({"ratio": 4, "probe_rows": 0}, "probe_rows must be an integer >= 1 or None"),
    ({"ratio": 4, "precision": "half"}, "precision must be one of auto, float64"),
    ({"ratio": 4, "exclude": "mlp.*"}, "exclude must be a sequence of glob strings"),
])
def test_bad_config_values_are_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        afmrec.AFMConfig(**kwargs)
    assert isinstance(err.value, InputError) and str(err.value).startswith("AFMConfig: ")


def test_bad_compress_inputs_are_clear_errors():
    torch.manual_seed(0)
    model = UserRec(rows=(50, 60, 70, 80))
    batches = make_batches(model.tables.embedding_bag_configs(), 2)
    with pytest.raises(InputError, match="holds no EmbeddingBagCollection table or nn.Linear"):
        afmrec.compress_(nn.Sequential(nn.ReLU()), batches, afmrec.AFMConfig(ratio=4))
    with pytest.raises(InputError, match="config must be an afmrec.AFMConfig"):
        afmrec.compress_(model, batches, {"ratio": 4})
    with pytest.raises(InputError, match="pattern 'nothing.*' matches no block"):
        afmrec.compress_(model, batches, afmrec.AFMConfig(ratio=4, exclude=["nothing.*"]))
    with pytest.raises(InputError, match="no calibration batches"):
        afmrec.compress_(model, [], afmrec.AFMConfig(ratio=4))
    with pytest.raises(InputError, match="target ratio 1000 is unreachable"):
        afmrec.compress_(model, batches, afmrec.AFMConfig(ratio=1000, policy="variance"))
    afmrec.compress_(model, batches, afmrec.AFMConfig(rank=4))
    with pytest.raises(InputError, match="already compressed"):
        afmrec.compress_(model, batches, afmrec.AFMConfig(rank=4))


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 1)


def test_find_blocks_takes_only_the_linears_compress_swaps():
    """nn.MultiheadAttention's out_proj is a Linear subclass whose weight the attention
    reads directly: not a block (compress_ swaps plain nn.Linear only)."""
    assert [b.name for b in find_blocks(WithAttention())] == ["head"]


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python API example, as written, runs and writes its artifact."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    section = section[:section.index("\n## ", 1)]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(code) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(code[0], "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "afm.pt").is_file()
    out = capsys.readouterr().out
    assert "blocks compressed (loss policy)" in out
    ratio = float(out.splitlines()[1].split()[0])
    assert abs(math.log(ratio / 4)) <= math.log1p(TOLERANCE) + 1e-12
