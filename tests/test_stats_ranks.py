"""Streaming statistics against torch.cov, merging, and rank selection."""

from __future__ import annotations

import pytest
import torch

from afmrec.models import build_model
from afmrec.pipeline.bases import spectra
from afmrec.pipeline.blocks import find_blocks, select_blocks
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.ranks import RankConfig, select_ranks
from afmrec.pipeline.stats import StatsCollector, Statistics, collect_statistics

from .conftest import PARAMS, random_batch, tiny_config

BATCHES = [random_batch(50, 3, seed=s) for s in range(6)]


def observed_outputs(model, blocks, batches):
    """The raw outputs each block produced (hooks that keep everything), for reference."""
    out = {b.name: [] for b in blocks}
    handles = []
    for b in blocks:
        if b.kind == "linear":
            mod = model.get_submodule(b.module)
            handles.append(mod.register_forward_hook(lambda m, i, o, n=b.name: out[n].append(o.detach())))
    tables = [b for b in blocks if b.kind == "table"]
    with torch.no_grad():
        for batch in batches:
            model(batch.dense_features, batch.sparse_features)
            pooled = model.sparse_arch.embedding_bag_collection(batch.sparse_features)
            for b in tables:
                keep = batch.sparse_features[b.table].lengths() > 0
                out[b.name].append(pooled[b.table][keep])
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in out.items()}


