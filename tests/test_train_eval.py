"""Exact-number tests of training, evaluation and reports (CPU, a few seconds).

The synthetic data come from a hidden rank-2 CTR model (:class:`HiddenCTR`): labels are
drawn from its probabilities, so AUC is learnable, and the same module serves as the
distillation teacher.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from afmrec.models import LowRankEmbeddingBagCollection, ModelConfig, TableSpec, build_model
from afmrec.models import table_configs
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.evaluate import (
    count_parameters,
    evaluate,
    measure_latency,
    model_bytes,
    predict_logits,
)
from afmrec.pipeline.report import REPORT_COLUMNS, format_report, read_report, write_report
from afmrec.pipeline.train import TrainConfig, distillation_loss, make_optimizer, train_

FEATURES = ("t0", "t1", "t2")
ROWS = 50
NUM_DENSE = 2
EMBEDDING_DIM = 4


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; several spin-wait when CI's cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(dense: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> Batch:
    """A one-hot batch: dense (B, N), ids (B, F) (one id per feature), labels (B,)."""
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(FEATURES),
        values=ids.T.reshape(-1),  # KJT values are feature-major
        lengths=torch.ones(ids.numel(), dtype=torch.int32),
    )
    return Batch(dense_features=dense.float(), sparse_features=kjt, labels=labels.float())


class HiddenCTR(nn.Module):
    """Ground truth: ``logit = sum_f e_f[0] + <e_t0, e_t1> + w . dense`` with 2-wide e_f."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.tables = EmbeddingBagCollection(
            [EmbeddingBagConfig(name=f, embedding_dim=2, num_embeddings=ROWS, feature_names=[f])
             for f in FEATURES]
        )
        with torch.no_grad():
            for p in self.tables.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.dense_weight = nn.Parameter(torch.randn(NUM_DENSE, generator=g))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        e = self.tables(sparse).to_dict()
        logit = sum(e[f][:, 0] for f in FEATURES) + (e["t0"] * e["t1"]).sum(1)
        return (logit + dense @ self.dense_weight).unsqueeze(1)


