"""What runs only on a GPU: the statistics update replayed as a CUDA graph.

Skipped without CUDA (CI is CPU-only); run on the GPU host with
``python3 -m pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch

from afmrec.models import build_model
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.stats import StatsCollector

from .conftest import random_batch, run_without_afmrec, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _collect(model, blocks, batches, cuda_graphs: bool, precision: str, read_after: int = 3,
             keep_outputs: bool = False):
    """The pass's statistics, its replay count and the counts read after ``read_after``
    batches (as a checkpoint save reads them, while replays may still run).
    ``keep_outputs``: every observed output stays allocated to the end, so that no batch's
    outputs lie where an earlier batch's did."""
    kept, hooks = [], []
    if keep_outputs:
        modules = dict(model.named_modules())
        owners = {b.module if b.kind == "linear" else b.module.rpartition(".")[0] for b in blocks}
        hooks = [modules[m].register_forward_hook(lambda _m, _i, out: kept.append(out)) for m in owners]
    outer = torch.cuda.current_stream()
    with torch.no_grad(), StatsCollector(model, blocks, torch.device("cuda"), precision,
                                           cuda_graphs=cuda_graphs) as c:
        # the graphed pass runs the caller's work on a high-priority stream
        assert (torch.cuda.current_stream() != outer) == cuda_graphs
        assert torch.cuda.current_stream().priority < outer.priority or not cuda_graphs
        for i, b in enumerate(batches, start=1):
            model(b.dense_features, b.sparse_features)
            if i == read_after:
                partial = {k: m.n.clone() for k, m in c.moments.items()}
    assert torch.cuda.current_stream() == outer
    for h in hooks:
        h.remove()
    return c.result(), c.replays, partial


@pytest.mark.parametrize("keep_outputs", [False, True])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
def test_graphed_update_adds_what_the_eager_update_adds(arch, precision, keep_outputs):
    """Batches of one shape replay a captured graph (from the second on); a batch of
    another shape runs eagerly. Counts are exact (a warm-up or capture that added to the
    sums would double them) and the sums agree with the eager update's. The replays read
    the outputs where they lie: whether the allocator hands the layers the same memory
    every batch or (outputs kept alive elsewhere) new memory, each replay reads its own
    batch's outputs."""
    torch.manual_seed(0)
    model = build_model(tiny_config(arch, embedding_dim=8), torch.device("cuda")).eval()
    blocks = find_blocks(model)
    batches = [random_batch(64, 3, seed=s).to(torch.device("cuda")) for s in range(5)]
    batches.append(random_batch(40, 3, seed=9).to(torch.device("cuda")))  # a short last batch
    eager, none, eager_partial = _collect(model, blocks, batches, False, precision)
    graphed, replays, partial = _collect(model, blocks, batches, True, precision,
                                         keep_outputs=keep_outputs)
    assert none == 0
    assert all(torch.equal(partial[k], eager_partial[k]) for k in partial)
    assert replays == 4  # batches 2-5; the first ran eagerly, the short one too
    for name, m in eager.moments.items():
        g = graphed.moments[name]
        assert torch.equal(m.n, g.n), name
        torch.testing.assert_close(g.s, m.s, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(g.g, m.g, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, masked, fields", [
    ((5, 8192, 512), False, False), ((26, 8192, 128), True, True), ((1, 8192, 1), False, False),
    ((2, 257, 24), False, False), ((3, 33, 130), True, True), ((1, 0, 4), False, False)])
