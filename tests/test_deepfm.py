"""DeepFM keeps its AUC at 4x on table-dominated data (issue 20, point 4), measured.

Real training, real compression, real test AUC; nothing is mocked. The data is the quality
benchmark's production-shaped synthetic data (``afmrec bench quality --data synth``:
width-16 tables of 10 to 200,000 rows, labels from a hidden factorisation model), where the
tables hold 98-99% of every model's parameters. Each model is trained as the benchmark
trains it (seed 0, early stopping on the validation rows), then compressed 4x in served
bytes by the public API, ``afmrec.compress_`` (loss probes on 16,384 validation rows),
served with its tables in the format the plan chose, and scored on the test rows.

Why DeepFM is the hard case (docs/compression.md, "DeepFM"): its FM term sums every
field pair's full dot product into the logit, so its tables are far from low rank (rank
12 keeps 93% of a large DeepFM table's variance here, 98-99% of a DLRM table's). With
FBGEMM's 16-byte CUDA rows, 4x is the most a width-16 table can shrink: every large table
is held to 16-byte rows (int8, rank 12 at most), and the rest of the budget decides the
AUC. The hidden model's interaction term is itself a factorisation machine over 4-wide
vectors, so DeepFM's FM carries most of the signal: the default plan cuts its deep
tower's second layer to rank 1 and still gains AUC.

Measured (ΔAUC against the same seed's original, tables served in int8):

====  ======  ===============  ============  ======  ===============
seed  DeepFM  default (loss)   variance      DLRM    default (loss)
====  ======  ===============  ============  ======  ===============
0     0.7377  +0.00053 4.00x   +0.00075      0.7153  -0.00055
1     0.7350  +0.00040 4.00x   +0.00106      0.7014  -0.00048
2     0.7381  +0.00056 4.00x   +0.00040      0.7143  -0.00036
====  ======  ===============  ============  ======  ===============

(the published grid's figures: DeepFM +0.0005 ± 0.0001, DLRM -0.0005 ± 0.0001). On this
data both policies keep DeepFM's AUC, and neither wins on every seed, so the
published-data tests assert the target and the comparison with DLRM, not an order of the
policies. The last test takes a DeepFM with a narrow dense part (hidden layers 32 and 16),
served by the CPU kernels. There the variance greedy makes every other block whole (the
deep tower's first layer among them) before the large table's next rank unit (8 -> 12,
40 KB), which then no longer fits: its int8 plan stops at 4.48x, more than 10% past the
target. The planner then takes that step first and plans the rest again (3.65x, int8,
tables C3 and C4 at rank 12, every Linear whole); before it did, it refused that plan and
``auto`` fell back to fp32 tables at rank 4 (ΔAUC -0.0035 to -0.0191). The loss probes
weigh the table 15 times the layer, so the default plan gives the table rank 12 and the
layer rank 17 (3.64x, int8). This model is also where a budget of the Linear layers' own
binds on a trained model: with ``dense_ratio=4`` its plan cuts the deep tower to rank 1
(3.89x, int8). ΔAUC over five data seeds (``SynthConfig.seed``, training seed 0) and over
five training seeds (data seed 0):

===========================  ==================================================  ==================================================
policy                       data seeds 0-4                                      training seeds 0-4
===========================  ==================================================  ==================================================
default (loss)               +0.00012, +0.00017, +0.00004, +0.00032, +0.00009    +0.00012, -0.00013, +0.00009, +0.00006, +0.00006
variance                     -0.00024, +0.00057, +0.00043, +0.00031, +0.00021    -0.00024, +0.00024, +0.00026, -0.00006, +0.00024
default, ``dense_ratio=4``   -0.00025, -0.00145, -0.00156, -0.00076, -0.00024    -0.00025, +0.00110, -0.00135, -0.00030, +0.00076
===========================  ==================================================  ==================================================

Seed 0 runs here (14-20 s on an idle 2-core machine); the other seeds were measured with this file's
code. Results are deterministic on a CPU (FBGEMM's fused Adagrad included): equal to the
printed digits over runs and thread counts.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import pytest
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

import afmrec
from afmrec.models import build_model
from afmrec.pipeline.benchmarks.quality import (TARGETS, Protocol, Splits, dataset_plan,
                                                model_config, quantize_tables_, synthetic_splits)
from afmrec.pipeline.data import SynthConfig
from afmrec.pipeline.evaluate import evaluate
from afmrec.pipeline.ranks import TOLERANCE
from afmrec.pipeline.train import seeded, train_

from .conftest import served_bytes

pytestmark = pytest.mark.slow

SEED = 0
RATIO = 4.0
# issue 20's target for AFM at 4x bytes without fine-tuning (the benchmark's own constant)
TARGET = next(floor for variant, ratio, floor in TARGETS if variant == "afm" and ratio == RATIO)
# "like the others": DeepFM may lose at most this much more AUC than the DLRM on the same data
LIKE_DLRM = 0.0005
MIN_AUC = 0.70  # the hidden model's own AUC (oracle) on this data is 0.80
MIN_TABLE_SHARE = 0.8


@dataclass(frozen=True)
class Compressed:
    """One compression of a trained original, scored as served."""

    policy: str
    delta_auc: float  # test AUC with the tables in the plan's format, minus the original's
    ratio: float  # the plan's served-bytes ratio
    counted_ratio: float  # the same, counted from the compressed modules themselves
    table_format: str
    ranks: dict[str, int]


@dataclass(frozen=True)
class Outcome:
    """A trained original and its compressions."""

    arch: str
    table_share: float
    auc: float
    compressed: dict[str, Compressed]


def table_share(model: nn.Module) -> float:
    """The fraction of the model's parameters held by its TorchRec tables."""
    tables = sum(p.numel() for m in model.modules() if isinstance(m, EmbeddingBagCollection)
                 for p in m.parameters())
    return tables / sum(p.numel() for p in model.parameters())


