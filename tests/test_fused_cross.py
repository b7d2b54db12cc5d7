"""An AFM DLRM-DCNv2's cross network served from its codes (``afmrec.models.fused_cross``)
and the AOTInductor artifact that carries it. On the CPU the fused network runs its
PyTorch reference (the unrolled algebra, folded weights and all); its Triton kernel is
tested on a GPU (tests/test_cuda.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import build_model
from afmrec.models.kernels.cross import CodeLayout, cross_update_reference, interaction
from afmrec.models.fused_cross import FusedCrossNet, X0CrossNet, interaction_map, unfusable_reason
from afmrec.models.serving import DCNServing, cross_fusion_blocker, use_kernels_
from afmrec.pipeline.bases import afm_bases, spectra
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.compress import CompressConfig, compress_
from afmrec.launch.cli import main
from afmrec.pipeline.export import (
    ExportConfig,
    call,
    example_batch,
    export_model,
    load_artifact,
    read_metadata,
    serving_module,
)
from afmrec.pipeline.model_io import ModelRecord, save_model
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.stats import collect_statistics

from .conftest import random_batch, run_without_afmrec, tiny_config, with_table_ranks

BATCHES = [random_batch(64, 3, seed=s, max_bag=4) for s in range(3)]


MIXED = {"t0": 4, "t2": 8}
"""Table ranks of the default plan's kind: two ranks, a table (t1) left whole."""


