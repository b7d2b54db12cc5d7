"""One trained original of the quality benchmark, and every variant built from it.

A :class:`Cell` is one original (dataset, model, seed), trained to convergence and
analysed once (statistics, spectra, loss sensitivity); :func:`measure` builds one variant
from it by its :class:`~.config.Recipe` (start, fine-tune, quantize) and evaluates it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from afmrec.models import CrossNet, ModelConfig, build_model
from afmrec.pipeline.bases import Bases, Spectrum, afm_bases, spectra, weight_svd_bases
from afmrec.pipeline.blocks import Block, find_blocks
from afmrec.pipeline.budget import TableFormat
from afmrec.pipeline.compress import CompressConfig, compress_
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.evaluate import count_parameters, evaluate
from afmrec.pipeline.ranks import RankConfig, RankPlan, select_ranks
from afmrec.pipeline.sensitivity import measure_sensitivity, sensitivity_weights
from afmrec.pipeline.stages import DataRef, model_config_from_schema
from afmrec.pipeline.stats import collect_statistics
from afmrec.pipeline.train import TrainResult, seeded, train_

from .config import DENSE_SELECTIONS, DatasetPlan, Protocol, Recipe, Splits

log = logging.getLogger(__name__)


@dataclass
class Cell:
    """One original (dataset, model, seed) and its analysis, shared by all its variants."""

    dataset: str
    arch: str
    seed: int
    splits: Splits
    protocol: Protocol
    config: ModelConfig
    original: nn.Module
    train_steps: int
    blocks: list[Block]
    other_params: int
    spectra: dict[str, Spectrum]
    weights: dict[str, float]
    val: list[Batch]
    test: list[Batch]
    params: int = 0
    calibration: list[Batch] = field(default_factory=list)  # the statistics pass's rows (analyse_)

    @property
    def finetune_steps(self) -> int:
        batches = len(self.finetune_batches())
        steps = batches * self.protocol.finetune.epochs
        limit = self.protocol.finetune.max_steps
        return min(steps, limit) if limit is not None else steps

    def _batches(self, data: DataRef, batch_size: int) -> Any:
        return data.batches(batch_size, shuffle=True, seed=self.seed, drop_last=True)

    def train_batches(self) -> Any:
        return self._batches(self.splits.train, self.protocol.batch_size)

    def finetune_batches(self) -> Any:
        return self._batches(self.splits.finetune, self.protocol.finetune_batch_size)


def model_config(data: DataRef, arch: str, protocol: Protocol) -> ModelConfig:
    """The model for a dataset. Without dense features the bottom MLP would map an empty
    input to a constant through two layers; one layer (D biases) is the same function
    without parameters that would inflate every compression ratio."""
    schema = data.schema()
    d = protocol.embedding_dim
    extra = {"dense_arch": (d,)} if not schema.dense else {}
    return model_config_from_schema(schema, arch, embedding_dim=d, over_arch=(*protocol.layers, 1),
                                    deep_arch=protocol.layers, **extra)


def fit_original(plan: DatasetPlan, splits: Splits, arch: str, seed: int) -> tuple[Cell, TrainResult]:
    """Builds and trains the original to convergence (epochs selected on ``splits.val``)."""
    p = plan.protocol
    config = model_config(splits.train, arch, p)
    with seeded(seed):
        model = build_model(config)
    val = list(splits.val.batches(p.eval_batch_size))
    cell = Cell(plan.name, arch, seed, splits, p, config, model, 0, [], 0, {}, {}, val, [])
    result = train_(model, cell.train_batches(), dataclasses.replace(p.train, seed=seed),
                    val_batches=val, progress=False)
    cell.train_steps = result.steps
    return cell, result


def train_original(plan: DatasetPlan, splits: Splits, arch: str, seed: int) -> Cell:
    """Trains the original to convergence and analyses it (statistics, spectra, sensitivity)."""
    p = plan.protocol
    cell, result = fit_original(plan, splits, arch, seed)
    model = cell.original
    log.info("%s %s seed %d: original trained %d steps, best val auc %.4f logloss %.4f (step %d)",
             plan.name, arch, seed, result.steps, result.best.val_auc, result.best.val_logloss,
             result.best.step)
    cell.test = list(splits.test.batches(p.eval_batch_size))
    cell.params = count_parameters(model)
    analyse_(cell)
    return cell


def analyse_(cell: Cell) -> None:
    """Blocks, output spectra over the calibration rows, and loss-sensitivity weights."""
    p = cell.protocol
    cell.blocks = find_blocks(cell.original)
    cell.other_params = cell.params - sum(b.params for b in cell.blocks)
    # read once: activation variants are calibrated on the same rows
    cell.calibration = list(cell.splits.train.batches(p.eval_batch_size, limit_rows=p.calibration_rows))
    cell.spectra = spectra(collect_statistics(cell.original, cell.blocks, cell.calibration))
    rows = p.sensitivity_rows
    val = cell.val if rows is None else list(cell.splits.val.batches(p.eval_batch_size, limit_rows=rows))
    probes = measure_sensitivity(cell.original, cell.blocks, cell.spectra, val, p.sensitivity)
    cell.weights = sensitivity_weights(probes, p.sensitivity.floor)


# --- rank selection ------------------------------------------------------------------------


def choose_ranks(cell: Cell, selection: str, target: float | None,
                 table_format: str = "auto", serve_device: str = "cuda") -> RankPlan | None:
    """The product's rank plan for one selection, target ratio and table format; ``None``
    where the planner refuses the target (its reason is logged)."""
    if selection == "full":
        full = {b.name: b.out_features for b in cell.blocks}
        return RankPlan.of(cell.blocks, full, TableFormat("fp32"), cell.other_params)
    policy = DENSE_SELECTIONS.get(selection, selection)
    dense = target if selection in DENSE_SELECTIONS else None
    config = RankConfig(policy=policy, ratio=target, table_format=table_format, serve_device=serve_device,
                        dense_ratio=dense, weights=cell.weights if policy == "loss" else None)
    try:
        return select_ranks(cell.blocks, cell.spectra, config, other_params=cell.other_params)
    except InputError as e:
        log.info("%s %s seed %d %s %gx %s: %s", cell.dataset, cell.arch, cell.seed, selection, target,
                 table_format, e)
        return None


# --- building variants --------------------------------------------------------------------


def scratch_model(cell: Cell, ranks: Mapping[str, int]) -> nn.Module:
    """The compressed architecture at ``ranks`` with fresh random weights."""
    with seeded(cell.seed):
        model = build_model(cell.config)
        compress_(model, Bases.placeholders(find_blocks(model), ranks), CompressConfig())
        for module in model.modules():
            if isinstance(module, (EmbeddingBagCollection, nn.Linear)):
                module.reset_parameters()
        for module in model.modules():
            if isinstance(module, CrossNet):  # TorchRec's cross-layer initialisation
                module.reset_parameters()
    return model


def quantize_tables_(model: nn.Module, dtype: str) -> nn.Module:
    """Swaps every ``EmbeddingBagCollection`` for TorchRec's quantized one in ``dtype``
    (``fp16``, ``int8``; ``fp32``: left as it is), in place. Rows are unpadded, as the CPU
    kernels that run the benchmark take them; the bytes a variant reports are its plan's,
    padded for the serving device."""
    if dtype == "fp32":
        return model
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

    from afmrec.pipeline.export import TABLE_DTYPES

    quant_prep_customize_row_alignment(model, [EmbeddingBagCollection], 1)
    return quantize_embeddings(model, dtype=TABLE_DTYPES[dtype], inplace=True)


def _relu_factors(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """``(first, second)`` of every ``second(relu(first(x)))`` that compression made: a
    ``LowRankLinear`` with a ReLU, and a fused cross layer (``down = relu(first)``, whose
    ``up`` absorbed the second factor)."""
    from afmrec.models import CrossLayer, LowRankLinear

    pairs = []
    for m in model.modules():
        if isinstance(m, LowRankLinear) and isinstance(m.activation, nn.ReLU):
            pairs.append((m.first, m.second))
        elif isinstance(m, CrossLayer) and isinstance(m.down, nn.Sequential) and isinstance(m.down[-1], nn.ReLU):
            pairs.append((m.down[0], m.up))
    return pairs


def shift_activations_(model: nn.Module, batches: Iterable[Batch]) -> nn.Module:
    """Makes the activations between factors start as the identity on ``batches``.

    ``W2 relu(z)`` with ``z = W1 x + b1`` drops every negative code, so a model compressed
    with an activation starts far from the original (a rank-1 layer can output a constant)
    and a short fine-tune does not recover. Shifting each code by ``s = max(0, -min z)``
    over the calibration rows (``b1 += s``, ``b2 -= W2 s``) keeps every calibration code in
    ReLU's linear range: the model starts as the exact factorisation and fine-tuning can
    use the non-linearity.
    """
    pairs = _relu_factors(model)
    batches = list(batches)
    # A layer's codes are right only once the layers before it are shifted: one pass per
    # depth level, each shifting by what is still below zero.
    for _ in range(len(pairs) + 1):
        lows = _code_minima(model, [first for first, _ in pairs], batches)
        shifts = [(-low).clamp_min(0) for low in lows]
        if not any(bool(s.any()) for s in shifts):
            break
        with torch.no_grad():
            for (first, second), shift in zip(pairs, shifts):
                first.bias += shift
                second.bias -= second.weight @ shift
    return model


def _code_minima(model: nn.Module, firsts: Sequence[nn.Linear], batches: Iterable[Batch]) -> list[torch.Tensor]:
    """Per first factor, the smallest value of each of its codes over ``batches``."""
    from afmrec.pipeline.evaluate import eval_mode, forward_logits

    lows = [torch.full((f.out_features,), math.inf) for f in firsts]

    def hook(low: torch.Tensor):
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            torch.minimum(low, output.detach().reshape(-1, output.shape[-1]).amin(0), out=low)
        return record

    handles = [f.register_forward_hook(hook(low)) for f, low in zip(firsts, lows)]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                forward_logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    return lows


def _start(recipe: Recipe, cell: Cell, ranks: Mapping[str, int] | None, built: Mapping[str, nn.Module]) -> nn.Module:
    if recipe.start == "original":
        return copy.deepcopy(cell.original)
    if recipe.start == "source":
        return copy.deepcopy(built[recipe.source])
    assert ranks is not None
    if recipe.start == "random":
        return scratch_model(cell, ranks)
    if recipe.start == "afm":
        bases = afm_bases(cell.spectra, ranks)
    else:
        bases = weight_svd_bases(cell.original, cell.blocks, ranks)
    model = compress_(copy.deepcopy(cell.original), bases, CompressConfig(activation=recipe.activation))
    if recipe.activation is not None:
        shift_activations_(model, cell.calibration)
    return model


def _tune_(recipe: Recipe, cell: Cell, model: nn.Module) -> int:
    """Trains per the recipe; returns the optimizer steps taken."""
    if recipe.tune is None:
        return 0
    p = cell.protocol
    teacher = None
    if recipe.tune == "full":
        config = dataclasses.replace(p.train, seed=cell.seed, max_steps=cell.train_steps + cell.finetune_steps)
        batches = cell.train_batches()
    else:
        config = dataclasses.replace(p.finetune, seed=cell.seed)
        batches = cell.finetune_batches()
        teacher = cell.original.eval() if recipe.tune == "distill" else None
    result = train_(model, batches, config, val_batches=cell.val, teacher=teacher, progress=False)
    log.debug("%s: %d steps, kept step %d (val auc %.4f logloss %.4f)", recipe.name, result.steps,
              result.best.step, result.best.val_auc, result.best.val_logloss)
    return result.steps


def uncompressed_plan(cell: Cell, recipe: Recipe) -> RankPlan:
    """An uncompressed variant's bytes: every block whole, tables in the recipe's format."""
    dtype = "fp32" if recipe.table_format == "auto" else recipe.table_format
    return RankPlan.of(cell.blocks, {}, TableFormat(dtype), cell.other_params)


def build_variant(
    recipe: Recipe, cell: Cell, plan: RankPlan, built: Mapping[str, nn.Module]
) -> tuple[nn.Module, int, int]:
    """Runs a recipe: ``(model, parameters before quantization, training steps)``; the
    tables end in the plan's format."""
    model = _start(recipe, cell, plan.ranks if recipe.compressed else None, built)
    steps = _tune_(recipe, cell, model)
    params = count_parameters(model)
    model = quantize_tables_(model, plan.table_format.dtype)
    return model, params, steps