@pytest.mark.parametrize("precision, tol", [("float64", 1e-9), ("float32", 1e-5), ("bfloat16", 4e-3)])
def test_streaming_statistics_equal_torch_cov(arch, precision, tol):
    """float64 products match torch.cov to 1e-9; the default float32 Gram to 1e-5; the
    bfloat16 one to 4e-3 (its rounding is 2^-8 of the centred values)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(arch)).eval()
    blocks = find_blocks(model)
    stats = collect_statistics(model, blocks, BATCHES, precision=precision)
    ref = observed_outputs(model, blocks, BATCHES)
    assert set(stats.moments) == {b.name for b in blocks}
    for name, y in ref.items():
        m = stats.moments[name]
        assert int(m.n) == y.shape[0]
        torch.testing.assert_close(m.mean, y.mean(0), rtol=tol, atol=tol * float(y.std()))
        cov = torch.cov(y.T, correction=0).reshape(m.g.shape)
        torch.testing.assert_close(m.covariance, cov, rtol=tol, atol=tol * float(cov.abs().max()))


def test_merged_halves_equal_one_pass():
    torch.manual_seed(0)
    model = build_model(tiny_config("dcn")).eval()
    blocks = find_blocks(model)
    whole = collect_statistics(model, blocks, BATCHES, precision="float64")
    merged = collect_statistics(model, blocks, BATCHES[:2], precision="float64").merge(
        collect_statistics(model, blocks, BATCHES[2:], precision="float64")
    )
    for name in whole.moments:
        for a, b in zip(whole.moments[name].tensors(), merged.moments[name].tensors()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
    restored = Statistics.from_state(merged.to_state())
    assert torch.equal(restored.moments[name].g, merged.moments[name].g)


def test_zero_sample_block_is_an_error():
    torch.manual_seed(0)
    model = build_model(tiny_config("dlrm")).eval()
    with StatsCollector(model, find_blocks(model)) as c:
        pass
    with pytest.raises(InputError, match="no samples"):
        c.result().check_finite()


def _setup(arch="dlrm"):
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, embedding_dim=12)).eval()
    blocks = find_blocks(model)
    return model, blocks, spectra(collect_statistics(model, blocks, BATCHES))


@pytest.mark.parametrize("ratio", [1.3, 1.6, 2.0])
def test_ratio_lands_within_one_rank_unit(ratio):
    model, blocks, spec = _setup()
    total = sum(p.numel() for p in model.parameters())
    other = total - sum(b.params for b in blocks)
    for multiple in (1, 4):
        cfg = RankConfig(policy="variance", ratio=ratio, **{**PARAMS, "table_multiple": multiple})
        ranks = select_ranks(blocks, spec, cfg, other_params=other).ranks
        spent = other + sum(
            b.compressed_params(ranks[b.name]) if b.name in ranks else b.params for b in blocks
        )
        target = int(total / ratio)
        unit = max(b.params_per_rank * (multiple if b.kind == "table" else 1) for b in blocks)
        assert spent <= target
        assert target - spent < unit, (ratio, multiple, target, spent, ranks)
        for b in blocks:
            if b.kind == "table" and b.name in ranks:
                assert ranks[b.name] % multiple == 0


def test_ratio_prefers_variance_per_parameter():
    """A block whose outputs live in one direction gets rank 1; nothing wastes budget."""
    model, blocks, spec = _setup()
    ranks = select_ranks(blocks, spec, RankConfig(policy="variance", ratio=1.5, **PARAMS)).ranks
    for name, k in ranks.items():
        ev = spec[name].eigenvalues
        # never keep a direction with no variance while dropping one with variance elsewhere
        assert k <= int((ev > 1e-12 * ev.sum()).sum()) or k == 1


def test_rank_and_energy_policies():
    _, blocks, spec = _setup()
    tables = select_blocks(blocks, ["*.t?"])
    ranks = select_ranks(tables, spec, RankConfig(policy="rank", rank=3, table_multiple=4)).ranks
    assert set(ranks.values()) == set() or all(k == 4 for k in ranks.values())
    ranks = select_ranks(tables, spec, RankConfig(policy="energy", energy=0.9, **PARAMS)).ranks
    for name, k in ranks.items():
        assert spec[name].energy(k) >= 0.9 - 1e-12
        assert k == 1 or spec[name].energy(k - 1) < 0.9


def test_unreachable_ratio_and_bad_patterns():
    model, blocks, spec = _setup()
    with pytest.raises(InputError, match="unreachable"):
        select_ranks(blocks, spec, RankConfig(policy="variance", ratio=1000))
    with pytest.raises(InputError, match="matches no block"):
        select_blocks(blocks, ["nope.*"])
    with pytest.raises(InputError, match="needs --rank"):
        RankConfig(policy="rank")


def _pilot_centre(y, mask):
    """The centre batch_moments documents, in float64: the mean of each group's first 256
    kept rows."""
    y64, keep = y[:, :256].double(), mask[:, :256].double()
    return (y64.sum(1) / keep.sum(1, keepdim=True)).unsqueeze(1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("precision, e", [("float32", 0.0), ("bfloat16", 2.0**-8 + 2.0**-24 + 2.0**-32)])
def test_fast_gram_is_within_its_documented_bound(precision, e, device):
    """The centred Gram matrix and sum are within (2e + e^2 + gamma_R (1 + e)^2) |Yc|^T |Yc|
    and (e + gamma_R (1 + e)) sum |Yc| entrywise, e the rounding of the centred rows
    (0 in float32, 2^-8 + ... in bfloat16) and Yc the rows centred at the pilot mean (so
    the errors scale with the spread, not with a large mean); G within the former plus
    the centre times the latter."""
    from afmrec.pipeline.stats import batch_moments

    g = torch.Generator().manual_seed(0)
    y = 50.0 + torch.randn(3, 2000, 24, generator=g) * torch.rand(24, generator=g)  # big mean
    mask = torch.rand(3, 2000, generator=g) > 0.2
    y = y * mask.unsqueeze(2)
    n, s, fast = (t.cpu() for t in batch_moments(y.to(device), mask.to(device), precision))
    n2, s2, exact = batch_moments(y, mask, "float64")
    assert torch.equal(n, n2)
    u, rows = 2.0**-24, y.shape[1]
    gamma = rows * u / (1 - rows * u)
    c = _pilot_centre(y, mask)
    yc = ((y.double() - c) * mask.unsqueeze(2)).abs()
    # the centre is rounded to float32 (which the algebra absorbs) and y - c rounds once
    # more in float32: both within u |c| per entry, part of the slack here
    yc = yc + 2 * u * c.abs()
    t_err = (e + gamma * (1 + e)) * yc.sum(1)  # the error of t (hence of s = n c + t)
    assert ((s - s2).abs() <= t_err + 1e-12 * s2.abs()).all()
    # G = Gc + c t^T + t c^T + n c c^T in float64: Gc's error, plus t's error times the
    # centre (a CPU BLAS with another summation order showed it; it cancels in the
    # covariance, checked below)
    cross = c.abs().transpose(1, 2) * t_err.unsqueeze(1)
    bound = (2 * e + e * e + gamma * (1 + e) ** 2) * torch.bmm(yc.transpose(1, 2), yc)
    bound = bound + cross + cross.transpose(1, 2)
    slack = 1e-12 * exact.abs()
    assert ((fast - exact).abs() <= bound + slack).all()
    # and the covariance it yields is close in relative terms although the mean is 50
    cov = lambda g_, n_, s_: g_ / n_[:, None, None] - (s_ / n_[:, None]).unsqueeze(2) * (s_ / n_[:, None]).unsqueeze(1)
    rel = (cov(fast, n, s) - cov(exact, n, s2)).abs().max() / cov(exact, n, s2).abs().max()
    assert rel < (1e-6 if precision == "float32" else 1e-3)


def test_bfloat16_bound_is_tight_enough_to_fail():
    """The bound above is not vacuous: rows rounded to bfloat16 *before* centring (errors
    relative to the mean of 50, not to the spread) break it."""
    from afmrec.pipeline.stats import batch_moments

    g = torch.Generator().manual_seed(0)
    y = 50.0 + torch.randn(1, 2000, 24, generator=g) * torch.rand(24, generator=g)
    _, _, exact = batch_moments(y, None, "float64")
    _, _, rounded_first = batch_moments(y.bfloat16().float(), None, "float64")
    e, u = 2.0**-8 + 2.0**-24 + 2.0**-32, 2.0**-24
    yc = (y.double() - _pilot_centre(y, torch.ones(1, 2000, dtype=torch.bool))).abs() + 2 * u * 50
    gamma = 2000 * u / (1 - 2000 * u)
    bound = (2 * e + e * e + gamma * (1 + e) ** 2) * torch.bmm(yc.transpose(1, 2), yc)
    assert not ((rounded_first - exact).abs() <= bound).all()


def test_auto_precision_is_bfloat16_on_cuda_and_float32_elsewhere():
    from afmrec.pipeline.errors import InputError
    from afmrec.pipeline.stats import resolve_precision

    assert resolve_precision("auto", torch.device("cuda", 0)) == "bfloat16"
    assert resolve_precision("auto", torch.device("cpu")) == "float32"
    assert resolve_precision("auto", None) == "float32"
    assert resolve_precision("float64", torch.device("cuda")) == "float64"  # as asked
    with pytest.raises(InputError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))


# --- bytes, table formats and the planner's refusals ----------------------------------------


def test_row_bytes_of_each_format_and_device():
    """fp32 4w, fp16 2w, int8 w + 4 (a float16 scale and bias); CUDA rows padded to 16."""
    from afmrec.pipeline.budget import TableFormat

    widths = (4, 8, 12, 16)
    assert [TableFormat("fp32", "cpu").row_bytes(w) for w in widths] == [16, 32, 48, 64]
    assert [TableFormat("fp16", "cpu").row_bytes(w) for w in widths] == [8, 16, 24, 32]
    assert [TableFormat("int8", "cpu").row_bytes(w) for w in widths] == [8, 12, 16, 20]
    assert [TableFormat("fp16", "cuda").row_bytes(w) for w in widths] == [16, 16, 32, 32]
    assert [TableFormat("int8", "cuda").row_bytes(w) for w in widths] == [16, 16, 16, 32]


def _width16_tables():
    """Two width-16 tables (1000 and 500 rows) whose spectra keep 1/16 of the variance a
    direction, and the plan-free parameters beside them."""
    from afmrec.pipeline.bases import Spectrum
    from afmrec.pipeline.blocks import Block

    blocks = [Block(f"ebc.t{i}", "table", "ebc", rows, 16, table=f"t{i}", features=(f"t{i}",))
              for i, rows in enumerate((1000, 500))]
    flat = Spectrum(torch.full((16,), 1.0, dtype=torch.float64), torch.eye(16, dtype=torch.float64),
                    torch.zeros(16, dtype=torch.float64))
    return blocks, {b.name: flat for b in blocks}


def test_auto_format_holds_the_highest_ranks_in_the_bytes():
    """4x of width-16 tables served on CUDA (16-byte rows): fp32 keeps rank 4, fp16 rank 8,
    int8 rank 12 in the same 16 bytes a row; auto keeps int8 (the least variance dropped)."""
    blocks, spec = _width16_tables()
    plans = {fmt: select_ranks(blocks, spec, RankConfig(policy="variance", ratio=4, table_format=fmt))
             for fmt in ("fp32", "fp16", "int8", "auto")}
    assert {fmt: set(p.ranks.values()) for fmt, p in plans.items()} == {
        "fp32": {4}, "fp16": {8}, "int8": {12}, "auto": {12}}
    assert plans["auto"].table_format.dtype == "int8"
    # 1500 rows: 96,000 fp32 bytes; 16 a row plus the fp32 projections (16 x K + 16)
    assert plans["int8"].original_bytes == 96_000
    assert plans["int8"].bytes == 1500 * 16 + 2 * 4 * (16 * 12 + 16)
    assert 4 / 1.1 <= plans["int8"].ratio <= 4 * 1.1


def test_unreachable_target_names_what_reaches_it():
    """6x of width-16 tables: no format reaches it in 16-byte CUDA rows (4x at most); the
    message gives the largest ratio of every format on each device."""
    blocks, spec = _width16_tables()
    with pytest.raises(InputError) as e:
        select_ranks(blocks, spec, RankConfig(policy="variance", ratio=6))
    message = str(e.value)
    assert "target ratio 6 is unreachable with fp32, fp16, int8 tables served on cuda" in message
    # 96,000 bytes against 1500 rows of 16 (or 8) bytes plus 640 of projections
    assert "int8 on cuda 3.90x" in message and "fp16 on cpu 7.59x" in message
    plan = select_ranks(blocks, spec, RankConfig(policy="variance", ratio=6, serve_device="cpu"))
    assert plan.table_format.dtype in ("fp16", "int8") and 6 / 1.1 <= plan.ratio <= 6 * 1.1


def test_uniform_reaches_the_whole_model_target_and_loss_needs_probes():
    _, blocks, spec = _setup()
    total = sum(b.params for b in blocks)
    for ratio in (1.5, 2.0):
        plan = select_ranks(blocks, spec, RankConfig(policy="uniform", ratio=ratio, **PARAMS))
        assert ratio / 1.1 <= plan.ratio <= ratio * 1.1
        assert plan.original_bytes == 4 * total
    with pytest.raises(InputError, match="needs the blocks' loss sensitivity"):
        select_ranks(blocks, spec, RankConfig(ratio=2.0))
