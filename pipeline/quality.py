"""The quality benchmark: does AFM keep AUC, against every alternative a user would pick?

For each dataset, model and seed one original is trained to convergence (epochs selected
on a held-out tenth), analysed once (output statistics, spectra, the blocks' measured loss
sensitivity), and every variant is derived from it in memory, paired by seed (same
original, same data order):

    original      the converged model            original_ft  + the fine-tuning budget (the control)
    int8          its tables row-wise int8       afm          AFM factors, no training (tables in
                                                              the format the plan chose)
    afm_ft        + fine-tuned with labels       afm_act_ft   ReLU between factors (shifted to
                                                              start exact), fine-tuned
    afm_distill   + fine-tuned on the original's logits, no labels
    svd, svd_ft   weight SVD at the same ranks   scratch      the low-rank architecture trained
    afm_ft_int8   afm_ft planned and served with int8 tables      from scratch (original + fine-tune steps)

A variant is a :class:`Recipe` over shared steps (start from the original / from bases /
from random weights, fine-tune with labels / a teacher / the full budget, quantize).
Compressed variants are built at each target byte ratio under each rank selection: the
product's rank policies (:mod:`afmrec.pipeline.ranks`, with its defaults: ``auto`` table
format, rows padded for CUDA serving), so every number is what ``afmrec compress --ratio R
--policy P`` gives:

    loss      the default: byte budget, greedy on variance weighted by measured loss
              sensitivity (the probes of ``afmrec stats``, on the validation rows)
    variance  the same greedy on retained variance alone
    uniform   every block the same ratio smaller, the whole model at the target
    full      every block at full rank (a check: ``afm`` must equal ``original``)

Each run is one row (see :data:`COLUMNS`); :func:`paired_summary` gives the paired ΔAUC
(variant minus its own seed's original) per cell and :func:`check_targets` the targets of
the benchmark's issue, both computed on the rows alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow.dataset as pads
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from afmrec.models import CrossNet, ModelConfig, build_model

from .artifacts import fingerprint
from .bases import Bases, Spectrum, afm_bases, spectra, weight_svd_bases
from .blocks import Block, find_blocks
from .compress import CompressConfig, compress_
from .data import FRAPPE_FIELDS, SynthConfig, convert_libfm, list_parts, read_schema, synthesize, write_dataset
from .errors import InputError
from .evaluate import count_parameters, evaluate
from .budget import TableFormat
from .ranks import RankConfig, RankPlan, select_ranks
from .report import write_report
from .sensitivity import SensitivityConfig, measure_sensitivity, sensitivity_weights
from .stages import DataRef, model_config_from_schema
from .stats import collect_statistics
from .train import TrainConfig, TrainResult, seeded, train_

log = logging.getLogger(__name__)

# One row per run; the issue asks for at least dataset, model, variant, rank_selection,
# ratio, bytes, auc, logloss, seed, wall_s.
COLUMNS = (
    "dataset", "model", "variant", "rank_selection", "target_ratio", "ratio", "params", "bytes",
    "bytes_ratio", "table_format", "auc", "logloss", "seed", "wall_s", "steps", "ranks",
)


# --- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """A variant as a small recipe over the shared steps.

    Args:
        name: the variant's name in the table.
        start: ``"original"`` (the trained weights), ``"afm"`` / ``"svd"`` (the original
            compressed with those bases at the cell's ranks), ``"random"`` (the low-rank
            architecture freshly initialised) or ``"source"`` (a copy of ``source``).
        activation: activation between the factors of Linear layers (``"relu"``).
        tune: ``None``; ``"labels"`` / ``"distill"`` (the fine-tuning budget, with labels or
            from the original's logits); ``"full"`` (the original's steps plus the budget).
        table_format: the rank plan's table format (``auto``: the product's default); the
            tables are served (quantized at the end) in the format the plan chose.
        source: the variant ``start="source"`` copies (built earlier in the same cell).
    """

    name: str
    start: str = "original"
    activation: str | None = None
    tune: str | None = None
    table_format: str = "auto"
    source: str | None = None

    def __post_init__(self) -> None:
        if self.start not in ("original", "afm", "svd", "random", "source"):
            raise InputError(f"recipe {self.name}: unknown start {self.start!r}")
        if self.tune not in (None, "labels", "distill", "full"):
            raise InputError(f"recipe {self.name}: unknown tune {self.tune!r}")
        if (self.start == "source") != (self.source is not None):
            raise InputError(f"recipe {self.name}: start='source' goes with a source variant")

    @property
    def compressed(self) -> bool:
        """Whether the variant depends on the ranks (built per target ratio and selection)."""
        return self.start != "original"


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("original"),
        Recipe("original_ft", tune="labels"),
        Recipe("int8", table_format="int8"),
        Recipe("afm", start="afm"),
        Recipe("afm_ft", start="afm", tune="labels"),
        Recipe("afm_act_ft", start="afm", activation="relu", tune="labels"),
        Recipe("afm_distill", start="afm", tune="distill"),
        Recipe("svd", start="svd"),
        Recipe("svd_ft", start="svd", tune="labels"),
        Recipe("scratch", start="random", tune="full"),
        Recipe("afm_ft_int8", start="afm", tune="labels", table_format="int8"),
    )
}
UNCOMPRESSED = tuple(name for name, r in RECIPES.items() if not r.compressed)
COMPRESSED = tuple(name for name, r in RECIPES.items() if r.compressed)
SELECTIONS = ("loss", "variance", "uniform", "full")


@dataclass(frozen=True)
class Splits:
    """The rows one seed's runs use (all as :class:`DataRef`, no copies of a split)."""

    train: DataRef
    finetune: DataRef
    val: DataRef
    test: DataRef


