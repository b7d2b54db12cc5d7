"""Model builders and the low-rank modules on hand-made inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import LowRankEmbeddingBagCollection, LowRankLinear, ModelConfig, TableSpec
from afmrec.models.deepfm import FieldFactorizationMachine

from .conftest import random_batch, tiny_config


def test_field_fm_is_sum_of_pairwise_field_dot_products():
    fields = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.5, 4.0]]])  # (B=1, F=3, D=2)
    # <e0,e1> + <e0,e2> + <e1,e2> = (3 - 2) + (0.5 + 8) + (1.5 - 4) = 7.0
    assert FieldFactorizationMachine()(fields).item() == pytest.approx(7.0)


def test_builders_give_one_logit_per_row(tiny_model):
    batch = random_batch(7, 3, seed=0)
    out = tiny_model(batch.dense_features, batch.sparse_features)
    assert out.shape == (7, 1)


def test_config_validation():
    with pytest.raises(ValueError, match="dense_arch must end"):
        ModelConfig("dlrm", (TableSpec("t", 3),), embedding_dim=4, dense_arch=(8, 5))
    with pytest.raises(ValueError, match="arch must be"):
        ModelConfig("wide", (TableSpec("t", 3),))
    cfg = tiny_config("dcn")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_lowrank_collection_by_hand():
    """E = 3 rows x D=2, U = [1, 0]^T (keep the first coordinate), centre c = (0, 5):
    E' = E U; y = U z + (I - U U^T) c on non-empty bags, 0 on empty ones."""
    cfg = EmbeddingBagConfig(name="t", embedding_dim=2, num_embeddings=3, feature_names=["f"])
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    ebc = EmbeddingBagCollection([cfg])
    with torch.no_grad():
        ebc.embedding_bags["t"].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    lr = LowRankEmbeddingBagCollection.from_embedding_bag_collection(
        ebc, {"t": torch.tensor([[1.0], [0.0]])}, {"t": torch.tensor([0.0, 5.0])}
    )
    assert lr.codes.embedding_bags["t"].weight.squeeze(1).tolist() == [1.0, 3.0, 5.0]
    kjt = KeyedJaggedTensor.from_lengths_sync(["f"], torch.tensor([0, 2, 1]), torch.tensor([2, 0, 1]))
    y = lr(kjt)["f"]
    assert y.tolist() == [[6.0, 5.0], [0.0, 0.0], [3.0, 5.0]]


def test_lowrank_linear_by_hand():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        lin.bias.copy_(torch.tensor([1.0, -1.0]))
    u = torch.tensor([[0.0], [1.0]])  # keep the second output
    lr = LowRankLinear.from_linear(lin, u, torch.tensor([7.0, 9.0]))
    assert lr.first.weight.tolist() == [[3.0, 4.0]] and lr.first.bias.tolist() == [-1.0]
    assert lr.second.bias.tolist() == [7.0, 0.0]
    assert lr(torch.tensor([[1.0, 1.0]])).tolist() == [[7.0, 6.0]]
