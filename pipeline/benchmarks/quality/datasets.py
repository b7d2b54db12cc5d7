"""The datasets of the quality benchmark: their splits, their protocols, the grid.

:func:`dataset_plan` makes one dataset of the grid from ``--data`` (Frappe, MovieLens-1M,
any converted dataset, or production-shaped synthetic data); converted and generated
data go into a work folder, never into the repository. :func:`default_grid` is the
published grid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow.dataset as pads

from afmrec.pipeline.artifacts import fingerprint
from afmrec.pipeline.data import (FRAPPE_FIELDS, SynthConfig, convert_libfm, list_parts, read_schema,
                                  synthesize, write_dataset)
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.stages import DataRef
from afmrec.pipeline.train import TrainConfig

from .config import COMPRESSED, DatasetPlan, GridConfig, Protocol, Splits


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


# --- the benchmark's grids -----------------------------------------------------------------

# Production-shaped synthetic tables: 10 to 200,000 rows of width 16, so that what AFM buys
# per table size shows; the tables hold 99% of the parameters, the two largest most of them.
SYNTH_TABLE_SIZES = (10, 100, 1_000, 10_000, 50_000, 200_000)

# The variants of the published grid, by rank selection.
PUBLISHED = {"loss": ("afm", "afm_ft", "afm_ft_int8"), "loss_dense": ("afm", "afm_ft"), "variance": ("afm",),
             "uniform": ("afm",), "full": ("afm",)}
EVERY = {"loss": COMPRESSED, "loss_dense": ("afm",), "variance": ("afm",), "uniform": ("afm", "afm_ft", "svd"),
         "full": ("afm",)}


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
        from afmrec.pipeline.data import convert_movielens

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