@torch.no_grad()
def synthetic_batches(
    truth: nn.Module, num_batches: int, batch_size: int, seed: int
) -> list[Batch]:
    """Batches with uniform ids, Gaussian dense features and labels drawn from ``truth``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        ids = torch.randint(0, ROWS, (batch_size, len(FEATURES)), generator=g)
        dense = torch.randn(batch_size, NUM_DENSE, generator=g)
        unlabelled = make_batch(dense, ids, torch.zeros(batch_size))
        probs = torch.sigmoid(truth(dense, unlabelled.sparse_features)).view(-1)
        batches.append(make_batch(dense, ids, torch.bernoulli(probs, generator=g)))
    return batches


def tiny_config() -> ModelConfig:
    return ModelConfig(
        "dlrm",
        tuple(TableSpec(f, ROWS) for f in FEATURES),
        num_dense=NUM_DENSE,
        embedding_dim=EMBEDDING_DIM,
        dense_arch=(8, EMBEDDING_DIM),
        over_arch=(8, 1),
    )


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config())


class FirstDenseFeature(nn.Module):
    """A parameter-free model whose logit is the first dense feature: hand-set logits."""

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return dense[:, :1]


def scored_batch(logits: list[float], labels: list[float]) -> Batch:
    n = len(logits)
    return make_batch(
        torch.tensor(logits).view(n, 1).expand(n, NUM_DENSE),
        torch.zeros(n, len(FEATURES), dtype=torch.long),
        torch.tensor(labels),
    )


def rank_auc(scores: list[float], labels: list[float]) -> float:
    """Mann-Whitney AUC: (sum of positives' mid-ranks - P(P+1)/2) / (P N)."""

    def midrank(x: float) -> float:
        return sum(s < x for s in scores) + (sum(s == x for s in scores) + 1) / 2

    pos = [s for s, y in zip(scores, labels) if y == 1]
    p, n = len(pos), len(scores) - len(pos)
    return (sum(midrank(s) for s in pos) - p * (p + 1) / 2) / (p * n)


def bce(z: float, y: float) -> float:
    """-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))], stable for any z."""
    return y * math.log1p(math.exp(-z)) + (1 - y) * math.log1p(math.exp(z))


# ----------------------------------------------------------------------------- evaluate

LOGITS = [[2.0, -1.0, 0.5], [0.5, -3.0, 1.0, 0.25]]
LABELS = [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]  # one positive/negative tie at 0.5


def test_evaluate_matches_rank_auc_and_hand_logloss():
    model = FirstDenseFeature().train()
    batches = [scored_batch(z, y) for z, y in zip(LOGITS, LABELS)]
    scores, labels = sum(LOGITS, []), sum(LABELS, [])

    result = evaluate(model, batches)

    # positives 2.0, 0.5, 1.0 against negatives -1, 0.5, -3, 0.25: 4 + 3.5 + 4 of 12 pairs
    assert rank_auc(scores, labels) == pytest.approx(11.5 / 12, abs=1e-15)
    assert result.auc == pytest.approx(11.5 / 12, abs=1e-6)
    assert result.logloss == pytest.approx(
        sum(bce(z, y) for z, y in zip(scores, labels)) / 7, rel=1e-14
    )
    assert result.num_samples == 7
    assert model.training  # mode restored
    assert torch.equal(predict_logits(model, batches), torch.tensor(scores))


def test_evaluate_single_class_auc_is_nan_and_empty_input_is_an_error():
    result = evaluate(FirstDenseFeature(), [scored_batch([0.1, 0.2], [1.0, 1.0])])
    assert math.isnan(result.auc)
    assert result.logloss == pytest.approx((bce(0.1, 1) + bce(0.2, 1)) / 2, rel=1e-6)
    with pytest.raises(InputError, match="no sample"):
        evaluate(FirstDenseFeature(), [])


def test_evaluate_under_a_process_group_equals_single_process(tmp_path):
    batches = [scored_batch(z, y) for z, y in zip(LOGITS, LABELS)]
    alone = evaluate(FirstDenseFeature(), batches)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        grouped = evaluate(FirstDenseFeature(), batches)
    finally:
        dist.destroy_process_group()
    assert grouped == alone


def test_count_parameters_and_model_bytes_exact():
    model = tiny_model()
    d, f, n = EMBEDDING_DIM, len(FEATURES), NUM_DENSE
    tables = f * ROWS * d
    dense_arch = (n * 8 + 8) + (8 * d + d)
    over_in = d + (f + 1) * f // 2  # dense vector + pairwise dots of the F + 1 fields
    over_arch = (over_in * 8 + 8) + (8 * 1 + 1)
    expected = tables + dense_arch + over_arch
    # DLRM's InteractionArch keeps the (2, pairs) int64 triu indices as a buffer
    buffer_bytes = 2 * ((f + 1) * f // 2) * 8

    assert expected == 757  # 600 table + 60 dense-arch + 97 over-arch elements
    assert count_parameters(model) == expected
    assert model_bytes(model) == expected * 4 + buffer_bytes

    model.sparse_arch.embedding_bag_collection.double()  # element size follows dtype
    assert model_bytes(model) == tables * 8 + (expected - tables) * 4 + buffer_bytes

    shared = nn.ModuleList([model, model])  # the same parameters reached twice
    assert count_parameters(shared) == expected
    assert model_bytes(shared) == model_bytes(model)


def test_measure_latency_is_positive_and_restores_mode():
    model = tiny_model().train()
    batch = synthetic_batches(HiddenCTR(0), 1, 32, seed=1)[0]
    ms = measure_latency(model, batch, warmup=1, repeats=3)
    assert 0 < ms < 1000
    assert model.training
    with pytest.raises(InputError):
        measure_latency(model, batch, repeats=0)


def test_measure_latencies_calls_the_models_in_turn():
    """Several models are timed interleaved (a, b, a, b, ...), each in eval mode under
    no_grad while timed and restored after. torch.utils.benchmark's Timer runs two
    untimed passes before each timed one."""
    from afmrec.pipeline.evaluate import forward_logits, measure_latencies

    a, b = tiny_model().train(), tiny_model().eval()
    batch = synthetic_batches(HiddenCTR(0), 1, 32, seed=1)[0]
    calls = []

    def run(model, x):
        calls.append(("a" if model is a else "b", model.training, torch.is_grad_enabled()))
        return forward_logits(model, x)

    ms = measure_latencies({"a": a, "b": b}, batch, warmup=1, repeats=2, run=run)
    assert set(ms) == {"a", "b"} and all(0 < v < 1000 for v in ms.values())
    a_pass, b_pass = ("a", False, False), ("b", False, False)
    assert calls == [a_pass, b_pass] + ([a_pass] * 3 + [b_pass] * 3) * 2
    assert a.training and not b.training


def test_measure_latency_states_and_uses_its_threads():
    """Issue 23: latency runs with a stated thread count (restored after), whatever the
    caller's, so two reports of the same model compare."""
    from afmrec.pipeline.evaluate import forward_logits, latency_note

    model = tiny_model()
    batch = synthetic_batches(HiddenCTR(0), 1, 32, seed=1)[0]
    threads = []

    def run(m, x):
        threads.append(torch.get_num_threads())
        return forward_logits(m, x)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        measure_latency(model, batch, warmup=1, repeats=2, num_threads=1, run=run)
        assert threads == [1] * 7 and torch.get_num_threads() == 2
        assert latency_note(2048) == ("latency_ms: median of 10 forward passes of 2,048 rows "
                                      "(torch.utils.benchmark, 2 warm-up passes, 2 CPU threads)")
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def truth() -> HiddenCTR:
    return HiddenCTR(seed=7).eval()


@pytest.fixture(scope="module")
def val_batches(truth) -> list[Batch]:
    return synthetic_batches(truth, 8, 256, seed=100)


FAST = dict(dense_lr=1e-2, sparse_lr=0.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"max_steps": 0},
        {"dense_lr": 0.0},
        {"sparse_lr": -1.0},
        {"weight_decay": -0.1},
        {"patience": 0},
        {"eval_every": 0},
        {"log_every": 0},
        {"distill_temperature": 0.0},
    ],
)
def test_train_config_rejects_bad_values(kwargs):
    with pytest.raises(InputError):
        TrainConfig(**kwargs)