def afm_dcn(dim: int = 16, layers: int = 3, compressed: bool = True, device: str = "cpu",
            table_ranks: dict[str, int] | None = None):
    """A DLRM-DCNv2 whose every cross layer, over-arch layer and table AFM compresses 4x
    (ranks k = out / 4; or the tables at ``table_ranks``, those absent whole), with bases
    from its own statistics."""
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config("dcn", embedding_dim=dim), dense_arch=(16, dim),
                                 over_arch=(32, 8, 1), dcn_num_layers=layers, dcn_low_rank_dim=32)
    model = build_model(config, torch.device(device)).eval()
    blocks = find_blocks(model)
    ranks = {b.name: 4 if b.kind == "table" else max(1, b.out_features // 4) for b in blocks}
    if table_ranks is not None:
        ranks = with_table_ranks(ranks, table_ranks)
    if compressed:
        batches = [b.to(torch.device(device)) for b in BATCHES]
        compress_(model, afm_bases(spectra(collect_statistics(model, blocks, batches)), ranks), CompressConfig())
    return model.eval(), config, ranks


def test_the_fused_cross_network_serves_the_models_logits():
    """Served from the codes (x_l = x_0 * (1 + y_1 + .. + y_l), x_0 never formed as the
    model forms it), the logits are the plain serving form's and the model's to float32
    rounding, on batches with empty bags."""
    model, config, _ = afm_dcn()
    features = [t.name for t in config.tables]
    plain, fused = serving_module(model, features), serving_module(model, features, fuse_cross=True)
    assert isinstance(fused.model, DCNServing) and isinstance(fused.model.fused, FusedCrossNet)
    assert plain.model.fused is None
    # three layers, each an update of depth k = 8; the first's w straight from the
    # 16 + 3 * 4 + 3 = 31 wide [dense; codes; nonempty], the others' after a down (N -> k)
    net = fused.model.fused
    assert [u.shape for u in net.ups] == [(8, 64)] * 3
    assert [d.out_features for d in net.downs] == [8] * 2
    assert [p.shape for p in (net.first.dense_t, net.first.codes_t, net.first.nonempty_t)] == [(16, 8), (12, 8), (3, 8)]
    for batch in BATCHES:
        want = call(plain, batch)
        assert (batch.sparse_features.lengths() == 0).any()
        torch.testing.assert_close(call(fused, batch), want, rtol=2e-5, atol=2e-6)
        with torch.no_grad():
            model_logits = model(batch.dense_features, batch.sparse_features).squeeze(1)
        torch.testing.assert_close(call(fused, batch), model_logits, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("carry", [False, True])
def test_an_update_is_the_cross_layer_written_out(carry):
    """One update against the layer written out in float64: x_0 from the codes, then
    x = x_0 * (beta + w Q^T) [+ x_prev]."""
    g = torch.Generator().manual_seed(3)
    batch, fields, k, dim, r = 9, 3, 5, 16, 7
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    n = (fields + 1) * dim
    dense, codes, w, prev = rand(batch, dim), rand(batch, fields * k), rand(batch, r), rand(batch, n)
    nonempty = (torch.rand(batch, fields, generator=g) > 0.3).double()
    code_weight = torch.cat([rand(fields, k + 1, dim), torch.zeros(fields, 2, dim, dtype=torch.float64)], 1)
    up_t, beta = rand(r, n), rand(n)
    x0 = torch.cat([dense] + [codes[:, f * k:(f + 1) * k] @ code_weight[f, :k] + nonempty[:, f:f + 1] * code_weight[f, k]
                              for f in range(fields)], 1)
    torch.testing.assert_close(interaction(dense, codes, nonempty, code_weight), x0)
    got = cross_update_reference(dense, codes, nonempty, code_weight, w, up_t, beta, prev if carry else None)
    torch.testing.assert_close(got, x0 * (beta + w @ up_t) + (prev if carry else 0), rtol=1e-12, atol=1e-12)


def test_the_interaction_is_an_affine_map_of_dense_codes_and_nonempty():
    """x_0 = W u with u = [dense; codes; nonempty], exactly (float64), so the first
    layer's down factor folds into one map of u."""
    g = torch.Generator().manual_seed(5)
    batch, fields, k, dim = 6, 3, 5, 16
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    dense, codes = rand(batch, dim), rand(batch, fields * k)
    nonempty = torch.tensor([[1.0, 0.0, 1.0]] * 3 + [[0.0, 1.0, 1.0]] * 3, dtype=torch.float64)
    code_weight = torch.cat([rand(fields, k + 1, dim), torch.zeros(fields, 2, dim, dtype=torch.float64)], 1)
    w, b = interaction_map(code_weight, CodeLayout.uniform(fields, k))
    assert w.shape == ((fields + 1) * dim, dim + fields * k + fields) and not b.any()
    u = torch.cat([dense, codes, nonempty], 1)
    torch.testing.assert_close(u @ w.T, interaction(dense, codes, nonempty, code_weight), rtol=1e-12, atol=1e-12)


def test_a_mixed_layout_is_the_fields_written_out_and_an_affine_map():
    """Codes of different widths and a whole table's row (width 0): x_0 is the dense row,
    then ``[c_f; nonempty_f] W_f`` or the row itself, and exactly (float64) W u."""
    g = torch.Generator().manual_seed(7)
    batch, dim = 6, 16
    layout = CodeLayout(((0, 5), (5, 0), (21, 3)), bias_row=5, codes_width=24)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    dense, codes, cw = rand(batch, dim), rand(batch, 24), rand(3, 8, dim)
    nonempty = torch.tensor([[1.0, 0.0, 1.0]] * 3 + [[0.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    x0 = torch.cat([dense, codes[:, :5] @ cw[0, :5] + nonempty[:, :1] * cw[0, 5], codes[:, 5:21],
                    codes[:, 21:24] @ cw[2, :3] + nonempty[:, 2:3] * cw[2, 5]], 1)
    torch.testing.assert_close(interaction(dense, codes, nonempty, cw, layout), x0, rtol=1e-12, atol=1e-12)
    w, b = interaction_map(cw, layout)
    assert w.shape == (4 * dim, dim + 24 + 3) and not b.any()
    torch.testing.assert_close(torch.cat([dense, codes, nonempty], 1) @ w.T, x0, rtol=1e-12, atol=1e-12)


def test_tables_of_different_ranks_and_whole_tables_are_served_from_their_codes(tmp_path):
    """The default plan's kind of model (two table ranks, a table left whole) is served from
    its codes too: the layout names each field's column and width, and the logits are
    the plain serving form's, eager and in the AOTInductor artifact."""
    model, config, _ = afm_dcn(table_ranks=MIXED)
    features = [t.name for t in config.tables]
    plain, fused = serving_module(model, features), serving_module(model, features, fuse_cross=True)
    net = fused.model.fused
    assert isinstance(net, FusedCrossNet) and not fused.model.embedding_bag_collection.serving
    # t0 rank 4 at column 0, t1 whole (16 wide) at 4, t2 rank 8 at 20; bias row 8
    assert net.layout == CodeLayout(((0, 4), (4, 0), (20, 8)), 8, 28)
    assert net.layout_tensor.tolist() == [[0, 4], [4, 0], [20, 8]]
    for batch in BATCHES:
        torch.testing.assert_close(call(fused, batch), call(plain, batch), rtol=2e-5, atol=2e-6)
    record = ModelRecord(config)
    meta = export_model(model, record.model, tmp_path / "m.pt2", ExportConfig(format="aoti", kernels="ours"))
    loaded, _ = load_artifact(tmp_path / "m.pt2")
    torch.testing.assert_close(call(loaded, BATCHES[0]), call(plain, BATCHES[0]), rtol=2e-5, atol=2e-6)
    assert meta["check_max_abs_diff"] <= 1e-5


def test_models_the_fused_network_cannot_serve_from_codes_say_why_and_fuse_from_x0():
    """The original (full-width tables) and a narrow AFM model cannot be served from their
    codes (each says why); their cross layers are fused from the interaction in memory
    instead (X0CrossNet), with the plain form's logits."""
    original, config, _ = afm_dcn(compressed=False)
    features = [t.name for t in config.tables]
    assert "not low-rank tables" in unfusable_reason(original.sparse_arch.embedding_bag_collection,
                                                      original.inter_arch.crossnet)
    assert cross_fusion_blocker(original) is None
    plain = serving_module(original, features)
    served = serving_module(original, features, fuse_cross=True)
    assert served.model.fused is None and isinstance(served.model.fused_x0, X0CrossNet)
    for b in BATCHES:
        torch.testing.assert_close(call(served, b), call(plain, b), rtol=1e-5, atol=1e-5)
    assert use_kernels_(served, False) == {"cross": "plain", "lookup": "fbgemm"}
    torch.testing.assert_close(call(served, BATCHES[0]), call(plain, BATCHES[0]), rtol=0, atol=0)
    narrow, _, _ = afm_dcn(dim=8)
    m = serving_module(narrow, features, fuse_cross=True).model
    assert m.fused is None
    assert "width 8" in unfusable_reason(m.embedding_bag_collection, m.crossnet)


def test_aoti_artifact_reproduces_the_model_and_clamps_bad_ids(tmp_path):
    """The AOTInductor package serves the TorchScript file's logits; an id outside its
    table reads row 0 in both (FBGEMM's bounds check in the one, plain ops in the other)."""
    model, config, _ = afm_dcn()
    features = [t.name for t in config.tables]
    meta = export_model(model, config, tmp_path / "m.pt2", ExportConfig(format="aoti", check_batch=64))
    export_model(model, config, tmp_path / "m.pt")
    assert meta["artifact"] == "aoti" and meta["cross"] == "plain"  # fused only on CUDA
    assert meta["check_max_abs_diff"] <= 1e-5
    assert read_metadata(tmp_path / "m.pt2") == {k: v for k, v in meta.items() if k != "check_max_abs_diff"}
    aoti, _ = load_artifact(tmp_path / "m.pt2")
    script, _ = load_artifact(tmp_path / "m.pt")
    for batch in BATCHES:
        torch.testing.assert_close(call(aoti, batch), call(script, batch), rtol=1e-6, atol=1e-6)
    kjt = BATCHES[0].sparse_features
    values, lengths = kjt.values().clone(), kjt.lengths().int()
    values[0], values[-1] = 10**6, -5  # the first id is t0's, the last t2's
    bad_row_zero = values.clone()
    bad_row_zero[0] = bad_row_zero[-1] = 0
    with torch.no_grad():
        got = aoti(BATCHES[0].dense_features, values, lengths)
        want = script(BATCHES[0].dense_features, bad_row_zero, lengths)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # batch sizes and id counts are dynamic down to 1 row and no id at all
    for rows, ids in ((1, 0), (1, 1), (5, None)):
        batch = example_batch(config, rows, seed=rows)
        if ids is not None:
            lengths = torch.zeros(len(config.tables), rows, dtype=torch.int32)
            lengths[1, 0] = ids
            batch = Batch(batch.dense_features, KeyedJaggedTensor.from_lengths_sync(
                features, torch.zeros(ids, dtype=torch.int64), lengths.flatten()), batch.labels)
        torch.testing.assert_close(call(aoti, batch), call(script, batch), rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="format must be one of"):
        ExportConfig(format="onnx")  # type: ignore[arg-type]


def test_cli_exports_an_aoti_package(tmp_path, capsys):
    model, config, ranks = afm_dcn()
    save_model(model, ModelRecord(config, ranks=ranks, compress=CompressConfig(), method="afm"), tmp_path / "afm")
    out = tmp_path / "afm.pt2"
    assert main(["export", "--model", str(tmp_path / "afm"), "--out", str(out), "--device", "cpu",
                 "--format", "aoti", "--tables", "int8"]) == 0
    meta = read_metadata(out)
    assert (meta["artifact"], meta["tables"], meta["cross"]) == ("aoti", "int8", "plain")
    loaded, _ = load_artifact(out)
    eager = serving_module(model, meta["features"], "int8")
    for batch in BATCHES:
        torch.testing.assert_close(call(loaded, batch), call(eager, batch), rtol=1e-6, atol=1e-6)
    # a server with torch and TorchRec, not afmrec, loads and calls it (by a name without .pt2)
    batch = BATCHES[0]
    kjt = batch.sparse_features
    torch.save({"dense": batch.dense_features, "values": kjt.values(), "lengths": kjt.lengths().int(),
                "want": call(eager, batch)}, tmp_path / "batch.pt")
    out.rename(tmp_path / "served.bin")
    lines = run_without_afmrec("""
        d = torch.load(sys.argv[1] + "/batch.pt")
        with open(sys.argv[1] + "/served.bin", "rb") as f:
            m = torch._inductor.aoti_load_package(f)
        with torch.no_grad():
            print((m(d["dense"], d["values"], d["lengths"]) - d["want"]).abs().max().item())
    """, tmp_path)
    assert float(lines[-1]) <= 1e-6
    assert main(["export", "--model", str(tmp_path / "afm"), "--out", str(out), "--format", "onnx"]) == 2
    assert "invalid choice" in capsys.readouterr().err
