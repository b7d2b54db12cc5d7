"""Labels with a signal for the speed benchmark's batches, so that the benchmark model is
trained before it is calibrated and every served variant's AUC is measured in the run
that times it.

The hidden model is the synthetic data's (:mod:`afmrec.pipeline.data.synth`): per table
row a hidden vector of ``hidden_dim`` values and a first-order weight, mean-pooled over
each bag; the logit is a linear term of the dense features, plus the sum over field pairs
of the dot products of their pooled vectors (the interaction a DLRM learns), plus the
pooled first-order weights, each term scaled to the synthetic data's standard deviation
on a calibration sample, plus the bias that sets the positive rate. A label is
Bernoulli(sigmoid(logit)). The model lives on the device (``hidden_dim + 1`` float32 per
table row: 484 MB at the production shape) and labels a batch there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch

from ...data.synth import TERM_STDS, bias_for_rate
from ...evaluate import batches_auc
from ...train import TrainConfig, train_
from .shape import SEEDS, SpeedShape, iter_batches

HIDDEN_DIM = 4
POSITIVE_RATE = 0.25


@dataclass
class PlantedLabels:
    """The hidden model (module docstring).

    Attributes:
        tables: feature name -> (rows, hidden_dim + 1): hidden vectors, then the
            first-order weight.
        dense_weight: (num_dense,).
        scales: (3,) the terms' scales.
        bias: the logit's bias.
    """

    tables: dict[str, torch.Tensor]
    dense_weight: torch.Tensor
    scales: torch.Tensor
    bias: float

    @classmethod
    def draw(cls, shape: SpeedShape, device: torch.device, seed: int = SEEDS["labels"],
             calibration_batches: int = 4) -> "PlantedLabels":
        """A hidden model for ``shape``'s tables, its scales and bias set on
        ``calibration_batches`` batches of its own."""
        g = torch.Generator(device=device).manual_seed(seed)
        tables = {t.name: torch.randn(t.num_embeddings, HIDDEN_DIM + 1, generator=g, device=device)
                  for t in shape.model_config().tables}
        dense_weight = torch.randn(shape.num_dense, generator=g, device=device)
        model = cls(tables, dense_weight, torch.ones(3, device=device), 0.0)
        terms = torch.cat([model.terms(b) for b in iter_batches(shape, shape.train_batch, calibration_batches,
                                                                 device, seed)], dim=1)
        std = terms.std(dim=1)
        target = torch.as_tensor(TERM_STDS, dtype=std.dtype, device=device)
        model.scales = torch.where(std > 0, target / std, torch.zeros_like(std))
        model.bias = bias_for_rate((model.scales @ terms).double().cpu().numpy(), POSITIVE_RATE)
        return model

    def terms(self, batch: Batch) -> torch.Tensor:
        """(3, B): the dense, interaction and first-order terms of each row, unscaled."""
        pooled_sum, squares, first_order = 0.0, 0.0, 0.0
        for name, bags in batch.sparse_features.to_dict().items():
            pooled = F.embedding_bag(bags.values(), self.tables[name], bags.offsets(), mode="mean",
                                     include_last_offset=True)
            vectors = pooled[:, :-1]
            pooled_sum = pooled_sum + vectors
            squares = squares + (vectors * vectors).sum(dim=1)
            first_order = first_order + pooled[:, -1]
        # the sum over pairs i < j of <v_i, v_j> = (|sum v|^2 - sum |v|^2) / 2
        interaction = 0.5 * ((pooled_sum * pooled_sum).sum(dim=1) - squares)
        return torch.stack([batch.dense_features @ self.dense_weight, interaction, first_order])

    def logits(self, batch: Batch) -> torch.Tensor:
        """(B,) the true logits: what no model can beat (their AUC is the oracle's)."""
        return self.scales @ self.terms(batch) + self.bias

    def oracle_auc(self, batches: Iterable[Batch]) -> float:
        """AUC of the true logits over labelled ``batches``: the ceiling of any model's."""
        return batches_auc(self.logits, batches)

    def label(self, batches: Iterable[Batch], seed: int) -> Iterator[Batch]:
        """``batches`` with labels drawn from the hidden model (the same ``seed``, the same
        labels)."""
        g = torch.Generator(device=self.dense_weight.device).manual_seed(seed)
        for batch in batches:
            p = torch.sigmoid(self.logits(batch))
            labels = (torch.rand(p.shape, generator=g, device=p.device) < p).float()
            yield Batch(batch.dense_features, batch.sparse_features, labels)


def fit_(model: nn.Module, shape: SpeedShape, labels: PlantedLabels, device: torch.device) -> dict[str, Any]:
    """Trains the benchmark model in place for ``shape.fit_steps`` steps of
    ``shape.train_batch`` labelled rows drawn apart from every other batch set, with
    ``afmrec train``'s optimizers and rates; returns what the record keeps of it."""
    batches = labels.label(iter_batches(shape, shape.train_batch, shape.fit_steps, device, SEEDS["fit"]),
                           SEEDS["fit"])
    start = time.perf_counter()
    model.train()
    result = train_(model, batches, TrainConfig(), progress=False)
    model.eval()
    return {"fit_steps": result.steps, "fit_rows": result.steps * shape.train_batch,
            "fit_wall_s": time.perf_counter() - start, "fit_config": "afmrec train's defaults (TrainConfig())",
            "hidden_dim": HIDDEN_DIM, "positive_rate": POSITIVE_RATE, "labels_seed": SEEDS["labels"]}