@dataclass(frozen=True)
class Protocol:
    """How models are trained and analysed on one dataset.

    Args:
        embedding_dim: D of every table.
        layers: hidden widths of the top MLP (DLRM, DCN: a Linear to 1 follows) and of
            DeepFM's deep tower.
        batch_size: rows per training step of the original and of ``scratch``.
        finetune_batch_size: rows per fine-tuning step.
        train: the original's training (``seed`` is replaced by the run's seed).
        finetune: every fine-tune, with labels or a teacher (``eval_at_start`` keeps the
            start when no step beats it on the validation rows).
        calibration_rows: training rows the statistics pass runs over.
        sensitivity: the probes behind the global budget's weights (run on the validation
            rows: the loss a truncation costs on rows the model was not fitted to).
        sensitivity_rows: validation rows the probes run over (``None``: all).
        eval_batch_size: rows per evaluation batch.
    """

    embedding_dim: int
    layers: tuple[int, ...]
    batch_size: int
    finetune_batch_size: int
    train: TrainConfig
    finetune: TrainConfig
    calibration_rows: int
    sensitivity: SensitivityConfig = SensitivityConfig()
    sensitivity_rows: int | None = None
    eval_batch_size: int = 8192

    def __post_init__(self) -> None:
        if self.embedding_dim < 1 or self.batch_size < 1 or self.calibration_rows < 1:
            raise InputError("protocol: embedding_dim, batch_size and calibration_rows must be >= 1")


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset of the grid: how to get its splits, how to train on it, what to run.

    Args:
        name: the ``dataset`` column.
        splits: seed -> that seed's :class:`Splits` (prepared on first use).
        protocol: training and analysis settings.
        variants: rank selection -> the compressed variants built under it; the
            uncompressed variants run once per original whatever this says.
        uncompressed: the uncompressed variants to run.
        models: the models run on this dataset (``None``: the grid's).
    """

    name: str
    splits: Callable[[int], Splits]
    protocol: Protocol
    variants: Mapping[str, tuple[str, ...]]
    uncompressed: tuple[str, ...] = UNCOMPRESSED
    models: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for selection, names in self.variants.items():
            if selection not in SELECTIONS:
                raise InputError(f"dataset {self.name}: unknown rank selection {selection!r}")
            unknown = [n for n in names if n not in COMPRESSED]
            if unknown:
                raise InputError(f"dataset {self.name}: unknown compressed variants {unknown}")
            for n in names:
                source = RECIPES[n].source
                if source is not None and source not in names[: names.index(n)]:
                    raise InputError(f"dataset {self.name}: {n} needs {source} before it")
        if any(n not in UNCOMPRESSED for n in self.uncompressed) or "original" not in self.uncompressed:
            raise InputError(f"dataset {self.name}: uncompressed variants must include original")


@dataclass(frozen=True)
class GridConfig:
    """The models, seeds and target ratios run on every dataset."""

    models: tuple[str, ...] = ("dlrm", "dcn", "deepfm")
    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = (3.0, 5.0, 8.0, 16.0, 32.0)
    serve_device: str = "cuda"  # the rank plans' row padding (afmrec compress --serve-device)

    def __post_init__(self) -> None:
        if not self.models or not self.seeds or not self.ratios:
            raise InputError("the grid needs at least one model, seed and ratio")
        if any(r <= 1 for r in self.ratios):
            raise InputError(f"target ratios must be > 1, got {self.ratios}")


# --- data ----------------------------------------------------------------------------------


def frappe_splits(data_dir: Path, work: Path, seed: int, *, max_rows: int | None = None) -> Splits:
    """Frappe as the issue prescribes: train on the published validation split with a
    seeded held-out tenth for early stopping, test on the published test split.

    The libFM files are converted once into ``work`` (never into the repository); each
    seed's rows are a permutation of the validation split (``max_rows``: only its first
    rows), written once, whose first nine tenths train and whose last tenth validates.
    Fine-tuning reuses the training rows (there are no others).
    """
    files = {s: Path(data_dir) / f"frappe.{s}.libfm" for s in ("validation", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"--data {data_dir}: expected the Frappe libFM files {missing}")
    converted = {s: _converted(path, work / "frappe" / s) for s, path in files.items()}
    suffix = f"_rows{max_rows}" if max_rows else ""
    permuted = _permuted(converted["validation"], work / "frappe" / f"validation_seed{seed}{suffix}",
                         seed, max_rows)
    train, val = DataRef(permuted).split(0.1)
    return Splits(train=train, finetune=train, val=val, test=DataRef(converted["test"]))


def _converted(libfm: Path, out: Path) -> Path:
    if not (out / "_dataset.json").is_file():
        convert_libfm([libfm], out, fields=FRAPPE_FIELDS, overwrite=True, progress=False)
    return out


def _permuted(src: Path, out: Path, seed: int, max_rows: int | None) -> Path:
    """``src``'s rows in a seeded random order (the first ``max_rows`` of it), written once."""
    if not (out / "_dataset.json").is_file():
        table = pads.dataset([str(p) for p in list_parts(src)], format="parquet").to_table()
        order = np.random.default_rng(seed).permutation(table.num_rows)[:max_rows]
        write_dataset(table.take(order), read_schema(src), out, overwrite=True)
    return out


