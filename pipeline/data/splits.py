"""Train / validation / test splits of a conversion, and the folder that holds them.

A conversion that builds vocabularies writes one folder ``OUT`` holding the datasets
``OUT/train``, ``OUT/val`` and ``OUT/test`` (a part whose fraction is 0 is left out) and the
vocabularies ``OUT/vocab.parquet`` (see :mod:`.vocab`). The folder appears only when all of
it is complete (:func:`~afmrec.pipeline.artifacts.atomic_dir`).

Rows are split in an order (the file's, or by a time column, ties kept in file order):
the last ``test_fraction`` of the rows are the test part, the ``val_fraction`` before them
the validation part, the rest the training part.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..artifacts import atomic_dir
from ..errors import InputError
from .schema import DataSchema, DatasetWriter, create_dataset

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of the rows held out, the last ones in the split order.

    Args:
        val_fraction: the validation part, just before the test part.
        test_fraction: the test part, the last rows.
    """

    val_fraction: float = 0.1
    test_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value < 1):
                raise InputError(f"{name} must be in [0, 1), got {value!r}")
        if self.val_fraction + self.test_fraction >= 1:
            raise InputError(
                f"val_fraction + test_fraction must be < 1 (some rows must train), got "
                f"{self.val_fraction} + {self.test_fraction}"
            )

    def sizes(self, num_rows: int) -> dict[str, int]:
        """Rows of each part: test ``round(n * test_fraction)``, validation
        ``round(n * val_fraction)``, training the rest; parts of 0 rows are left out.

        Raises:
            InputError: a part with a non-zero fraction would get no row, or training would.
        """
        test = round(num_rows * self.test_fraction)
        val = round(num_rows * self.val_fraction)
        sizes = {"train": num_rows - val - test, "val": val, "test": test}
        fractions = {"train": 1.0, "val": self.val_fraction, "test": self.test_fraction}
        empty = [name for name in PARTS if fractions[name] > 0 and sizes[name] <= 0]
        if empty:
            raise InputError(f"{num_rows} rows are too few to split: no row for {empty}")
        return {name: n for name, n in sizes.items() if n > 0}

    def part_of_rows(self, num_rows: int, order: np.ndarray | None = None) -> np.ndarray:
        """The part (index into :data:`PARTS`) of every row, (num_rows,) int8.

        Args:
            num_rows: rows to split.
            order: a sort key of each row (a timestamp); ``None``: the rows' own order.
        """
        sizes = self.sizes(num_rows)
        bounds = np.cumsum([sizes.get(name, 0) for name in PARTS])[:-1]
        if order is None:
            position = np.arange(num_rows)
        else:
            position = np.empty(num_rows, dtype=np.int64)
            position[np.argsort(order, kind="stable")] = np.arange(num_rows)
        return np.searchsorted(bounds, position, side="right").astype(np.int8)

    def describe(self, order: str) -> dict[str, object]:
        """What ``_dataset.json`` records of the split."""
        return {"order": order, "val_fraction": self.val_fraction,
                "test_fraction": self.test_fraction}


@dataclass
class SplitOutput:
    """The parts being written: a :class:`DatasetWriter` per part, and the folder (a
    temporary name until the block ends) where the vocabularies go."""

    folder: Path
    writers: dict[str, DatasetWriter]


@contextlib.contextmanager
def create_split_datasets(
    schema: DataSchema, out: str | Path, parts: Iterator[str] | list[str], *, overwrite: bool = False
) -> Iterator[SplitOutput]:
    """Writes ``out/<part>`` for each of ``parts``, atomically as one folder.

    Raises:
        InputError: ``out`` exists and not ``overwrite``; a part ends with no row.
    """
    with atomic_dir(Path(out), overwrite=overwrite) as tmp, contextlib.ExitStack() as stack:
        writers = {name: stack.enter_context(create_dataset(schema, tmp / name)) for name in parts}
        yield SplitOutput(tmp, writers)