def test_fused_centring_gives_pytorchs_rows_and_their_sums(shape, masked, fields, dtype):
    """The Triton kernels read the rows where they lie (``fields``: each group a column of a
    (B, F, D) output, rows F * D apart), take the centres PyTorch takes (in another order
    of addition), write the rows PyTorch's kernels write for that centre, bit for bit
    (``y - mask c`` rounded in float32, then to ``dtype``, to nearest even), and sum the
    rounded rows in float32 by splits of rows, whose float64 total is within gamma_R of
    their exact sums."""
    pytest.importorskip("triton")
    from afmrec.models.kernels import centring

    g = torch.Generator(device="cuda").manual_seed(0)
    groups, rows, width = shape
    if fields:
        y = (torch.randn((rows, groups + 1, width), generator=g, device="cuda") * 3 + 5)[:, 1:].transpose(0, 1)
    else:
        y = torch.randn(shape, generator=g, device="cuda") * 3 + 5
    mask = torch.rand(shape[:2], generator=g, device="cuda") > 0.3 if masked else None
    if masked:
        y.mul_(mask.unsqueeze(2))
    c, yc, t = centring._fused(centring.RowGroups.of(y), mask, dtype)
    pilot = min(rows, centring.PILOT_ROWS)
    torch.testing.assert_close(c, centring._pilot_centre(y, mask), rtol=0, atol=pilot * 2.0**-24 * 10)
    want_yc, _ = centring._unfused(y, mask, c, dtype)
    assert yc.dtype == dtype and yc.is_contiguous() and torch.equal(yc, want_yc)
    exact = yc.double().sum(1)
    u = 2.0**-24
    bound = rows * u / (1 - rows * u) * yc.double().abs().sum(1)
    assert t.dim() == 3 and ((t.double().sum(1) - exact).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("precision, tol", [("float64", 1e-5), ("float32", 1e-5), ("bfloat16", 4e-3)])
@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
def test_cuda_statistics_equal_float64_products_on_the_cpu(arch, precision, tol):
    """The whole CUDA update (graph replays, the Triton centring and float64 recombination)
    against float64 products on the CPU, same model and batches: counts exact, means and
    covariances to the precision's tolerance (as ``test_streaming_statistics_equal_torch_cov``;
    float64 too to 1e-5: the two devices' forward passes differ at float32 rounding)."""
    from afmrec.pipeline.stats import collect_statistics

    torch.manual_seed(0)
    model = build_model(tiny_config(arch, embedding_dim=8)).eval()
    blocks = find_blocks(model)
    batches = [random_batch(64, 3, seed=s) for s in range(5)]
    want = collect_statistics(model, blocks, batches, precision="float64")
    # built on the device (TorchRec's collection keeps the device it was built on)
    cuda = build_model(tiny_config(arch, embedding_dim=8), torch.device("cuda")).eval()
    cuda.load_state_dict(model.state_dict())
    on_cuda = [random_batch(64, 3, seed=s).to(torch.device("cuda")) for s in range(5)]  # fresh KJTs
    got = collect_statistics(cuda, blocks, on_cuda, precision=precision)
    for name, m in want.moments.items():
        g = got.moments[name]
        assert torch.equal(g.n.cpu(), m.n), name
        torch.testing.assert_close(g.mean.cpu(), m.mean, rtol=tol, atol=tol * float(m.covariance.diagonal().sqrt().max()))
        cov = m.covariance
        torch.testing.assert_close(g.covariance.cpu(), cov, rtol=tol, atol=tol * float(cov.abs().max()))


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise", "column_wise"])
def test_statistics_through_a_sharded_model_equal_float64_products_on_the_cpu(tmp_path, sharding):
    """The sparse arch's output of a DistributedModelParallel model (one NCCL rank, tables
    sharded table-, row- or column-wise, weights loaded from a one-process checkpoint) is
    read in place as an unsharded one's is: the CUDA statistics (bfloat16, the default
    there) against float64 products of the unsharded model on the CPU."""
    from afmrec.launch.bench_speed import one_rank_unless_launched
    from afmrec.pipeline.stats import collect_statistics
    from afmrec.sharding.checkpoint import load_state_, save_state
    from afmrec.sharding.dmp import shard_model, unwrap
    from afmrec.sharding.env import destroy_distributed, init_distributed
    from afmrec.sharding.plan import ShardingConfig

    torch.manual_seed(0)
    config = tiny_config("dcn", embedding_dim=8)
    model = build_model(config).eval()
    blocks = find_blocks(model)
    want = collect_statistics(model, blocks, [random_batch(64, 3, seed=s) for s in range(5)],
                              precision="float64")
    save_state(model, tmp_path / "ckpt")
    with one_rank_unless_launched():
        env = init_distributed("cuda")
        try:
            dmp = shard_model(build_model(config, env.device, sparse_device="meta"), env,
                              ShardingConfig({"*": sharding}))
            load_state_(dmp, tmp_path / "ckpt")
            batches = [random_batch(64, 3, seed=s).to(env.device) for s in range(5)]
            got = collect_statistics(unwrap(dmp), blocks, batches, forward=dmp)
        finally:
            destroy_distributed()
    tol = 4e-3
    for name, m in want.moments.items():
        g = got.moments[name]
        assert torch.equal(g.n.cpu(), m.n), name
        scale = float(m.covariance.diagonal().sqrt().max())
        torch.testing.assert_close(g.mean.cpu(), m.mean, rtol=tol, atol=tol * scale)
        cov = m.covariance
        torch.testing.assert_close(g.covariance.cpu(), cov, rtol=tol, atol=tol * float(cov.abs().max()))


@pytest.mark.parametrize("batch, fields, k, dim, r, carry", [
    (70, 3, 5, 16, 0, False), (300, 4, 12, 32, 45, True), (1000, 26, 32, 128, 112, True),
    (129, 26, 32, 128, 200, False)])
def test_fused_cross_kernel_is_as_close_to_float64_as_tf32_gemms(batch, fields, k, dim, r, carry, monkeypatch):
    """One update of the fused cross network's Triton kernel against its function in
    float64 on the CPU: no further from it than PyTorch's TF32 GEMMs computing the same
    update (its products are TF32 too) or than TF32's rounding (3e-3: cuBLAS takes some of
    these small products in float32); every element written."""
    from afmrec.models.kernels.cross import cross_update, cross_update_reference
    from afmrec.models.kernels.selfcheck import random_update_inputs

    # TF32 for this test only: later tests compare a fresh process's GEMMs with this one's
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    n = (fields + 1) * dim
    inputs = random_update_inputs(batch, fields, k, dim, r, carry, seed=batch)
    exact = cross_update_reference(*[t.double() if t is not None else None for t in inputs])
    tf32 = cross_update_reference(*[t.cuda() if t is not None else None for t in inputs])
    got = cross_update(*[t.cuda() if t is not None else None for t in inputs])
    assert got.shape == (batch, n) and torch.isfinite(got).all()
    err = lambda t: ((t.cpu().double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(got) <= max(2 * err(tf32), 3e-3), (err(got), err(tf32))


@pytest.mark.parametrize("widths, r", [((24, 0, 0, 40, 28, 0) * 4 + (24, 0), 112), ((8, 0, 16), 200)])
def test_fused_cross_kernel_with_mixed_code_widths_is_as_close_to_float64_as_tf32_gemms(widths, r, monkeypatch):
    """The update from codes of different widths with whole tables' rows among them (the
    default plan's kind, 26 fields of width 128 as at the MLPerf shape), against float64
    on the CPU: no further from it than PyTorch's TF32 GEMMs (or TF32's rounding)."""
    from afmrec.models.kernels.cross import cross_update, cross_update_reference
    from afmrec.models.kernels.selfcheck import random_layout_inputs

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    inputs, layout = random_layout_inputs(1000, widths, 128, r, True, seed=5)
    exact = cross_update_reference(*[t.double() if t is not None else None for t in inputs], layout)
    tf32 = cross_update_reference(*[t.cuda() if t is not None else None for t in inputs], layout)
    got = cross_update(*[t.cuda() if t is not None else None for t in inputs], layout)
    assert got.shape == (1000, (len(widths) + 1) * 128) and torch.isfinite(got).all()
    err = lambda t: ((t.cpu().double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(got) <= max(2 * err(tf32), 3e-3), (err(got), err(tf32))


@pytest.mark.parametrize("batch, fields, dim, r, carry", [
    (70, 3, 16, 24, False), (1000, 26, 128, 512, True), (129, 26, 64, 32, False), (300, 4, 32, 200, True)])
def test_fused_cross_kernel_from_x0_is_as_close_to_float64_as_tf32_gemms(batch, fields, dim, r, carry, monkeypatch):
    """The update kernel with x_0 read from memory (the original's cross layers, rank 512 at
    the MLPerf shape: w read in chunks) against float64 on the CPU: no further from it than
    PyTorch's TF32 GEMMs computing the same update, or than TF32's rounding."""
    from afmrec.models.kernels.cross import cross_update_x0, cross_update_x0_reference, interaction
    from afmrec.models.kernels.selfcheck import random_update_inputs

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    dense, codes, nonempty, cw, w, up_t, beta, prev = random_update_inputs(batch, fields, 4, dim, r, carry, seed=batch)
    inputs = [interaction(dense, codes, nonempty, cw), w, up_t, beta, prev]
    exact = cross_update_x0_reference(*[t.double() if t is not None else None for t in inputs])
    tf32 = cross_update_x0_reference(*[t.cuda() if t is not None else None for t in inputs])
    got = cross_update_x0(*[t.cuda() if t is not None else None for t in inputs])
    assert got.shape == exact.shape and torch.isfinite(got).all()
    err = lambda t: ((t.cpu().double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(got) <= max(2 * err(tf32), 3e-3), (err(got), err(tf32))


@pytest.mark.parametrize("tables", ["fp32", "int8"])
def test_aoti_artifact_of_the_original_holds_our_kernels(tmp_path, tables):
    """The original DLRM-DCNv2 (full-width tables) is offered our kernels too: its AOTInductor
    artifact pools its rows with the autotuned lookup and fuses its cross layers from the
    interaction in memory (X0CrossNet), with the plain form's logits to TF32 rounding;
    ``measure`` keeps whichever of each is faster and serves the same logits."""
    from afmrec.pipeline.export import ExportConfig, call, export_model, load_artifact, serving_module

    from .test_fused_cross import BATCHES, afm_dcn

    model, config, _ = afm_dcn(compressed=False, device="cuda")
    features = [t.name for t in config.tables]
    plain = serving_module(model, features, tables)
    for kernels in ("ours", "measure"):
        path = tmp_path / f"{kernels}.pt2"
        meta = export_model(model, config, path, ExportConfig(tables=tables, format="aoti", kernels=kernels))
        if kernels == "ours":
            assert meta["cross"] == "fused" and meta["lookup"] == "triton"
        loaded, _ = load_artifact(path, "cuda")
        for b in BATCHES:
            b = b.to(torch.device("cuda"))
            want = call(plain, b)
            torch.testing.assert_close(call(loaded, b), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.qint8])
def test_lookup_kernel_pools_what_fbgemms_cuda_kernel_pools(dtype):
    """Our Triton lookup on FBGEMM's CUDA rows (aligned to 16 bytes there) against its
    PyTorch reference and FBGEMM's own CUDA kernel: shared tables, two widths, empty bags
    and out-of-table ids. FBGEMM's CUDA kernel dequantises int8 rows in float16 (its CPU
    kernel, as ours, in float32): there the two differ by float16's rounding."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from afmrec.models.kernels.lookup import KernelRows, pooled_lookup_reference
    from afmrec.models.serving import FlatLookup, kernel_inputs, use_kernels_

    from .test_export import lookup_input, mixed_quantised_collection

    lookup = FlatLookup(mixed_quantised_collection(dtype, "cuda"))
    kjt = lookup_input("cuda")
    fbgemm = lookup(kjt).values()
    assert use_kernels_(lookup, True) == {"cross": "plain", "lookup": "triton"}
    assert lookup.use_kernel
    got = lookup(kjt).values()
    rows = KernelRows(lookup.kernel_weights, lookup.kernel_tables, **lookup.kernel_spec)
    want = pooled_lookup_reference(rows.weights, rows.tables, *kernel_inputs(kjt), rows.kind, rows.total_dim)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    tol = 2e-3 * fbgemm.abs().max().item() if dtype == torch.qint8 else 1e-6
    torch.testing.assert_close(got, fbgemm, rtol=0, atol=tol)
    # ids beyond int32 read row 0, as ids outside their table do (not a row their int32
    # wrap-around lands on)
    values = kjt.values().clone()
    values[:3] = torch.tensor([2**32 + 3, -(2**33), 2**31 + 1])
    huge = KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())
    zeroed = KeyedJaggedTensor(keys=kjt.keys(), values=torch.where(values == kjt.values(), values, 0),
                               lengths=kjt.lengths())
    torch.testing.assert_close(lookup(huge).values(), lookup(zeroed).values(), rtol=0, atol=0)


@pytest.mark.parametrize("ranks", ["one", "mixed"])
@pytest.mark.parametrize("tables", ["fp32", "int8"])
def test_aoti_artifact_serves_the_fused_cross_network(tmp_path, tables, ranks):
    """On CUDA an AFM DLRM-DCNv2's AOTInductor artifact computes the cross network from the
    codes (one rank for all tables, or two ranks and a table left whole) and pools its
    rows with our lookup (both Triton kernels compiled into the package), loads where
    afmrec cannot be imported, and serves the plain network's logits (FBGEMM's lookups)
    to TF32 rounding."""
    from afmrec.pipeline.export import ExportConfig, call, export_model, load_artifact, serving_module

    from .test_fused_cross import BATCHES, MIXED, afm_dcn

    model, config, _ = afm_dcn(device="cuda", table_ranks=MIXED if ranks == "mixed" else None)
    features = [t.name for t in config.tables]
    plain = serving_module(model, features, tables)
    meta = export_model(model, config, tmp_path / "m.pt2", ExportConfig(tables=tables, format="aoti", kernels="ours"))
    assert meta["cross"] == "fused" and meta["lookup"] == "triton" and meta["check_max_abs_diff"] <= 1e-5
    loaded, _ = load_artifact(tmp_path / "m.pt2", "cuda")
    for b in BATCHES:
        b = b.to(torch.device("cuda"))
        want = call(plain, b)
        torch.testing.assert_close(call(loaded, b), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    b = BATCHES[0].to(torch.device("cuda"))
    kjt = b.sparse_features
    torch.save({"dense": b.dense_features, "values": kjt.values(), "lengths": kjt.lengths().int(),
                "want": call(loaded, b)}, tmp_path / "batch.pt")
    lines = run_without_afmrec("""
        import ctypes, os  # as afmrec.pipeline.export.share_libstdcxx
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_NOLOAD | ctypes.RTLD_GLOBAL)
        d = torch.load(sys.argv[1] + "/batch.pt")
        m = torch._inductor.aoti_load_package(sys.argv[1] + "/m.pt2")
        with torch.no_grad():
            print((m(d["dense"], d["values"], d["lengths"]) - d["want"]).abs().max().item())
    """, tmp_path)
    assert float(lines[-1]) == 0.0


def test_training_from_pinned_host_batches_equals_training_from_device_batches():
    """``train_`` copies host batches to the GPU one step ahead on a side stream
    (``prefetched``): the trained weights are those of the same steps over batches
    already on the device."""
    from afmrec.pipeline.evaluate import prefetched
    from afmrec.pipeline.train import TrainConfig, train_

    config = tiny_config("dcn", embedding_dim=8)
    host = [random_batch(256, 3, seed=s).pin_memory() for s in range(6)]
    device = torch.device("cuda")
    assert all(b.dense_features.is_cuda and b.sparse_features.values().is_cuda
               for b in prefetched(host, device))
    states = []
    for batches in (host, [b.to(device) for b in host]):
        torch.manual_seed(0)
        model = build_model(config, device)
        train_(model, batches, TrainConfig(epochs=2), progress=False)
        states.append(model.state_dict())
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=1e-5, atol=1e-6, msg=name)
