"""DCN cross layers as ``nn.Linear`` blocks: the conversion from TorchRec's
``LowRankCrossNet`` is exact, the layers are found, factored and fused exactly, script,
and survive a save and reload.

The tiny DCN has 3 tables and a dense field of width D = 4, so the interaction width is
N = (3 + 1) * 4 = 16; 2 cross layers of rank r = 3.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM_DCN
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from afmrec.models import CrossNet, LowRankLinear, build_model, table_configs
from afmrec.pipeline.bases import afm_bases, spectra
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.compress import CompressConfig, compress_
from afmrec.pipeline.model_io import ModelRecord, load_model, save_model, skeleton
from afmrec.pipeline.stats import collect_statistics

from .conftest import tiny_config
from .test_compress import BATCHES, logits

N, R, LAYERS = 16, 3, 2
CROSS = "inter_arch.crossnet.layers"


def dcn_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_config("dcn"))


def cross_bases(model: nn.Module, down: int, **more: int):
    """AFM bases of every cross layer's ``down`` at rank ``down``, plus blocks named in
    ``more`` (block name -> rank)."""
    ranks = {f"{CROSS}.{l}.down": down for l in range(LAYERS)}
    ranks.update(more)
    blocks = [b for b in find_blocks(model) if b.name in ranks]
    return afm_bases(spectra(collect_statistics(model, blocks, BATCHES)), ranks)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the network -------------------------------------------------------------------------


def test_from_lowrank_crossnet_is_exact():
    torch.manual_seed(0)
    ref = LowRankCrossNet(in_features=12, num_layers=3, low_rank=4)
    with torch.no_grad():
        for b in ref.bias:  # TorchRec starts them at 0: make them count
            b.normal_()
    rng = torch.get_rng_state()
    net = CrossNet.from_lowrank_crossnet(ref)
    assert torch.equal(torch.get_rng_state(), rng)  # copying draws no random numbers
    for l, layer in enumerate(net.layers):
        assert torch.equal(layer.down.weight, ref.V_kernels[l]) and layer.down.bias is None
        assert torch.equal(layer.up.weight, ref.W_kernels[l])
        assert torch.equal(layer.up.bias, ref.bias[l])
    x = torch.randn(32, 12)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))


def test_fresh_crossnet_has_torchrec_initialisation():
    """Same seed, same weights as a fresh LowRankCrossNet (xavier-normal kernels, zero bias)."""
    torch.manual_seed(3)
    ref = LowRankCrossNet(in_features=12, num_layers=3, low_rank=4)
    torch.manual_seed(3)
    net = CrossNet(in_features=12, num_layers=3, low_rank=4)
    for l, layer in enumerate(net.layers):
        assert torch.equal(layer.down.weight, ref.V_kernels[l])
        assert torch.equal(layer.up.weight, ref.W_kernels[l])
        assert torch.equal(layer.up.bias, torch.zeros(12))


def test_built_dcn_equals_torchrec_dcn():
    """build_model swaps the cross network without touching the RNG stream: its logits
    are those of TorchRec's DLRM_DCN built under the same seed."""
    ref = torchrec_dcn(seed=0)
    model = dcn_model()
    assert isinstance(model.inter_arch.crossnet, CrossNet)
    assert torch.equal(logits(model), logits(ref))


def torchrec_dcn(seed: int) -> nn.Module:
    """TorchRec's own DLRM_DCN (LowRankCrossNet), what DCN models were before CrossNet."""
    cfg = tiny_config("dcn")
    torch.manual_seed(seed)
    return DLRM_DCN(
        embedding_bag_collection=EmbeddingBagCollection(tables=table_configs(cfg)),
        dense_in_features=cfg.num_dense,
        dense_arch_layer_sizes=list(cfg.dense_arch),
        over_arch_layer_sizes=list(cfg.over_arch),
        dcn_num_layers=cfg.dcn_num_layers,
        dcn_low_rank_dim=cfg.dcn_low_rank_dim,
    )


def test_checkpoints_written_before_crossnet_still_load(tmp_path):
    """A checkpoint holding LowRankCrossNet's V_kernels / W_kernels / bias loads into
    CrossNet's down / up layers (same shapes) and gives the same logits."""
    from afmrec.sharding.checkpoint import load_state_, save_state

    old = torchrec_dcn(seed=3)
    save_state(old, tmp_path / "ckpt")
    model = dcn_model()  # other weights (seed 0)
    assert not torch.equal(logits(model), logits(old))
    load_state_(model, tmp_path / "ckpt")
    assert torch.equal(logits(model), logits(old))


