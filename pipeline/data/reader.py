"""Batches of TorchRec ``Batch`` read from a Parquet dataset, split across ranks."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from ..errors import InputError
from .schema import DataSchema, conform_table, list_parts, read_schema

# Rows are shuffled within windows of this many row groups (plus the rows a window leaves
# over for the next one): memory stays bounded by a few row groups, whatever the dataset.
SHUFFLE_WINDOW_ROW_GROUPS = 4


def make_batch(table: pa.Table, schema: DataSchema) -> Batch:
    """Converts rows of a dataset into a TorchRec ``Batch``, without a loop over rows.

    Args:
        table: B rows with the columns of ``schema`` (as stored, see
            :meth:`DataSchema.arrow_schema`).
        schema: the dataset schema.

    Returns:
        ``Batch`` with ``dense_features`` (B, N) float32, ``labels`` (B,) float32 and
        ``sparse_features`` a ``KeyedJaggedTensor`` keyed by the sparse field names in schema
        order: int64 values and int32 lengths (1 per row for one-hot fields, the bag size,
        possibly 0, for multi-hot ones).

    Example::

        batch = make_batch(pa.table({"label": [1], "C1": [3]}),
                           DataSchema((), (SparseField("C1", 10),)))
    """
    num_rows = table.num_rows
    dense = np.empty((num_rows, len(schema.dense)), dtype=np.float32)
    for j, name in enumerate(schema.dense):
        dense[:, j] = table.column(name).to_numpy()
    labels = table.column(schema.label).to_numpy().astype(np.float32)
    # KeyedJaggedTensor's layout is key-major: all rows of field 0, then of field 1...
    values, lengths = [], []
    for field in schema.sparse:
        column = table.column(field.name)
        if field.multi_hot:
            bags = column.combine_chunks()
            values.append(bags.flatten().to_numpy())
            lengths.append(pc.list_value_length(bags).to_numpy())
        else:
            values.append(column.to_numpy())
            lengths.append(np.ones(num_rows, dtype=np.int32))
    # What KeyedJaggedTensor.from_lengths_sync builds, with the ids per key counted here:
    # its own count is a threaded torch reduction that stalls for ~15 ms a batch when the
    # CPU cores are busy (as they are during training), halving the reading rate.
    length_per_key = [len(v) for v in values]
    sparse = KeyedJaggedTensor(
        keys=[f.name for f in schema.sparse],
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
        length_per_key=length_per_key,
        offset_per_key=[0, *itertools.accumulate(length_per_key)],
    )
    return Batch(
        dense_features=torch.from_numpy(dense),
        sparse_features=sparse,
        labels=torch.from_numpy(labels),
    )


@dataclass(frozen=True)
class _Piece:
    """The rows ``[offset, offset + num_rows)`` of one row group that a rank reads."""

    row_group: ds.ParquetFileFragment
    source: str
    offset: int
    num_rows: int


class ParquetBatches:
    """Iterates over a rank's share of a Parquet dataset in TorchRec ``Batch`` es.

    The dataset's rows, in part order then row order, are selected by ``row_range`` and
    ``limit_rows``, then split into ``world_size`` contiguous ranges whose sizes differ by
    at most one row; rank ``r`` reads only the row groups that overlap range ``r``. Every
    row group read is validated against the schema (:func:`validate_table`), and its
    page checksums, where the part has them, are verified.

    Batch counts: every rank yields the same number of batches, as a sharded model needs
    (each forward is a collective). With ``drop_last`` they are full batches,
    ``(total_rows // world_size) // batch_size`` of them, and the rows beyond are skipped
    (for training: equal steps of equal size). Without it every row is read:
    ``ceil((total_rows // world_size) / batch_size)`` batches, the last one holding the
    rest of the rank's rows (1 to B + 1 of them: ranks differ by at most one row).

    Shuffling (``shuffle=True``) is deterministic for ``(seed, epoch, rank)``: the order of
    the rank's row groups is permuted, and rows are permuted within windows of
    :data:`SHUFFLE_WINDOW_ROW_GROUPS` row groups. Call :meth:`set_epoch` before each epoch.

    Resuming (:meth:`set_first_batch`): an iteration can start at batch k with the batches
    it would have yielded from k on. Unshuffled, batch k starts at row ``k * batch_size``
    of the rank's range, so the row groups wholly before it are not read at all.
    Shuffled, the permutations depend on row counts only, so the windows before batch k's
    are replayed on row numbers: the row groups read are those of batch k's window and
    those holding the rows that earlier windows left over for it.

    Args:
        path: dataset folder.
        batch_size: B, rows per batch.
        rank: this process's rank.
        world_size: number of ranks sharing the dataset.
        shuffle: shuffle as described above; otherwise rows come in dataset order.
        seed: shuffling seed.
        drop_last: yield only full batches, as many on every rank.
        limit_rows: use at most this many rows (the first ones of ``row_range``).
        row_range: ``(start, stop)`` fractions: use the rows
            ``[int(start * R), int(stop * R))`` of the R in the dataset, e.g. ``(0.9, 1.0)``
            to hold out its last tenth without writing a copy. Adjacent ranges partition
            the rows.

    Attributes:
        schema: the dataset's :class:`DataSchema`.
        total_rows: rows selected, over all ranks.
        num_rows: rows in this rank's range.
        first_batch: the batch that iterations start at (0 unless :meth:`set_first_batch`).

    Example::

        for batch in ParquetBatches("data/train", 4096, rank=rank, world_size=world_size,
                                    shuffle=True, drop_last=True):
            loss = model(batch)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        limit_rows: int | None = None,
        row_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if batch_size <= 0:
            raise InputError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
        if limit_rows is not None and limit_rows <= 0:
            raise InputError(f"limit_rows must be positive, got {limit_rows}")
        if not 0.0 <= row_range[0] < row_range[1] <= 1.0:
            raise InputError(f"row_range {row_range} must satisfy 0 <= start < stop <= 1")
        self.path = Path(path)
        self.schema = read_schema(self.path)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.first_batch = 0

        row_groups = _row_groups(self.path)
        dataset_rows = sum(n for _, _, n in row_groups)
        first = int(row_range[0] * dataset_rows)
        self.total_rows = min(int(row_range[1] * dataset_rows) - first, limit_rows or dataset_rows)
        if self.total_rows <= 0:
            raise InputError(f"{self.path}: no rows selected (of {dataset_rows}, {row_range})")
        start = first + rank * self.total_rows // world_size
        stop = first + (rank + 1) * self.total_rows // world_size
        self.num_rows = stop - start
        if self.total_rows < world_size:
            raise InputError(f"{self.path}: {self.total_rows} rows cannot be split over {world_size} ranks")
        self._pieces = _overlapping(row_groups, start, stop)

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffling order of the next iterations."""
        self.epoch = epoch

    def set_first_batch(self, first: int) -> None:
        """Makes the next iterations start at batch ``first`` (0-based) of the pass.

        They yield the batches that a whole iteration yields from ``first`` on, bitwise;
        ``len()`` stays the whole pass's. Unshuffled, the rows before batch ``first``
        are not read (nor the row groups that hold only such rows); shuffled, the row
        groups of the windows before batch ``first``'s are read only where they hold rows
        left over for it (see the class). No skipped batch is built.

        Raises:
            InputError: ``first`` is not in ``[0, len(self)]``.
        """
        if not 0 <= first <= len(self):
            raise InputError(f"first batch {first} is not in [0, {len(self)}]")
        self.first_batch = first

    def __len__(self) -> int:
        per_rank = self.total_rows // self.world_size
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        num_batches, size, first = len(self), self.batch_size, self.first_batch
        if first >= num_batches:
            return
        # Unshuffled, batch b starts at row b * size: the batches before it go unread.
        unread = 0 if self.shuffle else first
        to_read = _skip_rows(self._pieces, unread * size)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        order = rng.permutation(len(to_read)) if self.shuffle else range(len(to_read))
        window = SHUFFLE_WINDOW_ROW_GROUPS if self.shuffle else 1
        # Without drop_last the last batch takes every row left, so all but it are full.
        full_batches = num_batches if self.drop_last else num_batches - 1
        emitted = unread
        leftover = self.schema.arrow_schema().empty_table()
        windows = [order[w : w + window] for w in range(0, len(order), window)]
        if first > emitted:  # shuffled: replay the windows before batch first's on row numbers
            start, emitted, leftover = self._skip_windows(windows, to_read, rng, first, full_batches)
            windows = windows[start:]
        for group in windows:
            pieces = [self._read(to_read[i]) for i in group]
            table = pa.concat_tables([leftover, *pieces])
            if self.shuffle:
                table = table.take(rng.permutation(table.num_rows))
            full = min(table.num_rows // size, full_batches - emitted)
            for k in range(max(first - emitted, 0), full):
                yield make_batch(table.slice(k * size, size), self.schema)
            emitted += full
            if emitted == num_batches:
                return
            leftover = table.slice(full * size)
        yield make_batch(leftover, self.schema)

    def _skip_windows(self, windows: list, pieces: list[_Piece], rng: np.random.Generator,
                      first: int, full_batches: int) -> tuple[int, int, pa.Table]:
        """Replays the shuffled windows that yield no batch from ``first`` on, on row numbers
        (positions in the concatenation of ``pieces``) instead of rows: each draws the
        permutation the whole iteration draws (it depends on the row count only).

        Returns:
            The first window that yields batch ``first`` or a later one (``len(windows)``
            if only the last, partial batch is left), the batches before it, and the rows
            the windows before it leave over, in order (read from the pieces that hold
            them, and no other).
        """
        size = self.batch_size
        bases = np.cumsum([0] + [p.num_rows for p in pieces])
        emitted, leftover = 0, np.zeros(0, dtype=np.int64)
        for w, group in enumerate(windows):
            rows = leftover.size + sum(pieces[i].num_rows for i in group)
            full = min(rows // size, full_batches - emitted)
            if emitted + full > first:
                break
            ids = np.concatenate([leftover, *(np.arange(bases[i], bases[i + 1]) for i in group)])
            leftover = ids[rng.permutation(rows)][full * size :]
            emitted += full
        else:
            w = len(windows)
        return w, emitted, self._rows(pieces, bases, leftover)

    def _rows(self, pieces: list[_Piece], bases: np.ndarray, ids: np.ndarray) -> pa.Table:
        """Rows ``ids`` (positions in the concatenation of ``pieces``, whose first rows are
        at ``bases``) in that order, reading only the pieces that hold them."""
        piece_of = np.searchsorted(bases, ids, side="right") - 1
        needed = np.unique(piece_of)
        tables = [self._read(pieces[i]) for i in needed]
        at = np.zeros(len(pieces), dtype=np.int64)  # where each needed piece starts in `tables`
        at[needed] = np.cumsum([0] + [t.num_rows for t in tables])[:-1]
        rows = pa.concat_tables([self.schema.arrow_schema().empty_table(), *tables])
        return rows.take(pa.array(at[piece_of] + ids - bases[piece_of], pa.int64()))

    def _read(self, piece: _Piece) -> pa.Table:
        try:
            table = piece.row_group.to_table()
        except (OSError, pa.ArrowException) as e:  # a damaged part whose footer still reads
            first = (str(e).strip().splitlines() or [""])[0]
            raise InputError(f"{piece.source}: unreadable Parquet data ({first})") from None
        table = conform_table(table, self.schema, piece.source)
        return table.slice(piece.offset, piece.num_rows)


def _row_groups(path: Path) -> list[tuple[ds.ParquetFileFragment, str, int]]:
    """Every row group of the dataset in reading order: (fragment, description, rows)."""
    # Pages written with a CRC (see DatasetWriter) are verified when read.
    verify = ds.ParquetFragmentScanOptions(page_checksum_verification=True)
    parquet = ds.ParquetFileFormat(default_fragment_scan_options=verify)
    dataset = ds.dataset([str(p) for p in list_parts(path)], format=parquet)
    out = []
    for part in dataset.get_fragments():
        for group in part.split_by_row_group():
            info = group.row_groups[0]
            out.append((group, f"{part.path} (row group {info.id})", info.num_rows))
    return out


def _skip_rows(pieces: list[_Piece], rows: int) -> list[_Piece]:
    """``pieces`` without their first ``rows`` rows (the piece they end in keeps its rest)."""
    out = []
    for piece in pieces:
        cut = min(rows, piece.num_rows)
        rows -= cut
        if cut < piece.num_rows:
            out.append(replace(piece, offset=piece.offset + cut, num_rows=piece.num_rows - cut))
    return out


def _overlapping(
    row_groups: list[tuple[ds.ParquetFileFragment, str, int]], start: int, stop: int
) -> list[_Piece]:
    """The parts of ``row_groups`` that hold the dataset rows ``[start, stop)``."""
    pieces, first = [], 0
    for group, source, num_rows in row_groups:
        lo, hi = max(start, first), min(stop, first + num_rows)
        if lo < hi:
            pieces.append(_Piece(group, source, lo - first, hi - lo))
        first += num_rows
    return pieces