def test_make_optimizer_adagrad_for_tables_adam_for_the_rest():
    model = tiny_model()
    model.sparse_arch.embedding_bag_collection = LowRankEmbeddingBagCollection(
        table_configs(tiny_config()), {"t0": 2}
    )
    optimizer = make_optimizer(model, TrainConfig(dense_lr=0.003, sparse_lr=0.2))
    groups = dict(optimizer.optimizers)

    prefix = "sparse_arch.embedding_bag_collection."
    assert set(groups["sparse"].params) == {
        f"{prefix}codes.embedding_bags.{f}.weight" for f in FEATURES
    }
    assert {f"{prefix}projections.t0.weight", f"{prefix}projections.t0.bias"} <= set(
        groups["dense"].params
    )
    assert len(groups["sparse"].params) + len(groups["dense"].params) == len(
        list(model.parameters())
    )
    (sparse_group,), (dense_group,) = groups["sparse"].param_groups, groups["dense"].param_groups
    assert "lr_decay" in sparse_group and sparse_group["lr"] == 0.2  # Adagrad
    assert "betas" in dense_group and dense_group["lr"] == 0.003  # Adam


def test_training_learns_synthetic_ctr_deterministically(truth, val_batches):
    train = synthetic_batches(truth, 80, 64, seed=1)
    config = TrainConfig(epochs=3, eval_every=40, **FAST)
    model = tiny_model()
    initial = copy.deepcopy(model)
    before = evaluate(model, val_batches)

    result = train_(model, train, config, val_batches=val_batches, progress=False)

    # 80 steps per epoch; epoch ends coincide with eval steps and are recorded once
    assert [r.step for r in result.history] == [40, 80, 120, 160, 200, 240]
    assert [r.epoch for r in result.history] == [0, 0, 1, 1, 2, 2]
    assert result.steps == 240 and not result.stopped_early
    after = evaluate(model, val_batches)
    bayes = evaluate(truth, val_batches).auc
    assert max(0.75, before.auc + 0.1) < after.auc <= bayes + 0.01
    assert after.logloss < before.logloss
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best.val_logloss == min(r.val_logloss for r in result.history)
    assert after.logloss == result.best.val_logloss
    assert all(r.samples_per_s > 0 for r in result.history)

    again = train_(initial, train, config, val_batches=val_batches, progress=False)
    assert [r.val_logloss for r in again.history] == [r.val_logloss for r in result.history]
    for (name, a), b in zip(model.state_dict().items(), initial.state_dict().values()):
        assert torch.equal(a, b), name


