"""Exactness of the factorisation: full rank reproduces the model, truncation error is
the dropped eigenvalues, fusion is exact, SVD is the truncated SVD of the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from afmrec.models import FusedDeepFMSparseArch, LowRankEmbeddingBagCollection, LowRankLinear
from afmrec.pipeline.bases import afm_bases, spectra, weight_svd_bases
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.compress import CompressConfig, compress_
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.stats import collect_statistics

from .conftest import random_batch, tiny_config

BATCHES = [random_batch(64, 3, seed=s) for s in range(4)]


def logits(model, batches=BATCHES):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b.dense_features, b.sparse_features) for b in batches])


def full_rank_bases(model):
    blocks = find_blocks(model)
    stats = collect_statistics(model, blocks, BATCHES)
    return afm_bases(spectra(stats), {b.name: b.out_features for b in blocks})


@pytest.mark.parametrize("fuse", [False, True])
def test_full_rank_reproduces_logits(tiny_model, fuse):
    before = logits(tiny_model)
    bases = full_rank_bases(tiny_model)
    compress_(tiny_model, bases, CompressConfig(fuse=fuse))
    assert isinstance(tiny_model.sparse_arch, FusedDeepFMSparseArch) == (
        fuse and type(tiny_model).__name__ == "DeepFM"
    )
    assert any(isinstance(m, LowRankLinear) for m in tiny_model.modules())
    assert any(isinstance(m, LowRankEmbeddingBagCollection) for m in tiny_model.modules())
    assert (logits(tiny_model) - before).abs().max().item() <= 1e-4


def test_full_rank_with_fusion_is_exact_for_deepfm():
    torch.manual_seed(0)
    from afmrec.models import build_model

    for num_dense in (0, 3):
        model = build_model(tiny_config("deepfm", num_dense))
        batches = [random_batch(64, num_dense, seed=s) for s in range(4)]
        before = logits(model, batches)
        blocks = [b for b in find_blocks(model) if b.kind == "table"]
        stats = collect_statistics(model, blocks, batches)
        # Ranks below D: the projection is not invertible, fusion must still be exact
        # with respect to the (unfused) low-rank model.
        bases = afm_bases(spectra(stats), {b.name: 2 for b in blocks})
        unfused = compress_(copy.deepcopy(model), bases, CompressConfig(fuse=False))
        fused = compress_(model, bases, CompressConfig(fuse=True))
        assert isinstance(fused.sparse_arch, FusedDeepFMSparseArch)
        first = fused.deep_arch[0]._mlp[0]._linear
        assert first.in_features == (4 if num_dense else 0) + 3 * 2 + 3
        diff = (logits(fused, batches) - logits(unfused, batches)).abs().max().item()
        assert diff <= 1e-5
        assert (logits(unfused, batches) - before).abs().max().item() > 1e-3


def test_reconstruction_error_equals_dropped_eigenvalues():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    x = torch.randn(500, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    from afmrec.pipeline.stats import Moments
    from afmrec.pipeline.bases import pca

    m = Moments.zeros(9)
    m.update_(lin(x).detach())
    spec = pca(m)
    for k in (1, 3, 6, 9):
        u = spec.eigenvectors[:, :k]
        lr = LowRankLinear.from_linear(lin, u, spec.mean)
        with torch.no_grad():
            mse = ((lr(x) - lin(x)) ** 2).sum(1).mean().item()
        dropped = spec.eigenvalues[k:].sum().item()
        assert mse == pytest.approx(dropped, rel=1e-6, abs=1e-9)


def test_table_reconstruction_error_equals_dropped_eigenvalues():
    """Same identity for a table: pooled outputs of multi-hot bags (empty bags excluded)."""
    torch.manual_seed(0)
    from afmrec.models import build_model

    model = build_model(tiny_config("dlrm"))
    ebc = model.sparse_arch.embedding_bag_collection
    blocks = [b for b in find_blocks(model) if b.name.endswith(".t1")]
    spec = spectra(collect_statistics(model, blocks, BATCHES))[blocks[0].name]
    k = 2
    bases = afm_bases({blocks[0].name: spec}, {blocks[0].name: k})
    lowrank = LowRankEmbeddingBagCollection.from_embedding_bag_collection(
        ebc, {"t1": bases.bases[blocks[0].name].components}, {"t1": spec.mean}
    )
    errs = []
    for b in BATCHES:
        kjt = b.sparse_features
        nonempty = kjt["t1"].lengths() > 0
        with torch.no_grad():
            y, y_hat = ebc(kjt)["t1"], lowrank(kjt)["t1"]
        assert torch.equal(y_hat[~nonempty], torch.zeros_like(y_hat[~nonempty]))
        errs.append(((y - y_hat)[nonempty].double() ** 2).sum(1))
    mse = torch.cat(errs).mean().item()
    assert mse == pytest.approx(spec.eigenvalues[k:].sum().item(), rel=1e-5)


def test_weight_svd_is_truncated_svd_of_weights():
    torch.manual_seed(0)
    lin = nn.Linear(10, 7)
    from afmrec.pipeline.blocks import Block

    block = Block("l", "linear", "l", 10, 7)
    model = nn.Module()
    model.l = lin
    bases = weight_svd_bases(model, [block], {"l": 3})
    lr = LowRankLinear.from_linear(lin, bases.bases["l"].components, bases.bases["l"].center)
    u, s, vh = torch.linalg.svd(lin.weight.detach().double())
    w3 = (u[:, :3] * s[:3]) @ vh[:3]
    w_lr = lr.second.weight.double() @ lr.first.weight.double()
    assert torch.allclose(w_lr, w3, atol=1e-5)
    x = torch.randn(5, 10)
    expected = x.double() @ w3.T + lin.bias.double()
    assert torch.allclose(lr(x).double(), expected, atol=1e-5)


def test_activation_between_factors():
    torch.manual_seed(0)
    from afmrec.models import build_model

    model = build_model(tiny_config("dlrm"))
    bases = full_rank_bases(model)
    compress_(model, bases, CompressConfig(activation="relu"))
    acts = [m.activation for m in model.modules() if isinstance(m, LowRankLinear)]
    assert acts and all(isinstance(a, nn.ReLU) for a in acts)


def test_unknown_block_is_an_error():
    torch.manual_seed(0)
    from afmrec.models import build_model
    from afmrec.pipeline.bases import Basis, Bases

    model = build_model(tiny_config("dlrm"))
    with pytest.raises(InputError, match="no_such_block"):
        compress_(model, Bases({"no_such_block": Basis(torch.eye(4), torch.zeros(4))}))
    name = next(b.name for b in find_blocks(model) if b.kind == "table")
    with pytest.raises(InputError, match="does not fit"):
        compress_(model, Bases({name: Basis(torch.eye(5), torch.zeros(5))}))
