"""What the quality benchmark runs: the variants' recipes, the grid, the protocol.

Each run is one row of :data:`COLUMNS`; a variant is a :class:`Recipe`; a dataset is a
:class:`DatasetPlan` (its splits, its training :class:`Protocol`, the variants of each
rank selection); :class:`GridConfig` holds the models, seeds and ratios of every dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from afmrec.pipeline.errors import InputError
from afmrec.pipeline.sensitivity import SensitivityConfig
from afmrec.pipeline.stages import DataRef
from afmrec.pipeline.train import TrainConfig

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
SELECTIONS = ("loss", "loss_dense", "variance", "uniform", "full")
DENSE_SELECTIONS = {"loss_dense": "loss"}
"""Selections that also give the Linear layers a budget of their own at the target ratio
(``afmrec compress --ratio R --dense-ratio R``): name -> policy."""


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