def test_max_steps_stops_mid_epoch(truth):
    train = synthetic_batches(truth, 10, 32, seed=2)
    result = train_(tiny_model(), train, TrainConfig(epochs=5, max_steps=13), progress=False)
    assert result.steps == 13
    assert [(r.epoch, r.step) for r in result.history] == [(0, 10), (1, 13)]
    assert result.best is None and result.history[-1].val_auc is None


class FlippingBatches:
    """True labels in epoch 0, flipped labels afterwards: a shift that makes the model
    worse on validation after the first epoch, so the best state is epoch 0's."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.epoch = batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            labels = b.labels if self.epoch == 0 else 1 - b.labels
            yield Batch(b.dense_features, b.sparse_features, labels)


def test_early_stopping_restores_the_best_state(truth, val_batches):
    train = FlippingBatches(synthetic_batches(truth, 30, 64, seed=3))
    model = tiny_model()

    result = train_(
        model, train, TrainConfig(epochs=6, patience=2, **FAST), val_batches=val_batches,
        progress=False,
    )

    losses = [r.val_logloss for r in result.history]
    assert result.stopped_early and len(result.history) == 3  # epoch 0 best, 2 worse
    assert result.best is result.history[0]
    assert losses[0] < losses[1] and losses[0] < losses[2]
    assert evaluate(model, val_batches).logloss == losses[0]


def test_distillation_learns_the_teacher_without_labels(truth, val_batches):
    unlabelled = [
        Batch(b.dense_features, b.sparse_features, torch.zeros_like(b.labels))
        for b in synthetic_batches(truth, 40, 64, seed=4)
    ]
    student = tiny_model()
    teacher_logits = predict_logits(truth, val_batches)

    def mse() -> float:
        return float(((predict_logits(student, val_batches) - teacher_logits) ** 2).mean())

    mse_before = mse()
    train_(student, unlabelled, TrainConfig(epochs=3, **FAST), teacher=truth, progress=False)

    # BCE against the all-zero labels would only push every logit down; the teacher's
    # ranking is learnt, so the student's AUC on the true labels rises
    assert mse() < 0.3 * mse_before
    assert evaluate(student, val_batches).auc > 0.75


def test_distillation_loss_is_minimal_at_the_teacher_logits():
    teacher = torch.tensor([-2.0, 0.3, 1.5])
    for temperature in (1.0, 3.0):
        student = teacher.clone().requires_grad_()
        (grad,) = torch.autograd.grad(distillation_loss(student, teacher, temperature), student)
        assert torch.allclose(grad, torch.zeros(3), atol=1e-7)


def test_train_rejects_patience_without_validation_and_a_training_teacher(truth):
    train = synthetic_batches(truth, 2, 8, seed=5)
    with pytest.raises(InputError, match="patience"):
        train_(tiny_model(), train, TrainConfig(patience=1), progress=False)
    with pytest.raises(InputError, match="eval mode"):
        train_(tiny_model(), train, TrainConfig(), teacher=tiny_model().train(), progress=False)
    with pytest.raises(InputError, match="no batch"):
        train_(tiny_model(), [], TrainConfig(), progress=False)


# ----------------------------------------------------------------------------- report

ROWS_REPORT = [
    {"variant": "original", "params": 1_234_567, "bytes": 4_938_268, "auc": 0.80123,
     "logloss": 0.44321, "latency_ms": 1.234, "delta_auc": 0.0},
    {"variant": "afm_r4", "params": 299_653, "bytes": 1_198_612, "auc": 0.80021,
     "logloss": 0.44401, "latency_ms": 0.5678, "delta_auc": -0.00102, "rank": 4},
]


def test_report_round_trip(tmp_path):
    path = tmp_path / "report.parquet"
    write_report(ROWS_REPORT, path)
    back = read_report(path)
    assert back[0] == {**ROWS_REPORT[0], "rank": None}
    assert back[1] == ROWS_REPORT[1]
    assert list(back[0])[: len(REPORT_COLUMNS)] == list(REPORT_COLUMNS)

    write_report(ROWS_REPORT[:1], path)  # overwrite is the default for a report
    assert len(read_report(path)) == 1
    with pytest.raises(InputError, match="exists"):
        write_report(ROWS_REPORT, path, overwrite=False)


def test_report_missing_column_is_an_input_error(tmp_path):
    path = tmp_path / "report.parquet"
    row = {k: v for k, v in ROWS_REPORT[1].items() if k != "latency_ms"}
    with pytest.raises(InputError, match=r"'afm_r4'.*latency_ms"):
        write_report([ROWS_REPORT[0], row], path)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="not found"):
        read_report(path)


def test_format_report_numbers_and_alignment():
    text = format_report(ROWS_REPORT)
    lines = text.splitlines()
    header, rule, first, second = lines
    assert header.split() == [
        "variant", "params", "ratio", "bytes", "auc", "logloss", "latency_ms", "delta_auc", "rank"
    ]
    assert set(rule.replace(" ", "")) == {"-"}
    for expected in ("1,234,567", "1.00x", "4.71 MiB", "0.8012", "0.4432", "1.23", "+0.0000"):
        assert expected in first, expected
    for expected in ("299,653", "4.12x", "1.14 MiB", "0.8002", "0.4440", "0.57", "-0.0010", "4"):
        assert expected in second, expected
    assert first.split()[-1] == "-"  # missing value
    # numbers are right-aligned: every column ends at the same offset on every line
    assert len({len(line) for line in lines}) == 1
    assert header.index("params") + len("params") == second.index("299,653") + len("299,653")


def test_record_before_training_says_so_instead_of_a_nan_loss():
    """The record taken before the first step has no training loss: its log line says so
    (a fine-tune's first line read ``loss nan, 0 samples/s``)."""
    from afmrec.pipeline.train import TrainRecord

    before = TrainRecord(epoch=0, step=0, train_loss=float("nan"), samples_per_s=0.0, val_auc=0.6629,
                         val_logloss=0.5275)
    assert before.summary() == "epoch 0 step 0: before training, val auc 0.6629 logloss 0.5275"
    after = TrainRecord(epoch=0, step=25, train_loss=0.538, samples_per_s=28505.2, val_auc=0.6631,
                        val_logloss=0.5276)
    assert after.summary() == "epoch 0 step 25: loss 0.5380, 28,505 samples/s, val auc 0.6631 logloss 0.5276"
