"""Loss-sensitivity probes: the hook-based truncation equals compressing the block alone."""

from __future__ import annotations

import copy

import pytest
import torch

from afmrec.models import build_model
from afmrec.pipeline.bases import afm_bases, spectra
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.compress import CompressConfig, compress_
from afmrec.pipeline.evaluate import predict_logits
from afmrec.pipeline.sensitivity import Probe, bernoulli_kl, measure_sensitivity, sensitivity_weights
from afmrec.pipeline.stats import collect_statistics

from .conftest import random_batch, tiny_config

BATCHES = [random_batch(64, 3, seed=s) for s in range(4)]


def test_probe_equals_compressing_the_block_alone(arch):
    """Every probe's loss is the KL divergence between the original's predictions and
    those of ``compress_`` of that block alone at that rank, to float32 round-off, on
    multi-hot data with empty bags (DLRM, DCN, DeepFM)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(arch)).eval()
    blocks = find_blocks(model)
    spec = spectra(collect_statistics(model, blocks, BATCHES, precision="float64"))
    probes = measure_sensitivity(model, blocks, spec, BATCHES)
    assert {p.block for p in probes} == {b.name for b in blocks if spec[b.name].energy(1) < 1}
    base = predict_logits(model, BATCHES).double()
    for p in probes:
        alone = compress_(copy.deepcopy(model), afm_bases(spec, {p.block: p.rank}), CompressConfig())
        kl = bernoulli_kl(base, predict_logits(alone, BATCHES).double()).mean().item()
        assert p.delta_loss == pytest.approx(kl, rel=1e-3, abs=1e-9)
        assert p.delta_loss > 0
        assert p.dropped == pytest.approx(1 - spec[p.block].energy(p.rank))
    # the model is left as it was
    assert torch.equal(predict_logits(model, BATCHES).double(), base)


def test_bernoulli_kl_is_the_logloss_against_the_predictions_less_their_own():
    base, logits = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, -3.0, 0.5])
    p = torch.sigmoid(base)
    ce = lambda z: -(p * torch.log(torch.sigmoid(z)) + (1 - p) * torch.log(1 - torch.sigmoid(z)))  # noqa: E731
    torch.testing.assert_close(bernoulli_kl(base, logits), ce(logits) - ce(base))
    assert torch.equal(bernoulli_kl(base, base), torch.zeros(3))


def test_weights_are_least_squares_slopes_floored():
    probes = [Probe("a", 1, 0.5, 0.01), Probe("a", 2, 0.25, 0.002), Probe("b", 1, 0.2, -0.001)]
    w = sensitivity_weights(probes, floor=0.1)
    # a: (0.5 * 0.01 + 0.25 * 0.002) / (0.25 + 0.0625) = 0.0176; b: 0 -> 0.1 * mean
    assert w["a"] == pytest.approx(0.0176)
    assert w["b"] == pytest.approx(0.1 * 0.0176 / 2)