def measure(
    recipe: Recipe, cell: Cell, selection: str, target: float | None,
    plan: RankPlan | None, built: dict[str, nn.Module],
) -> dict[str, Any]:
    """Builds one variant, evaluates it on the test rows, and returns its row (bytes: the
    plan's, tables in its format, rows padded for the serving device)."""
    start = time.perf_counter()
    plan = plan or uncompressed_plan(cell, recipe)
    model, params, steps = build_variant(recipe, cell, plan, built)
    built[recipe.name] = model
    result = evaluate(model, cell.test)
    ranks = plan.ranks if recipe.compressed else None
    row = {
        "dataset": cell.dataset, "model": cell.arch, "variant": recipe.name,
        "rank_selection": selection, "target_ratio": target, "ratio": cell.params / params,
        "params": params, "bytes": plan.bytes, "bytes_ratio": plan.ratio,
        "table_format": plan.table_format.dtype, "serve_device": plan.table_format.serve_device,
        "auc": result.auc,
        "logloss": result.logloss, "latency_ms": None, "seed": cell.seed,
        "wall_s": time.perf_counter() - start, "steps": steps,
        "ranks": json.dumps(dict(sorted(ranks.items()))) if ranks is not None else None,
    }
    log.info("%s %s seed %d %-8s %5s %-12s ratio %6.2fx bytes %6.2fx auc %.4f logloss %.4f  %.1fs",
             cell.dataset, cell.arch, cell.seed, selection, f"{target:g}x" if target else "-",
             recipe.name, row["ratio"], row["bytes_ratio"], row["auc"], row["logloss"], row["wall_s"])
    return row
