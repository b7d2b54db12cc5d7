"""One-process training with TorchRec's fused sparse optimizer (issue 23), and the
record of which state training kept."""

from __future__ import annotations

import logging

import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

from afmrec.models import build_model
from afmrec.pipeline.fused import ADAGRAD_EPS, fused_tables
from afmrec.pipeline.train import TrainConfig, make_optimizer, train_
from tests.conftest import random_batch, tiny_config
from tests.test_train_eval import FAST, HiddenCTR, synthetic_batches, tiny_model

BATCHES = [random_batch(64, 3, seed=s) for s in range(12)]


def trained(arch: str, fused: bool, **config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(tiny_config(arch))
    train_(model, BATCHES, TrainConfig(epochs=2, fused_sparse=fused, **config), progress=False)
    assert type(model.sparse_arch.embedding_bag_collection) is EmbeddingBagCollection
    return model.state_dict()


def test_fused_adagrad_trains_like_dense_adagrad(arch):
    """24 steps of multi-hot batches (empty bags, repeated ids): FBGEMM's fused exact
    Adagrad on the rows looked up gives the weights that dense gradients and
    torch.optim.Adagrad give (float32 rounding apart), tables and dense layers alike."""
    torch.manual_seed(0)
    start = build_model(tiny_config(arch)).state_dict()
    dense, fused = trained(arch, False), trained(arch, True)
    assert dense.keys() == fused.keys()
    for name in dense:
        torch.testing.assert_close(fused[name], dense[name], rtol=1e-5, atol=1e-6, msg=name)
    table = "sparse_arch.embedding_bag_collection.embedding_bags.t1.weight"
    assert (fused[table] - start[table]).abs().max() > 0.1  # the tables did train


def test_fused_tables_pass_torchs_eps_and_swap_back():
    torch.manual_seed(0)
    model = build_model(tiny_config("dlrm"))
    original = model.sparse_arch.embedding_bag_collection
    rng = torch.get_rng_state()
    with fused_tables(model, lr=0.2) as modules:
        assert torch.equal(torch.get_rng_state(), rng)  # the fused modules' init is forked
        (fused,) = modules
        assert model.sparse_arch.embedding_bag_collection is fused
        assert isinstance(fused, FusedEmbeddingBagCollection)
        tbe = fused._emb_modules[0]._emb_module
        assert (tbe.optimizer.name, tbe.optimizer_args.eps) == ("EXACT_ADAGRAD", ADAGRAD_EPS) == (
            "EXACT_ADAGRAD", 1e-10)  # not FBGEMM's default 1e-8
        optimizer = make_optimizer(model, TrainConfig(sparse_lr=0.2))
        assert set(optimizer.optimizers[i][0] for i in range(len(optimizer.optimizers))) == {
            "dense", "fused_0"}  # no table left to a dense Adagrad or to Adam
        assert optimizer.param_groups[-1]["lr"] == pytest.approx(0.2)
        with torch.no_grad():
            fused.embedding_bags["t0"].weight.fill_(3.0)  # stands for training
    assert model.sparse_arch.embedding_bag_collection is original
    assert torch.all(original.embedding_bags["t0"].weight == 3.0)


def test_dense_path_passes_eps_explicitly():
    model = build_model(tiny_config("dlrm"))
    optimizer = make_optimizer(model, TrainConfig(fused_sparse=False))
    (sparse,) = [o for key, o in optimizer.optimizers if key == "sparse"]
    assert sparse.param_groups[0]["eps"] == 1e-10


def test_result_says_which_state_was_kept(caplog):
    """Learnable data (test_train_eval's hidden model): every epoch lowers the validation
    logloss, so the last epoch is kept, and the log line says so, with the gain."""
    caplog.set_level(logging.INFO, logger="afmrec")
    truth = HiddenCTR(seed=7).eval()
    train, val = synthetic_batches(truth, 20, 64, seed=1), synthetic_batches(truth, 4, 256, seed=100)
    result = train_(tiny_model(), train, TrainConfig(epochs=3, eval_at_start=True, **FAST),
                    val_batches=val, progress=False)
    assert [r.step for r in result.history] == [0, 20, 40, 60]
    assert result.start is result.history[0] and result.best is result.history[-1]
    assert result.improved is True and not result.stopped_early
    best, start = result.best, result.start
    assert caplog.records[-1].getMessage() == result.summary() == (
        f"kept epoch 2, step 60 of 60: val auc {best.val_auc:.4f} logloss {best.val_logloss:.4f}, "
        f"{best.val_logloss - start.val_logloss:+.4f} logloss vs the start")
    assert best.val_logloss < start.val_logloss - 0.01


def test_a_finetune_that_never_beats_its_start_says_so(caplog):
    """Random labels and a huge learning rate: every step makes the model worse, so it
    comes back unchanged, and a warning says so."""
    caplog.set_level(logging.INFO, logger="afmrec")
    torch.manual_seed(0)
    model = build_model(tiny_config("dlrm"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    val = [random_batch(64, 3, seed=100)]
    result = train_(model, BATCHES[:2], TrainConfig(epochs=2, eval_at_start=True, dense_lr=5.0,
                                                    sparse_lr=50.0), val_batches=val, progress=False)
    assert result.improved is False and result.best is result.start
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    record = caplog.records[-1]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        f"kept the starting model unchanged: no step lowered its validation logloss "
        f"{result.start.val_logloss:.4f} (best after it ")


def test_tables_fbgemm_cannot_take_keep_the_dense_path():
    """FBGEMM needs table widths that are multiples of 4: a collection with a 3-wide table
    (a compressed model's rank) stays an EmbeddingBagCollection with dense Adagrad."""
    torch.manual_seed(0)
    model = build_model(tiny_config("dlrm", embedding_dim=3))
    with fused_tables(model, lr=0.05) as modules:
        assert modules == [] and type(model.sparse_arch.embedding_bag_collection) is EmbeddingBagCollection
        keys = {key for key, _ in make_optimizer(model, TrainConfig()).optimizers}
        assert keys == {"sparse", "dense"}