def synthetic_splits(config: SynthConfig, work: Path, test_rows: int) -> Splits:
    """Production-shaped synthetic data, generated once into ``work`` (never into the
    repository).

    Its rows are i.i.d., so contiguous ranges are random splits: the original trains on
    the first 80%, fine-tunes see the next 10% (fresh rows: a second pass over the same
    rows overfits the big tables), the last 10% validates.
    """
    out = work / f"synth_{fingerprint([dataclasses.asdict(config), test_rows])[:12]}"
    if not (out / "test" / "_dataset.json").is_file():
        synthesize(config, out, test_rows=test_rows, overwrite=True, progress=False)
    train = DataRef(out / "train")
    return Splits(
        train=DataRef(train.path, 0.0, 0.8),
        finetune=DataRef(train.path, 0.8, 0.9),
        val=DataRef(train.path, 0.9, 1.0),
        test=DataRef(out / "test"),
    )


# --- one trained original and what every variant derives from it --------------------------


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
    config = RankConfig(policy=selection, ratio=target, table_format=table_format,
                        serve_device=serve_device, weights=cell.weights if selection == "loss" else None)
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

    from .export import TABLE_DTYPES

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
    from .evaluate import eval_mode, forward_logits

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


def run_cell(plan: DatasetPlan, grid: GridConfig, cell: Cell) -> list[dict[str, Any]]:
    """Every variant of one original: the uncompressed ones, then each selection and ratio."""
    built: dict[str, nn.Module] = {}
    rows = [measure(RECIPES[n], cell, "none", None, None, built) for n in plan.uncompressed]
    for selection, names in plan.variants.items():
        targets: Sequence[float | None] = [None] if selection == "full" else grid.ratios
        for target in targets:
            built = {}
            for fmt in dict.fromkeys(RECIPES[n].table_format for n in names):
                plan = choose_ranks(cell, selection, target, fmt, grid.serve_device)
                if plan is None:
                    continue
                rows += [measure(RECIPES[n], cell, selection, target, plan, built)
                         for n in names if RECIPES[n].table_format == fmt]
    return rows


