"""The serving artifact: it reproduces the model, loads in a process where afmrec cannot be
imported, and the CLI writes it safely."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from afmrec.launch.cli import main
from afmrec.models import build_model
from afmrec.pipeline.bases import afm_bases, spectra
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.compress import CompressConfig, compress_
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.export import (
    ExportConfig,
    ServingModule,
    call,
    example_batch,
    export_model,
    load_artifact,
    read_metadata,
    serving_module,
)
from afmrec.pipeline.model_io import ModelRecord, save_model
from afmrec.pipeline.stats import collect_statistics

from .conftest import TABLES, random_batch, run_without_afmrec, tiny_config, with_table_ranks

D = 8  # FBGEMM's inference kernels want rows of a multiple of 4 bytes (int4: 8 values)
BATCHES = [random_batch(64, 3, seed=s) for s in range(3)]


def compressed(arch: str, tables=TABLES, dim: int = D, table_rank: int = 4,
               table_ranks: dict[str, int] | None = None) -> tuple[torch.nn.Module, ModelRecord]:
    """A tiny model with every table at ``table_rank`` (or table name -> rank as
    ``table_ranks`` gives, tables absent from it left whole) and every Linear at half rank."""
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config(arch, embedding_dim=dim), tables=tables)
    model = build_model(config).eval()
    blocks = find_blocks(model)
    ranks = {b.name: table_rank if b.kind == "table" else max(1, b.out_features // 2) for b in blocks}
    if table_ranks is not None:
        ranks = with_table_ranks(ranks, table_ranks)
    bases = afm_bases(spectra(collect_statistics(model, blocks, BATCHES)), ranks)
    compress_(model, bases, CompressConfig())
    return model.eval(), ModelRecord(config, ranks=ranks, compress=CompressConfig(), method="afm")


def model_and_record(arch: str, afm: bool) -> tuple[torch.nn.Module, ModelRecord]:
    """A tiny model of ``arch``: :func:`compressed`, or the original (seed 0)."""
    if afm:
        return compressed(arch)
    torch.manual_seed(0)
    config = tiny_config(arch, embedding_dim=D)
    return build_model(config).eval(), ModelRecord(config)


def eager_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(batch.dense_features, batch.sparse_features).squeeze(1)


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
def test_fp32_artifact_reproduces_the_model(arch, tmp_path):
    model, record = compressed(arch)
    meta = export_model(model, record.model, tmp_path / "m.pt")
    loaded, read = load_artifact(tmp_path / "m.pt")
    assert read == {k: v for k, v in meta.items() if k != "check_max_abs_diff"}
    assert read["features"] == ["t0", "t1", "t2"] and read["num_dense"] == 3
    assert read["params"] == sum(p.numel() for p in model.parameters())
    assert (read["cross"], read["lookup"]) == ("plain", "fbgemm")  # TorchScript holds no Triton kernel
    batch = random_batch(128, 3, seed=7, max_bag=4)
    torch.testing.assert_close(call(loaded, batch), eager_logits(model, batch), rtol=1e-5, atol=1e-5)
    assert meta["check_max_abs_diff"] <= 1e-5


def test_quantised_tables_stay_close_and_shrink_the_file(tmp_path):
    tables = tuple(dataclasses.replace(t, num_embeddings=4000) for t in TABLES)
    model, record = compressed("dlrm", tables, dim=32, table_rank=16)
    batch = random_batch(256, 3, seed=3, tables=tables)
    want = eager_logits(model, batch)
    sizes, errors = {}, {}
    for tables in ("fp32", "fp16", "int8", "int4"):
        path = tmp_path / f"{tables}.pt"
        export_model(model, record.model, path, ExportConfig(tables=tables))
        loaded, meta = load_artifact(path)
        assert meta["tables"] == tables
        # the file serves what the eager serving module computes, bit for bit
        torch.testing.assert_close(call(loaded, batch), call(serving_module(model, meta["features"], tables), batch),
                                   rtol=0, atol=0)
        errors[tables] = (call(loaded, batch) - want).abs().max().item()
        sizes[tables] = path.stat().st_size
    assert errors["fp32"] <= 1e-5
    assert errors["fp32"] <= errors["fp16"] <= errors["int8"] <= errors["int4"] < 0.1
    assert errors["int8"] > 0  # it really is quantised
    # 12,000 rows of 16 values (64 bytes in fp32). FBGEMM pads rows (int8/int4 ones with
    # their scale and bias) to 16 bytes: at rank 4 int8 would save nothing.
    assert sizes["int4"] < sizes["int8"] <= sizes["fp16"] < sizes["fp32"]


def test_artifact_loads_without_afmrec(tmp_path):
    """A server has torch and torchrec, not this project: block `import afmrec` and load."""
    batch = random_batch(64, 3, seed=11)
    for arch in ("dlrm", "dcn", "deepfm"):
        model, record = compressed(arch)
        export_model(model, record.model, tmp_path / f"{arch}.pt", ExportConfig(tables="int8"))
        torch.save(call(serving_module(model, [t.name for t in record.model.tables], "int8"), batch),
                   tmp_path / f"{arch}.want")
    kjt = batch.sparse_features
    torch.save({"dense": batch.dense_features, "values": kjt.values(), "lengths": kjt.lengths().int()},
               tmp_path / "batch.pt")
    lines = run_without_afmrec("""
        d = sys.argv[1]
        b = torch.load(d + "/batch.pt")
        for arch in ("dlrm", "dcn", "deepfm"):
            m = torch.jit.load(f"{d}/{arch}.pt")
            with torch.no_grad():
                got = m(b["dense"], b["values"], b["lengths"])
            want = torch.load(f"{d}/{arch}.want")
            print(arch, (got - want).abs().max().item())
    """, tmp_path)
    diffs = dict(line.split() for line in lines)
    assert sorted(diffs) == ["dcn", "deepfm", "dlrm"]
    assert all(float(v) == 0.0 for v in diffs.values()), diffs


def test_example_batch_fits_the_schema():
    config = tiny_config("dlrm", embedding_dim=D)
    batch = example_batch(config, 50, seed=1)
    kjt = batch.sparse_features
    assert kjt.keys() == ["t0", "t1", "t2"] and batch.dense_features.shape == (50, 3)
    assert kjt.lengths().shape == (150,) and 0 < kjt.lengths().sum() == kjt.values().numel()
    for t, jt in zip(config.tables, kjt.split([1, 1, 1])):
        assert int(jt.values().max()) < t.num_embeddings


def test_cli_exports_a_saved_model(tmp_path, capsys):
    model, record = compressed("deepfm")
    save_model(model, record, tmp_path / "afm")
    out = tmp_path / "afm.pt"
    args = ["export", "--model", str(tmp_path / "afm"), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--tables", "int8"]) == 0
    meta = read_metadata(out)
    assert meta["tables"] == "int8" and meta["source"]["ranks"] == record.ranks
    assert meta["arch"] == "deepfm" and meta["params"] == sum(p.numel() for p in model.parameters())
    first = out.read_bytes()
    assert main(args) == 2  # exists: refused, file unchanged
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == first
    assert main([*args, "--overwrite"]) == 0 and read_metadata(out)["tables"] == "fp32"
    assert main(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "afm"), "--out", str(tmp_path / "afm" / "x.pt")]) == 2
    assert not (tmp_path / "x.pt").exists()


def test_bad_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="tables must be one of"):
        ExportConfig(tables="int2")
    (tmp_path / "junk.pt").write_text("not a zip")
    with pytest.raises(InputError, match="not a TorchScript file"):
        read_metadata(tmp_path / "junk.pt")
    assert json.dumps(ExportConfig().__dict__)


@pytest.mark.parametrize("ranks, columns", [((4, 4, 4), 8), ((4, 8, 8), 16), ((None, 12, 12), 16)],
                         ids=["uniform", "mixed", "unprojected"])
def test_fused_projections_are_exact_with_empty_bags(ranks, columns):
    """One batched GEMM over the codes read in place plus the non-empty column gives what
    the grouped projections give, float and quantised. Mixed ranks are padded to the
    largest where that costs at most ``max_padding`` of the code entries, else left as
    they are; an unprojected table of at most K rows becomes an identity code table, one
    of more rows leaves the collection as it is."""
    from torchrec.inference.modules import quantize_embeddings

    from afmrec.models import LowRankEmbeddingBagCollection, table_configs

    torch.manual_seed(0)
    configs = table_configs(tiny_config("dlrm", embedding_dim=16))
    kjt = random_batch(200, 3, seed=5).sparse_features
    assert int((kjt.lengths() == 0).sum()) > 0
    partial = LowRankEmbeddingBagCollection(configs, {"t0": 4, "t2": 8})
    assert not partial.fuse_projections_() and "serving_weight" not in dict(partial.named_buffers())
    given = {t: r for t, r in zip(["t0", "t1", "t2"], ranks) if r is not None}
    lowrank = LowRankEmbeddingBagCollection(configs, given)
    for p in lowrank.parameters():
        torch.nn.init.normal_(p)
    # padding t0 (10 rows) from 4 to 8 columns adds 40 to 560 code entries: 7%, over 1%
    padding = 0.1 if ranks == (4, 8, 8) else 0.0
    with torch.no_grad():
        want = lowrank(kjt)
        if padding:
            assert not lowrank.fuse_projections_() and not lowrank.serving
        assert lowrank.fuse_projections_(max_padding=padding)
        assert {c.embedding_dim for c in lowrank.codes.embedding_bag_configs()} == {max(given.values())}
        assert lowrank.serving_weight.shape == (3, columns, 16)  # K + 1 columns, padded to 8s
        assert lowrank.ranks == given  # the trained projections
        got = lowrank(kjt)
        quantised = quantize_embeddings(lowrank, dtype=torch.float32, inplace=False)(kjt)
    assert got.keys() == want.keys() == ["t0", "t1", "t2"]
    torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(quantised.values(), want.values(), rtol=1e-5, atol=1e-5)


def test_writing_an_artifact_leaves_no_cycle_holding_the_tables(tmp_path):
    """Scripting leaves reference cycles; on a GPU nothing else would collect them and
    the tables of every exported variant stayed on the device (the speed benchmark ran
    out of memory)."""
    import gc
    import weakref

    from afmrec.pipeline.export import write_artifact

    model, record = compressed("dcn")
    served = serving_module(model, [t.name for t in record.model.tables])
    call(served, example_batch(record.model, 16))
    alive = weakref.ref(served)
    gc.disable()
    try:
        write_artifact(served, record.model, tmp_path / "m.pt", check_batch=16)
        del served
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("afm", [False, True], ids=["original", "afm"])
def test_dcn_serving_form_assembles_the_cross_input_in_place(afm, tmp_path):
    """DLRM-DCNv2 serves through DCNServing: the dense row and the fields are written into
    one buffer (the AFM fields by their batched projection GEMM) and the logits are the
    model's, eager and exported."""
    from afmrec.models.serving import DCNServing

    model, record = model_and_record("dcn", afm)
    batch = random_batch(96, 3, seed=11, max_bag=4)
    want = eager_logits(model, batch)
    served = serving_module(model, [t.name for t in record.model.tables])
    assert isinstance(served.model, DCNServing) and served.model.in_place == afm
    torch.testing.assert_close(call(served, batch), want, rtol=1e-6, atol=1e-6)
    export_model(model, record.model, tmp_path / "m.pt")
    torch.testing.assert_close(call(load_artifact(tmp_path / "m.pt")[0], batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("table_ranks", [{"t0": 4, "t2": 12}, {"t0": 4}], ids=["two-ranks", "whole-run"])
def test_dcn_with_tables_of_different_ranks_writes_its_fields_in_place(table_ranks, tmp_path):
    """Tables of different ranks and whole tables (the default plan's kind: the projections
    cannot be one batched GEMM) still write their fields straight into the cross input:
    one batched GEMM per rank, one copy per run of whole tables. The logits are the
    model's, eager, exported and lowered for AOTInductor."""
    from afmrec.models import LowRankEmbeddingBagCollection
    from afmrec.models.serving import DCNServing
    from afmrec.pipeline.export import exported_program

    model, record = compressed("dcn", dim=16, table_ranks=table_ranks)
    ebc = model.sparse_arch.embedding_bag_collection
    assert isinstance(ebc, LowRankEmbeddingBagCollection) and ebc.ranks == table_ranks
    batch = random_batch(96, 3, seed=11, max_bag=4)
    want = eager_logits(model, batch)
    features, rows = [t.name for t in record.model.tables], [t.num_embeddings for t in record.model.tables]
    served = serving_module(model, features, rows=rows)
    assert isinstance(served.model, DCNServing) and served.model.in_place
    assert not served.model.embedding_bag_collection.serving  # fields written by _write_fields
    torch.testing.assert_close(call(served, batch), want, rtol=1e-6, atol=1e-6)
    program = exported_program(served, record.model).run_decompositions()
    kjt = batch.sparse_features
    with torch.no_grad():
        got = program.module()(batch.dense_features, kjt.values(), kjt.lengths().int())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    export_model(model, record.model, tmp_path / "m.pt")
    torch.testing.assert_close(call(load_artifact(tmp_path / "m.pt")[0], batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
@pytest.mark.parametrize("afm", [False, True], ids=["original", "afm"])
def test_serving_form_fuses_every_relu_into_its_gemm(arch, afm, tmp_path):
    """Every Linear -> ReLU of the MLPs (a low-rank pair's too) serves as one GEMM with the
    ReLU in its epilogue; the logits are the model's, eager and exported."""
    from torchrec.modules.mlp import Perceptron

    from afmrec.models.serving import LinearReLU

    model, record = model_and_record(arch, afm)
    relus = sum(isinstance(m, Perceptron) and m._activation_fn is torch.relu for m in model.modules())
    assert relus >= 3
    batch = random_batch(96, 3, seed=11, max_bag=4)
    want = eager_logits(model, batch)
    served = serving_module(model, [t.name for t in record.model.tables])
    assert not any(isinstance(m, Perceptron) for m in served.modules())
    fused = [m for m in served.modules() if isinstance(m, LinearReLU)]
    assert len(fused) == relus
    assert any(isinstance(m.pre, nn.Sequential) for m in fused) == afm  # low-rank pairs
    torch.testing.assert_close(call(served, batch), want, rtol=1e-6, atol=1e-6)
    export_model(model, record.model, tmp_path / "m.pt")
    torch.testing.assert_close(call(load_artifact(tmp_path / "m.pt")[0], batch), want, rtol=1e-5, atol=1e-5)


def test_clamped_ids_read_row_zero_of_their_own_feature():
    """The AOTInductor format's id check: an id outside its own feature's table (each
    feature's ids found by position, features without ids in between) becomes 0."""
    served = ServingModule(torch.nn.Linear(2, 1), ["a", "b", "c"], rows=[5, 3, 10])
    lengths = torch.tensor([2, 1, 0, 0, 3, 1], dtype=torch.int32)  # a: 3 ids, b: none, c: 4
    values = torch.tensor([4, 5, -1, 9, 10, 3, 0])
    assert served.clamped(values, lengths).tolist() == [4, 0, 0, 9, 0, 3, 0]
    assert served.clamped(values[:0], torch.zeros(6, dtype=torch.int32)).numel() == 0


@pytest.mark.parametrize("arch", ["dlrm", "dcn", "deepfm"])
@pytest.mark.parametrize("afm", [False, True], ids=["original", "afm"])
def test_exported_forward_reads_nothing_back_to_the_host(arch, afm):
    """Each collection of one kernel serves as a FlatLookup: the exported forward has no
    host read (TorchRec's split reads every feature's id count, one sync per feature in an
    exported graph), and the logits are the model's."""
    from torchrec.inference.modules import quantize_embeddings

    from afmrec.models.serving import FlatLookup, serving_form
    from afmrec.pipeline.export import exported_program

    model, record = model_and_record(arch, afm)
    features, rows = [t.name for t in record.model.tables], [t.num_embeddings for t in record.model.tables]
    batch = random_batch(96, 3, seed=11, max_bag=4)
    want = eager_logits(model, batch)
    served = serving_module(model, features, rows=rows)
    assert sum(isinstance(m, FlatLookup) for m in served.modules()) == 1
    torch.testing.assert_close(call(served, batch), want, rtol=1e-6, atol=1e-6)

    def host_reads(module: ServingModule) -> int:
        graph = exported_program(module, record.model).graph
        return sum(n.target in (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)
                   for n in graph.nodes)

    assert host_reads(served) == 0
    split = quantize_embeddings(copy.deepcopy(model), dtype=torch.float32, inplace=True)  # TorchRec's forward
    assert host_reads(ServingModule(serving_form(split), features, rows=rows).eval()) == len(features)


def mixed_quantised_collection(dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    """A quantised collection of three tables of two widths, one shared by two features
    (FBGEMM's feature-to-table map), as ``serving_module`` makes them."""
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(device=torch.device(device), tables=[
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=50, feature_names=["fa"]),
        EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=7, feature_names=["fb", "fc"]),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=300, feature_names=["fd"])])
    for p in ebc.parameters():
        nn.init.normal_(p)
    return quantize_embeddings(nn.Sequential(ebc), dtype=dtype, inplace=True)[0]


def lookup_input(device: str = "cpu"):
    """A KJT of :func:`mixed_quantised_collection`'s features with empty bags and ids
    outside their tables."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 4, (4 * 9,), generator=g)
    kjt = KeyedJaggedTensor(keys=["fa", "fb", "fc", "fd"], lengths=lengths,
                            values=torch.randint(0, 60, (int(lengths.sum()),), generator=g))
    assert (kjt.values() >= 50).any() and (lengths == 0).any()
    return kjt.to(torch.device(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.qint8, torch.quint4x2])
def test_lookup_kernels_function_pools_fbgemms_own_rows(dtype):
    """FlatLookup's kernel form reads FBGEMM's packed rows where they lie (fp32, fp16, int8:
    a float16 scale and bias, then bytes; int4 has none) and pools exactly what FBGEMM's
    kernel pools: shared tables, two widths, empty bags, and ids outside their table (row
    0, as FBGEMM's bounds check makes them) included. On the CPU the kernel's function is
    its PyTorch reference; tests/test_cuda.py runs the kernel."""
    from afmrec.models.kernels.lookup import ROW_KINDS
    from afmrec.models.serving import FlatLookup, use_kernels_

    lookup = FlatLookup(mixed_quantised_collection(dtype))
    kjt = lookup_input()
    if dtype == torch.quint4x2:
        assert not lookup.has_kernel
        return
    row_format = {torch.float32: "fp32", torch.float16: "fp16", torch.qint8: "int8"}[dtype]
    assert lookup.kernel_spec == {"kind": ROW_KINDS[row_format], "align": {"fp32": 4, "fp16": 8, "int8": 16}[row_format],  # 16 bytes
                                  "full": False, "total_dim": 48, "max_dim": 16}
    # feature by feature: row0 and stride in elements (int8: bytes), rows, dim, column
    stride8, stride16 = {"fp32": (8, 16), "fp16": (8, 16), "int8": (16, 32)}[row_format]
    assert lookup.kernel_tables[1:].tolist() == [
        [stride8, stride16, stride16, stride8], [50, 7, 7, 300], [8, 16, 16, 8], [0, 8, 24, 40]]
    rows = lookup.kernel_tables[0].tolist()
    assert rows[1] == rows[2] and rows[0] + 50 * stride8 <= rows[1] and rows[1] + 7 * stride16 <= rows[3]
    want = lookup(kjt).values()
    assert use_kernels_(lookup, True) == {"cross": "plain", "lookup": "fbgemm"}
    assert not lookup.use_kernel  # Triton's kernel serves on CUDA only
    lookup.use_kernel = True
    torch.testing.assert_close(lookup(kjt).values(), want, rtol=0, atol=0)


@pytest.mark.reliability
def test_an_afm_dlrm_lowers_for_aotinductor():
    """AOTInductor first lowers the exported program (decompositions, functionalisation):
    an AFM DLRM's failed there ("Cannot view a tensor with shape (B, 3, 8) and strides
    (8, 8 B, 1) as a tensor with shape (B, 24)"; `export --format aoti --device cpu`
    crashed), while the original's lowered. Its projections' GEMM wrote through a
    transposed ``out=`` view, which torch.export replays on the buffer's strides."""
    from afmrec.pipeline.export import exported_program

    model, record = model_and_record("dlrm", afm=True)
    features, rows = [t.name for t in record.model.tables], [t.num_embeddings for t in record.model.tables]
    served = serving_module(model, features, rows=rows)
    program = exported_program(served, record.model).run_decompositions()
    batch = random_batch(64, 3, seed=5, max_bag=3)
    kjt = batch.sparse_features
    with torch.no_grad():
        got = program.module()(batch.dense_features, kjt.values(), kjt.lengths().int())
    torch.testing.assert_close(got, call(served, batch), rtol=1e-6, atol=1e-6)


@pytest.mark.reliability
def test_a_damaged_artifact_fails_its_crc_when_afmrec_loads_it(tmp_path):
    """torch writes a CRC-32 per record of the artifact's archive but does not check it:
    a changed byte inside a weight loaded. afmrec's loader checks every record."""
    model, record = compressed("dlrm")
    path = tmp_path / "afm.pt"
    export_model(model, record.model, path, ExportConfig(check_batch=0))
    load_artifact(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"afm.pt: damaged \(its record .* (fails its CRC-32|cannot be decompressed)\)"):
        load_artifact(path)


@pytest.mark.reliability
@pytest.mark.parametrize("compression", ["stored", "deflated"])
def test_check_artifact_names_the_damaged_record(tmp_path, compression):
    """A flipped byte in a record's data is found whether the record is stored (its CRC-32
    differs) or deflated (it no longer inflates, or inflates to a wrong CRC-32)."""
    import zipfile

    from afmrec.pipeline.export import check_artifact

    path = tmp_path / "a.pt"
    method = zipfile.ZIP_STORED if compression == "stored" else zipfile.ZIP_DEFLATED
    payload = bytes(range(256)) * 64
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr("a/constants.pkl", b"header")
        z.writestr("a/data/0", payload)
    check_artifact(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"a/data/0") + len("a/data/0")  # the local header's name, then the data
    data[start + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"a.pt: damaged \(its record a/data/0 (fails its CRC-32|cannot be decompressed)\)"):
        check_artifact(path)