def train_and_compress(splits: Splits, protocol: Protocol, arch: str,
                       configs: Mapping[str, afmrec.AFMConfig]) -> Outcome:
    """Trains ``arch`` as the quality benchmark does (seeded, early stopping on the
    validation rows) and compresses a copy of it with each config: statistics over the
    protocol's calibration rows, loss probes on its validation rows."""
    p = protocol
    with seeded(SEED):
        model = build_model(model_config(splits.train, arch, p))
    share = table_share(model)
    train_(model, splits.train.batches(p.batch_size, shuffle=True, seed=SEED, drop_last=True),
           dataclasses.replace(p.train, seed=SEED), val_batches=list(splits.val.batches(p.eval_batch_size)),
           progress=False)
    test = list(splits.test.batches(p.eval_batch_size))
    auc = evaluate(model, test).auc
    calibration = list(splits.train.batches(p.eval_batch_size, limit_rows=p.calibration_rows))
    probes = list(splits.val.batches(p.eval_batch_size, limit_rows=p.sensitivity_rows))
    original = served_bytes(model, "fp32", "cpu")
    compressed = {}
    for name, config in configs.items():
        small = copy.deepcopy(model)
        result = afmrec.compress_(small, calibration, config, probe_batches=probes)
        counted = original / served_bytes(small, result.table_format, config.serve_device)
        served = quantize_tables_(small, result.table_format)
        compressed[name] = Compressed(result.policy, evaluate(served, test).auc - auc, result.ratio, counted,
                                      result.table_format, result.ranks)
    outcome = Outcome(arch, share, auc, compressed)
    print(f"\n{arch}: tables {share:.2%} of the parameters, test AUC {auc:.4f}")
    for name, c in compressed.items():
        ranks = " ".join(f"{block.rsplit('.', 1)[-1] if '.C' in block else block}={k}"
                         for block, k in c.ranks.items())
        print(f"  {name:8s} ({c.policy}): ΔAUC {c.delta_auc:+.5f} at {c.ratio:.3f}x served bytes "
              f"(counted {c.counted_ratio:.3f}x), {c.table_format} tables; ranks {ranks}")
    return outcome


