"""The passes of a conversion with vocabularies, whatever the input format.

A format supplies its rows as :class:`RawBlock` s (labels, dense values, categorical
strings) from a function that can be called once per pass; this module does the rest:

1. count the rows (and read the split order, a time column, if any) and assign each row
   to the train, validation or test part (:class:`~.splits.SplitConfig`);
2. count the values of every categorical field in the training rows and build the
   vocabularies (:mod:`.vocab`);
3. map every row's values to table rows and write the parts and ``vocab.parquet``
   (:func:`~.splits.create_split_datasets`).

:func:`apply_vocabularies` maps new rows (test data, later days) with saved vocabularies
into one dataset, in a single pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from ..errors import InputError
from .schema import DataSchema, SparseField, create_dataset
from .splits import PARTS, SplitConfig, create_split_datasets
from .vocab import VOCAB_FILE, VocabConfig, VocabCounter, Vocabulary, save_vocabularies


@dataclass
class RawBlock:
    """Parsed rows of one block of input, before their values are mapped to ids.

    Attributes:
        source: where the rows come from (a path), for ``_dataset.json`` errors.
        label: (B,) int8 labels, 0 or 1.
        dense: (B,) float32 values of each dense column, by name.
        categorical: each categorical field's values by name: a string array, or a
            ``list<string>`` array (a bag per row) for a multi-hot field.
        order: (B,) the split order's key of each row (a timestamp), or ``None``.
    """

    source: str
    label: np.ndarray
    dense: dict[str, np.ndarray]
    categorical: dict[str, pa.Array]
    order: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.label)

    def select(self, mask: np.ndarray) -> "RawBlock":
        """The rows where ``mask`` is true."""
        keep = pa.array(mask)
        return RawBlock(
            self.source,
            self.label[mask],
            {k: v[mask] for k, v in self.dense.items()},
            {k: v.filter(keep) for k, v in self.categorical.items()},
            None if self.order is None else self.order[mask],
        )

    def encode(self, schema: DataSchema, vocabularies: Mapping[str, Vocabulary]) -> pa.Table:
        """The rows as a table of ``schema``: categorical values mapped to table rows."""
        columns: dict[str, Any] = {schema.label: pa.array(self.label, pa.int8())}
        columns |= {name: pa.array(self.dense[name], pa.float32()) for name in schema.dense}
        columns |= {f.name: vocabularies[f.name].encode(self.categorical[f.name]) for f in schema.sparse}
        return pa.table(columns)


# One call is one pass over the input: desc names the pass for the progress bar.
BlockSource = Callable[[str], Iterator[RawBlock]]


@dataclass(frozen=True)
class Fields:
    """The columns of a conversion: label name, dense names, categorical fields.

    Attributes:
        label: the label column's name in the datasets.
        dense: the dense columns' names, in order.
        multi_hot: every categorical field's name (in order) and whether it is multi-hot.
    """

    label: str
    dense: tuple[str, ...]
    multi_hot: dict[str, bool] = field(default_factory=dict)

    def schema(self, vocabularies: Mapping[str, Vocabulary]) -> DataSchema:
        sparse = tuple(SparseField(name, vocabularies[name].num_embeddings, multi_hot)
                       for name, multi_hot in self.multi_hot.items())
        return DataSchema(dense=self.dense, sparse=sparse, label=self.label)


def convert_with_vocabularies(
    blocks: BlockSource,
    out: Path,
    fields: Fields,
    *,
    split: SplitConfig,
    vocab: VocabConfig,
    order_name: str,
    info: dict[str, Any],
    recipe: dict[str, Any],
    overwrite: bool = False,
) -> dict[str, Path]:
    """Runs the three passes (see the module) and writes ``out``.

    Args:
        blocks: the input's rows, once per call.
        out: the folder of the parts and vocabularies.
        fields: the columns.
        split: the validation and test fractions.
        vocab: the vocabularies' settings.
        order_name: what the split order is (``"rows"`` or the time column), for the record.
        info: entries for every part's ``_dataset.json``; ``info["source"]["inputs"]``
            names the input files.
        recipe: the conversion's settings, saved with the vocabularies.
        overwrite: replace an existing ``out``.

    Returns:
        The dataset folder of each part written, by part name.
    """
    vocab.check_fields(fields.multi_hot)
    num_rows, orders = 0, []
    for block in blocks("scan"):
        num_rows += block.num_rows
        if block.order is not None:
            orders.append(block.order)
    if num_rows == 0:
        raise InputError(f"{_inputs(info)}: no data rows")
    part_of = split.part_of_rows(num_rows, np.concatenate(orders) if orders else None)
    del orders
    sizes = split.sizes(num_rows)
    counters = {name: VocabCounter(name, multi_hot) for name, multi_hot in fields.multi_hot.items()}
    for block, parts in _with_parts(blocks("vocabularies"), part_of):
        train = block.select(parts == 0)
        for name, counter in counters.items():
            counter.add(train.categorical[name])
    vocabularies = {name: c.build(vocab.for_field(name)) for name, c in counters.items()}
    schema = fields.schema(vocabularies)
    with create_split_datasets(schema, out, list(sizes), overwrite=overwrite) as output:
        for block, parts in _with_parts(blocks("write"), part_of):
            for index, name in enumerate(PARTS):
                if name in sizes and np.any(parts == index):
                    output.writers[name].write(block.select(parts == index).encode(schema, vocabularies),
                                               source=block.source)
        for name, writer in output.writers.items():
            writer.info.update(info, part=name, split=split.describe(order_name),
                               vocabulary=f"../{VOCAB_FILE}")
        save_vocabularies(output.folder / VOCAB_FILE, vocabularies.values(), recipe=recipe)
    return {name: out / name for name in PARTS if name in sizes}


def _inputs(info: Mapping[str, Any]) -> str:
    """The input files named by ``info["source"]["inputs"]``, for an error message."""
    return ", ".join(info["source"]["inputs"])


def _with_parts(blocks: Iterator[RawBlock], part_of: np.ndarray) -> Iterator[tuple[RawBlock, np.ndarray]]:
    """Each block with the part of each of its rows."""
    start = 0
    for block in blocks:
        stop = start + block.num_rows
        if stop > len(part_of):
            raise InputError(f"{block.source}: the input changed while being converted")
        yield block, part_of[start:stop]
        start = stop


def apply_vocabularies(
    blocks: BlockSource,
    out: Path,
    fields: Fields,
    vocabularies: Mapping[str, Vocabulary],
    *,
    info: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Maps every row of ``blocks`` with saved ``vocabularies`` into one dataset ``out``."""
    missing = [name for name in fields.multi_hot if name not in vocabularies]
    if missing:
        raise InputError(f"the vocabulary file has no vocabulary for field(s) {missing}")
    schema = fields.schema(vocabularies)
    with create_dataset(schema, out, overwrite=overwrite) as writer:
        for block in blocks("write"):
            writer.write(block.encode(schema, vocabularies), source=block.source)
        if writer.num_rows == 0:
            raise InputError(f"{_inputs(info)}: no data rows")
        writer.info.update(info)
    return out