def run_grid(
    plans: Sequence[DatasetPlan],
    grid: GridConfig,
    *,
    on_cell: Callable[[Cell, list[dict[str, Any]]], None] | None = None,
    done: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The whole benchmark, one original at a time; ``on_cell`` sees each finished one
    (its cell and every row so far), e.g. to write partial results and plots.

    ``done``: rows of an earlier, interrupted run; their (dataset, model, seed) originals
    are not run again and the rows are kept (cells are independent of each other).
    """
    rows: list[dict[str, Any]] = [dict(r) for r in done]
    finished = {(r["dataset"], r["model"], r["seed"]) for r in rows}
    for plan in plans:
        for arch in plan.models or grid.models:
            for seed in grid.seeds:
                if (plan.name, arch, seed) in finished:
                    continue
                cell = train_original(plan, plan.splits(seed), arch, seed)
                rows += run_cell(plan, grid, cell)
                if on_cell is not None:
                    on_cell(cell, rows)
    return rows


def learning_curve(plan: DatasetPlan, arch: str, seed: int,
                   fractions: Sequence[float] = (0.25, 0.5, 1.0)) -> list[dict[str, Any]]:
    """Test AUC of the converged original trained on growing fractions of the training
    rows (same validation rows): how much AUC more training data would buy."""
    rows = []
    for fraction in fractions:
        full = plan.splits(seed)
        train = DataRef(full.train.path, full.train.start,
                        full.train.start + (full.train.stop - full.train.start) * fraction)
        cell, result = fit_original(plan, dataclasses.replace(full, train=train), arch, seed)
        test = evaluate(cell.original, full.test.batches(plan.protocol.eval_batch_size))
        rows.append({"dataset": plan.name, "model": arch, "seed": seed, "fraction": fraction,
                     "train_rows": train.batches(plan.protocol.batch_size).total_rows,
                     "steps": result.steps, "val_auc": result.best.val_auc,
                     "auc": test.auc, "logloss": test.logloss})
        log.info("%s %s seed %d, %.0f%% of the training rows: test auc %.4f", plan.name, arch,
                 seed, 100 * fraction, test.auc)
    return rows


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path, settings: Mapping[str, Any] | None = None) -> None:
    """The table, as Parquet, atomically (the report's columns first: ``latency_ms`` is
    not measured here, it stays null), ``settings`` in its metadata."""
    write_report(rows, path, overwrite=True, settings=settings)


# --- summaries -----------------------------------------------------------------------------


def _key(row: Mapping[str, Any]) -> tuple:
    return (row["dataset"], row["model"], row["variant"], row["rank_selection"], row["target_ratio"])


def paired_deltas(rows: Iterable[Mapping[str, Any]], reference: str = "original",
                  reference_selection: str | None = "none", metric: str = "auc") -> dict[tuple, dict[int, float]]:
    """``{cell key: {seed: metric - the reference's metric of that seed}}``.

    With ``reference_selection=None`` the reference is the variant ``reference`` in the
    same selection and ratio (e.g. ``afm`` against ``svd``); otherwise the uncompressed
    ``reference`` of the same dataset, model and seed.
    """
    rows = list(rows)
    ref: dict[tuple, float] = {}
    for r in rows:
        if r["variant"] == reference and (reference_selection is None or r["rank_selection"] == reference_selection):
            where = (r["rank_selection"], r["target_ratio"]) if reference_selection is None else ()
            ref[(r["dataset"], r["model"], r["seed"], *where)] = r[metric]
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        where = (r["rank_selection"], r["target_ratio"]) if reference_selection is None else ()
        base = ref.get((r["dataset"], r["model"], r["seed"], *where))
        if base is not None:
            out.setdefault(_key(r), {})[r["seed"]] = r[metric] - base
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per cell (dataset, model, variant, selection, target): seeds, measured ratios, AUC
    and paired ΔAUC against the same seed's original, mean and standard deviation."""
    deltas = paired_deltas(rows)
    loglosses = paired_deltas(rows, metric="logloss")
    cells: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        cells.setdefault(_key(r), []).append(r)
    out = []
    for key, members in cells.items():
        auc, auc_std = _mean_std([m["auc"] for m in members])
        d = list(deltas.get(key, {}).values())
        delta, delta_std = _mean_std(d) if d else (math.nan, math.nan)
        d = list(loglosses.get(key, {}).values())
        delta_ll, delta_ll_std = _mean_std(d) if d else (math.nan, math.nan)
        out.append({
            "dataset": key[0], "model": key[1], "variant": key[2], "rank_selection": key[3],
            "target_ratio": key[4], "seeds": len(members),
            "ratio": statistics.fmean(m["ratio"] for m in members),
            "bytes_ratio": statistics.fmean(m["bytes_ratio"] for m in members),
            "table_format": members[0].get("table_format"),
            "auc": auc, "auc_std": auc_std, "delta_auc": delta, "delta_auc_std": delta_std,
            "delta_logloss": delta_ll, "delta_logloss_std": delta_ll_std,
        })
    return out


def format_delta_table(summary: Sequence[Mapping[str, Any]], dataset: str, selection: str,
                       variants: Sequence[str], ratios: Sequence[float], value: str = "delta_auc") -> str:
    """A Markdown table: one row per (model, variant), one column per target ratio, cells
    ``mean ± std (measured bytes ratio and table format)`` of ``value`` (``"delta_auc"`` or ``"delta_logloss"``,
    paired, or ``"auc"``)."""
    by = {(s["model"], s["variant"], s["target_ratio"]): s for s in summary
          if s["dataset"] == dataset and s["rank_selection"] == selection}
    models = sorted({m for m, _, _ in by}, key=lambda m: ("dlrm", "dcn", "deepfm").index(m) if m in ("dlrm", "dcn", "deepfm") else 9)
    head = "| model | variant | " + " | ".join(f"{r:g}x" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (2 + len(ratios))]
    for m in models:
        for v in variants:
            cells = []
            for r in ratios:
                s = by.get((m, v, r))
                sign = "+" if value.startswith("delta_") else ""
                cells.append("-" if s is None else
                             f"{s[value]:{sign}.4f} ± {s[value + '_std']:.4f} ({s['bytes_ratio']:.1f}x {s['table_format']})")
            if any(c != "-" for c in cells):
                lines.append(f"| {m} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table_ranks(rows: Sequence[Mapping[str, Any]], dataset: str, model: str,
                       selection: str = "loss") -> str:
    """A Markdown table of the rank each embedding table got (mean over seeds; ``whole``
    where the budget kept it), one column per target ratio: where the budget went."""
    chosen: dict[float, list[dict[str, int]]] = {}
    for r in rows:
        if (r["dataset"], r["model"], r["rank_selection"], r["variant"]) == (dataset, model, selection, "afm"):
            chosen.setdefault(r["target_ratio"], []).append(json.loads(r["ranks"]))
    tables = sorted({n for runs in chosen.values() for ranks in runs for n in ranks
                     if ".embedding_bag_collection." in n},
                    key=lambda n: int("".join(c for c in n.rsplit(".", 1)[1] if c.isdigit()) or 0))
    ratios = sorted(chosen)
    lines = ["| table | " + " | ".join(f"{t:g}x" for t in ratios) + " |", "|" + "---|" * (1 + len(ratios))]
    for name in tables:
        cells = []
        for t in ratios:
            ks = [ranks[name] for ranks in chosen[t] if name in ranks]
            cells.append("whole" if not ks else f"{statistics.fmean(ks):.1f}" + ("" if len(ks) == len(chosen[t]) else f" ({len(ks)}/{len(chosen[t])})"))
        lines.append(f"| {name.rsplit('.', 1)[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- targets, judged per dataset and model ---------------------------------------------------


@dataclass(frozen=True)
class TargetResult:
    """One target: whether it is met, and the numbers that say so."""

    name: str
    met: bool
    detail: str


# (variant, target byte ratio or None for "the best cell at >= 16x bytes", ΔAUC floor)
TARGETS = (("afm", 4.0, -0.0005), ("afm_ft", 8.0, -0.001), ("afm_ft_int8", None, -0.001))


def check_targets(rows: Sequence[Mapping[str, Any]], dataset: str, ratios: Sequence[float],
                  selection: str = "loss") -> list[TargetResult]:
    """The quality targets on ``dataset``'s rows, paired by seed, for every model: AFM at
    4x bytes without fine-tuning ΔAUC >= -0.0005; fine-tuned at 8x >= -0.001; fine-tuned
    with int8 tables at >= 16x bytes >= -0.001. Only targets whose ratio the grid ran
    (``ratios``) are judged; a cell the planner refused is a miss."""
    summary = [s for s in paired_summary([r for r in rows if r["dataset"] == dataset])
               if s["rank_selection"] == selection]
    models = sorted({r["model"] for r in rows if r["dataset"] == dataset},
                    key=lambda m: ("dlrm", "dcn", "deepfm").index(m) if m in ("dlrm", "dcn", "deepfm") else 9)
    results = []
    for variant, ratio, floor in TARGETS:
        if (ratio not in ratios) if ratio else max(ratios) < 16:
            continue
        for model in models:
            cells = [s for s in summary if s["model"] == model and s["variant"] == variant
                     and s["target_ratio"] == (ratio or 16.0)]
            name = f"{dataset} {model} {variant} at {f'{ratio:g}x' if ratio else '>= 16x'} bytes: ΔAUC >= {floor:g}"
            if not cells:
                results.append(TargetResult(name, False, "no plan reaches it (the planner refused the target)"))
                continue
            best = max(cells, key=lambda s: s["delta_auc"])
            reached = ratio is not None or best["bytes_ratio"] >= 16
            results.append(TargetResult(
                name, reached and best["delta_auc"] >= floor,
                f"{best['delta_auc']:+.4f} ± {best['delta_auc_std']:.4f} at {best['bytes_ratio']:.2f}x bytes "
                f"({best['table_format']} tables, {best['seeds']} seeds)" + ("" if reached else ": below 16x")))
    return results


# --- spectrum plot -------------------------------------------------------------------------


def plot_spectra(spec: Mapping[str, Spectrum], blocks: Sequence[Block], path: Path, title: str) -> None:
    """Retained variance against rank for every table and Linear layer (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ("table", "linear")):
        for b in blocks:
            ev = spec[b.name].eigenvalues
            if b.kind != kind or b.out_features == 1 or float(ev.sum()) <= 0:
                continue  # nothing to truncate
            retained = (ev.cumsum(0) / ev.sum()).numpy()
            label = b.table if kind == "table" else b.name.removesuffix("._linear")
            ax.plot(np.arange(1, len(retained) + 1), retained, marker=".", ms=3, label=f"{label} ({b.in_features}x{b.out_features})" if kind == "linear" else f"{label} ({b.in_features} rows)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank k")
        ax.set_title("tables" if kind == "table" else "Linear layers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("retained output variance")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the benchmark's grids -----------------------------------------------------------------

# Production-shaped synthetic tables: 10 to 200,000 rows of width 16, so that what AFM buys
# per table size shows; the tables hold 99% of the parameters, the two largest most of them.
SYNTH_TABLE_SIZES = (10, 100, 1_000, 10_000, 50_000, 200_000)

# The variants of the published grid, by rank selection.
PUBLISHED = {"loss": ("afm", "afm_ft", "afm_ft_int8"), "variance": ("afm",), "uniform": ("afm",),
             "full": ("afm",)}
EVERY = {"loss": COMPRESSED, "variance": ("afm",), "uniform": ("afm", "afm_ft", "svd"), "full": ("afm",)}


@dataclass(frozen=True)
class ModelShape:
    """Model widths of a dataset's grid (``None``: the dataset's default).

    Args:
        embedding_dim: D of every table.
        layers: hidden widths of the top MLP / DeepFM's deep tower.
    """

    embedding_dim: int | None = None
    layers: tuple[int, ...] | None = None

    def apply(self, protocol: Protocol) -> Protocol:
        changes = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return dataclasses.replace(protocol, **changes)


def _protocol(small: bool, *, embedding_dim: int, layers: tuple[int, ...], batch_size: int = 256,
              epochs: int = 30, sensitivity_rows: int | None = None) -> Protocol:
    """Training to convergence (early stopping on the validation rows, epochs a maximum)
    and a fine-tuning budget of one pass; ``small``: the same code on a few steps."""
    return Protocol(
        embedding_dim=embedding_dim,
        layers=(32, 16) if small else layers,
        batch_size=batch_size if not small else 256,
        finetune_batch_size=512 if small else 2 * batch_size,
        train=TrainConfig(epochs=2 if small else epochs, eval_every=100, patience=4, dense_lr=1e-3,
                          sparse_lr=0.2, weight_decay=1e-4),
        finetune=TrainConfig(epochs=1, max_steps=20 if small else None, eval_every=25, patience=2,
                             eval_at_start=True, dense_lr=1e-4, sparse_lr=0.02, weight_decay=1e-4),
        calibration_rows=65_536,
        sensitivity_rows=sensitivity_rows,
    )


def parquet_splits(path: Path) -> Splits:
    """A converted dataset: ``train``/``val``/``test`` folders (as ``afmrec convert``
    writes them), ``train``/``test`` (validation: the last tenth of train), or one dataset
    (80/10/10 by row order). Fine-tuning reuses the training rows."""
    path = Path(path)
    has = {name: (path / name / "_dataset.json").is_file() for name in ("train", "val", "test")}
    if has["train"] and has["test"]:
        train = DataRef(path / "train")
        val = DataRef(path / "val") if has["val"] else None
        if val is None:
            train, val = train.split(0.1)
        return Splits(train=train, finetune=train, val=val, test=DataRef(path / "test"))
    if not (path / "_dataset.json").is_file():
        raise InputError(f"--data {path}: not a converted dataset (no _dataset.json, nor train/ and test/)")
    whole = DataRef(path)
    rest, test = whole.split(0.1)
    train, val = rest.split(1 / 9)
    return Splits(train=train, finetune=train, val=val, test=test)


def dataset_plan(spec: str, work: Path, *, small: bool = False, shape: ModelShape = ModelShape(),
                 variants: Mapping[str, tuple[str, ...]] | None = None) -> DatasetPlan:
    """One dataset of the grid from ``--data``: ``synth`` (production-shaped synthetic
    data, table-dominated: width-16 tables of up to 10^6 rows), a folder of Frappe's libFM
    files, a folder of MovieLens-1M's ``.dat`` files (converted into ``work``), or any
    converted Parquet dataset (:func:`parquet_splits`); named after the folder."""
    variants = variants or (EVERY if small else PUBLISHED)
    if spec == "synth":
        protocol = Protocol(
            embedding_dim=16,
            layers=(32, 16) if small else (256, 128),
            batch_size=512 if small else 2048,
            finetune_batch_size=512 if small else 2048,
            train=TrainConfig(epochs=1, eval_every=25, patience=3, dense_lr=1e-3, sparse_lr=0.1),
            finetune=TrainConfig(epochs=1, eval_every=5, patience=2, eval_at_start=True,
                                 dense_lr=1e-4, sparse_lr=0.02),
            calibration_rows=65_536,
            sensitivity_rows=16_384,
        )
        config = SynthConfig(num_rows=10_000 if small else 300_000,
                             table_sizes=(10, 100, 1_000, 5_000) if small else SYNTH_TABLE_SIZES, seed=0)
        return DatasetPlan("synth", lambda seed: synthetic_splits(config, work, 2_000 if small else 50_000),
                           shape.apply(protocol), variants)
    path = Path(spec)
    if not path.is_dir():
        raise InputError(f"--data {spec}: not a folder (nor 'synth')")
    if (path / "frappe.validation.libfm").is_file():
        protocol = _protocol(small, embedding_dim=16 if small else 10, layers=(400, 400, 400))
        return DatasetPlan("frappe", lambda seed: frappe_splits(path, work, seed, max_rows=4_000 if small else None),
                           shape.apply(protocol), variants)
    if any(path.glob("ratings.dat*")) and (path / "movies.dat").is_file():
        from .data import convert_movielens

        converted = work / "movielens1m"
        if not (converted / "test" / "_dataset.json").is_file():
            convert_movielens(path, converted, overwrite=True, progress=False)
        path, name = converted, "movielens1m"
    else:
        name = path.name
    protocol = _protocol(small, embedding_dim=16, layers=(256, 128), batch_size=1024,
                         sensitivity_rows=16_384)
    splits = parquet_splits(path)
    return DatasetPlan(name, lambda seed: splits, shape.apply(protocol), variants)


def default_grid(small: bool = False) -> GridConfig:
    """The published grid (three models, three seeds; 4x, 8x, 16x bytes), or ``small``:
    one seed and one ratio (a test runs it in a few minutes on 2 cores)."""
    return GridConfig(seeds=(0,), ratios=(4.0,)) if small else GridConfig(ratios=(4.0, 8.0, 16.0))