def test_cross_layers_are_blocks():
    model = dcn_model()
    blocks = {b.name: (b.kind, b.in_features, b.out_features) for b in find_blocks(model)}
    for l in range(LAYERS):
        assert blocks[f"{CROSS}.{l}.down"] == ("linear", N, R)
        # up's output already lies in an R-dim span; its N x N Gram would cost more than
        # the forward pass at production shape: not a block
        assert f"{CROSS}.{l}.up" not in blocks
    keys = set(model.state_dict())
    assert {f"{CROSS}.0.down.weight", f"{CROSS}.0.up.weight", f"{CROSS}.0.up.bias"} <= keys
    assert not any("kernels" in k for k in keys)


# --- factoring and fusion ----------------------------------------------------------------


def test_full_rank_reproduces_logits():
    model = dcn_model()
    before = logits(model)
    compress_(model, cross_bases(model, down=R))
    layer = model.inter_arch.crossnet.layers[0]
    assert type(layer.down) is nn.Linear and type(layer.up) is nn.Linear
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-5)


def test_lower_rank_down_fuses_into_up():
    """down at K = 2: the layer becomes Linear(16, 2) (with a bias) -> Linear(2, 16)."""
    model = dcn_model()
    before = n_params(model)
    compress_(model, cross_bases(model, down=2))
    for layer in model.inter_arch.crossnet.layers:
        assert type(layer.down) is nn.Linear and type(layer.up) is nn.Linear
        assert (layer.down.in_features, layer.down.out_features) == (16, 2)
        assert layer.down.bias is not None
        assert (layer.up.in_features, layer.up.out_features) == (2, 16)
    # per layer: 16*3 + 3*16 + 16 = 112 before; 16*2 + 2 + 2*16 + 16 = 82 after
    assert n_params(model) == before - LAYERS * (112 - 82)
    # and the rank planner counts exactly that saving (the down block owns up's weight)
    block = next(b for b in find_blocks(dcn_model()) if b.name == f"{CROSS}.0.down")
    assert block.fused_into == N and block.params - block.compressed_params(2) == 112 - 82


def test_fusion_does_not_change_logits():
    model = dcn_model()
    original = logits(model)
    bases = cross_bases(model, down=2)
    unfused = compress_(copy.deepcopy(model), bases, CompressConfig(fuse=False))
    fused = compress_(model, bases, CompressConfig(fuse=True))
    assert isinstance(unfused.inter_arch.crossnet.layers[0].down, LowRankLinear)
    layer = fused.inter_arch.crossnet.layers[0]
    assert type(layer.down) is nn.Linear
    assert (layer.up.in_features, layer.up.out_features) == (2, N)
    torch.testing.assert_close(logits(fused), logits(unfused), rtol=1e-5, atol=1e-6)
    assert (logits(unfused) - original).abs().max().item() > 1e-4  # the truncation shows


def test_activation_between_factors_is_fused_after_it():
    """down = second(relu(first(x))): second and up are consecutive Linears, so up absorbs
    second and the layer is Linear(16, 2) -> ReLU -> Linear(2, 16), the same function."""
    model = dcn_model()
    bases = cross_bases(model, down=2)
    unfused = compress_(copy.deepcopy(model), bases, CompressConfig(activation="relu", fuse=False))
    fused = compress_(model, bases, CompressConfig(activation="relu"))
    layer = fused.inter_arch.crossnet.layers[0]
    assert isinstance(layer.down, nn.Sequential) and isinstance(layer.down[1], nn.ReLU)
    assert (layer.down[0].out_features, layer.up.in_features) == (2, 2)
    torch.testing.assert_close(logits(fused), logits(unfused), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fuse", [False, True])
def test_compressed_crossnet_scripts(fuse):
    model = dcn_model()
    compress_(model, cross_bases(model, down=2), CompressConfig(fuse=fuse))
    net = model.inter_arch.crossnet.eval()
    scripted = torch.jit.script(net)
    x = torch.randn(32, N)
    with torch.no_grad():
        assert torch.equal(scripted(x), net(x))


# --- reload ------------------------------------------------------------------------------


def test_save_and_reload_compressed_dcn(tmp_path):
    model = dcn_model()
    bases = cross_bases(model, down=2, **{"sparse_arch.embedding_bag_collection.t1": 2})
    compress_(model, bases)
    record = ModelRecord(tiny_config("dcn"), ranks=bases.ranks, compress=CompressConfig(), method="afm")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in skeleton(record).state_dict().items()} == shapes
    save_model(model, record, tmp_path / "afm")
    loaded, loaded_record = load_model(tmp_path / "afm")
    assert loaded_record.ranks == bases.ranks
    assert {k: v.shape for k, v in loaded.state_dict().items()} == shapes
    assert torch.equal(logits(loaded), logits(model))