def within_tolerance(ratio: float) -> bool:
    return abs(math.log(ratio / RATIO)) <= math.log1p(TOLERANCE) + 1e-12


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict[str, Outcome]:
    """DeepFM (default policy and ``variance``) and DLRM (default policy) on the quality
    benchmark's synthetic data, trained and compressed by the benchmark's protocol."""
    plan = dataset_plan("synth", Path(tmp_path_factory.mktemp("synth")))
    splits = plan.splits(SEED)
    default = afmrec.AFMConfig(ratio=RATIO)  # no policy given: the default
    variance = afmrec.AFMConfig(ratio=RATIO, policy="variance")
    return {
        "deepfm": train_and_compress(splits, plan.protocol, "deepfm", {"default": default, "variance": variance}),
        "dlrm": train_and_compress(splits, plan.protocol, "dlrm", {"default": default}),
    }


def test_the_tables_dominate_and_the_originals_learn(published):
    for outcome in published.values():
        assert outcome.table_share >= MIN_TABLE_SHARE, outcome
        assert outcome.auc >= MIN_AUC, outcome


def test_deepfm_keeps_its_auc_at_4x_with_the_default_policy(published):
    """ΔAUC >= -0.0005 at 4x served bytes, no fine-tuning (seed 0: +0.00053; variance:
    +0.00075). The plan is the default one: the loss policy, the planner's table format
    (int8: the large tables at rank 12, 16-byte rows), rows padded for CUDA."""
    default = published["deepfm"].compressed["default"]
    assert default.policy == "loss"
    assert within_tolerance(default.ratio) and within_tolerance(default.counted_ratio), default
    assert default.delta_auc >= TARGET, default


def test_deepfm_loses_no_more_auc_than_dlrm(published):
    """Issue 20: DeepFM keeps AUC like the others. Same data, same default path; seed 0:
    DeepFM +0.00053, DLRM -0.00055 (seeds 1, 2: +0.00040 / -0.00048, +0.00056 / -0.00036)."""
    deepfm, dlrm = published["deepfm"].compressed["default"], published["dlrm"].compressed["default"]
    assert within_tolerance(dlrm.ratio), dlrm
    assert deepfm.delta_auc >= dlrm.delta_auc - LIKE_DLRM, (deepfm, dlrm)


def test_both_policies_keep_the_auc_of_a_cpu_served_deepfm_and_a_linear_budget_costs_it(tmp_path_factory):
    """A DeepFM with a narrow dense part (hidden layers 32, 16; tables 97% of its
    parameters), served by the CPU kernels (unpadded rows), at 4x: the default policy and
    the variance greedy both keep its AUC in int8 (seed 0: +0.00012 at 3.64x, -0.00024 at
    3.65x; the variance plan's coarse last step is taken first, module docstring). A budget
    of the Linear layers' own (``--dense-ratio 4``) binds here, on a trained model, and
    costs AUC the byte plan keeps (seed 0: -0.00025, the deep tower at rank 1; 7 of the 9
    seeds of the module docstring): why it is an option, not the default."""
    config = SynthConfig(num_rows=100_000, table_sizes=(10, 100, 1_000, 10_000), seed=0)
    work = Path(tmp_path_factory.mktemp("narrow"))
    splits = synthetic_splits(config, work, test_rows=20_000)
    synth = dataset_plan("synth", work).protocol  # the published protocol (writes nothing)
    protocol = dataclasses.replace(synth, layers=(32, 16), batch_size=512,
                                   train=dataclasses.replace(synth.train, epochs=3))
    outcome = train_and_compress(splits, protocol, "deepfm", {
        "default": afmrec.AFMConfig(ratio=RATIO, serve_device="cpu"),
        "variance": afmrec.AFMConfig(ratio=RATIO, policy="variance", serve_device="cpu"),
        "dense": afmrec.AFMConfig(ratio=RATIO, dense_ratio=RATIO, serve_device="cpu"),
    })
    assert outcome.table_share >= MIN_TABLE_SHARE and outcome.auc >= MIN_AUC, outcome
    default, variance = outcome.compressed["default"], outcome.compressed["variance"]
    for c in (default, variance):
        assert within_tolerance(c.ratio) and within_tolerance(c.counted_ratio), c
        assert c.table_format == "int8" and c.delta_auc >= TARGET, c
    dense = outcome.compressed["dense"]
    assert within_tolerance(dense.ratio) and dense.delta_auc < default.delta_auc, (dense, default)
