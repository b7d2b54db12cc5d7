"""Resumed statistics passes read only the batches they run; the process-group helpers.

A resumed pass starts the Parquet reader at its first batch not saved
(:meth:`ParquetBatches.set_first_batch`). Nothing is mocked: the row groups that a resumed
pass must not read are damaged on disk (their page checksums fail), so that reading one is
an error, and the killed pass of the stage test is the CLI in a subprocess killed with
SIGKILL (``tests/fault_child.py``, which also counts the batches the reader builds). Every
resumed result is compared bit for bit with the uninterrupted pass's.

The helpers of ``sharding/env.py`` that the checkpoint, artifact and statistics modules
share run in one process and on 2 gloo ranks.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.datasets.utils import Batch

from afmrec.models import build_model
from afmrec.pipeline.blocks import find_blocks
from afmrec.pipeline.data import DataSchema, ParquetBatches, SparseField, write_dataset
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.model_io import ModelRecord, save_model
from afmrec.pipeline.runinfo import RunInfo
from afmrec.pipeline.stages import DataRef, load_statistics, stats_stage
from afmrec.pipeline.stats import Statistics, StatsCheckpoint, collect_statistics
from afmrec.sharding.env import (
    is_collective,
    is_distributed,
    is_rank_zero,
    min_over_ranks,
    raise_on_any_rank,
    rank_world,
)

from .conftest import TABLES, random_batch, tiny_config
from .dist_utils import run_distributed
from .cli_process import Completed, run_fault_child
from .reliability_run import KILLED

SCHEMA = DataSchema(
    dense=("d0", "d1", "d2"),
    sparse=(SparseField("t0", 10, multi_hot=True), SparseField("t1", 40), SparseField("t2", 25)),
)
# 1200 rows in 4 parts of 300, row groups of 100: part k holds rows [300k, 300k + 300).
ROWS, ROWS_PER_FILE, ROW_GROUP = 1200, 300, 100
BATCH = 50


def table(n: int, seed: int = 0) -> pa.Table:
    """``n`` random rows of :data:`SCHEMA` (bags of 0 to 2 ids)."""
    rng = np.random.default_rng(seed)
    columns = {"label": pa.array(rng.integers(0, 2, n), pa.int8())}
    for name in SCHEMA.dense:
        columns[name] = pa.array(rng.standard_normal(n), pa.float32())
    for field in SCHEMA.sparse:
        if field.multi_hot:
            columns[field.name] = pa.array(
                [list(rng.integers(0, field.num_embeddings, rng.integers(0, 3))) for _ in range(n)],
                pa.list_(pa.int64()))
        else:
            columns[field.name] = pa.array(rng.integers(0, field.num_embeddings, n), pa.int64())
    return pa.table(columns)


def damage_row_group(folder: Path, part: int, row_group: int) -> None:
    """Flips the last bytes of the row group's first column chunk: page data, whose CRC
    (written by DatasetWriter) then fails when the row group is read. The footer is intact."""
    path = folder / f"part-{part:05d}.parquet"
    column = pq.read_metadata(path).row_group(row_group).column(0)
    start = column.dictionary_page_offset if column.has_dictionary_page else column.data_page_offset
    end = start + column.total_compressed_size
    data = bytearray(path.read_bytes())
    data[end - 4 : end] = bytes(255 - b for b in data[end - 4 : end])
    path.write_bytes(bytes(data))


def tensors(batch: Batch) -> tuple[torch.Tensor, ...]:
    kjt = batch.sparse_features
    return batch.dense_features, batch.labels, kjt.values(), kjt.lengths()


def assert_same_batches(got: list[Batch], expected: list[Batch]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.sparse_features.keys() == b.sparse_features.keys()
        assert all(torch.equal(x, y) for x, y in zip(tensors(a), tensors(b)))


def assert_same_statistics(got: Statistics, expected: Statistics) -> None:
    assert got.moments.keys() == expected.moments.keys()
    for name, m in expected.moments.items():
        for x, y in zip(got.moments[name].tensors(), m.tensors()):
            assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume") / "data"
    return write_dataset(table(ROWS), SCHEMA, folder, rows_per_file=ROWS_PER_FILE,
                         row_group_size=ROW_GROUP)


def damaged_copy(data: Path, out: Path, *row_groups: tuple[int, int]) -> Path:
    """A copy of ``data`` whose ``(part, row group)``s are damaged."""
    shutil.copytree(data, out)
    for part, group in row_groups:
        damage_row_group(out, part, group)
    return out


# ----------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("shuffle, drop_last, world_size", [
    (False, False, 1), (False, True, 1), (False, False, 3), (True, False, 2), (True, True, 1)])
def test_reader_from_any_batch_yields_the_rest_of_a_whole_pass(tmp_path, shuffle, drop_last,
                                                                world_size):
    """Row groups (7 rows) and parts (30 rows) that batches of 8 straddle, a row range that
    starts inside one: from every batch k, the batches a whole pass yields from k on, bitwise."""
    path = write_dataset(table(103, seed=1), SCHEMA, tmp_path / "ds", rows_per_file=30,
                         row_group_size=7)
    for rank in range(world_size):
        reader = ParquetBatches(path, 8, rank=rank, world_size=world_size, shuffle=shuffle,
                                seed=3, drop_last=drop_last, row_range=(0.05, 0.97))
        reader.set_epoch(1)
        whole = list(reader)
        assert len(whole) == len(reader) > 2
        for first in range(len(reader) + 1):
            reader.set_first_batch(first)
            assert len(reader) == len(whole)  # the whole pass's length
            assert_same_batches(list(reader), whole[first:])
        with pytest.raises(InputError, match="first batch"):
            reader.set_first_batch(len(reader) + 1)


def test_reader_started_past_damaged_row_groups_never_reads_them(data, tmp_path):
    """Batches 0-4 hold rows 0-249; rows 0-199 (two row groups) are damaged. From batch 4
    on (row 200) the reader never touches them; from the start it fails on the first."""
    damaged = damaged_copy(data, tmp_path / "damaged", (0, 0), (0, 1))
    with pytest.raises(InputError, match=r"part-00000.parquet \(row group 0\): unreadable"):
        next(iter(ParquetBatches(damaged, BATCH)))
    reader = ParquetBatches(damaged, BATCH)
    reader.set_first_batch(4)
    assert_same_batches(list(reader), list(ParquetBatches(data, BATCH))[4:])


@pytest.mark.parametrize("batch, first, fewest, most", [(50, 8, 8, 8), (50, 16, 4, 4), (60, 13, 5, 11)])
def test_shuffled_reader_reads_only_the_row_groups_its_batches_need(data, tmp_path, batch, first,
                                                                     fewest, most):
    """Shuffled, 12 row groups in 3 windows of 4. Each row group is damaged in turn: a pass
    resumed at batch ``first`` fails exactly when it reads the damaged one, and otherwise
    yields the whole pass's batches from ``first`` on. Batches of 50 fill each window (400
    rows) exactly, so a pass resumed at batch 8 reads windows 2 and 3 (8 groups), at batch
    16 window 3 (4 groups). Batches of 60 leave rows over from window to window: resumed
    at batch 13 (window 3) it reads window 3 and the groups holding the 20 rows left over
    for it (from windows 1 and 2), more than 4 groups but not all 12."""
    def resumed(path: Path) -> list[Batch]:
        reader = ParquetBatches(path, batch, shuffle=True, seed=5)
        reader.set_first_batch(first)
        return list(reader)

    whole = list(ParquetBatches(data, batch, shuffle=True, seed=5))
    read = 0
    for part, group in itertools.product(range(ROWS // ROWS_PER_FILE), range(ROWS_PER_FILE // ROW_GROUP)):
        damaged = damaged_copy(data, tmp_path / f"damaged-{part}-{group}", (part, group))
        try:
            got = resumed(damaged)
        except InputError:
            read += 1
            continue
        assert_same_batches(got, whole[first:])
    assert fewest <= read <= most


# --------------------------------------------------------------------- collect_statistics


def model_and_blocks():
    torch.manual_seed(0)
    model = build_model(tiny_config("dlrm")).eval()
    return model, find_blocks(model)


def test_resumed_statistics_read_no_saved_batch_and_equal_an_uninterrupted_pass(data, tmp_path):
    """A pass killed after 5 saved batches (of 24) resumes on data whose first two row
    groups (rows 0-199, batches 0-3) are damaged: it does not read them, and its
    statistics are the uninterrupted pass's, bit for bit."""
    model, blocks = model_and_blocks()
    reference = collect_statistics(model, blocks, ParquetBatches(data, BATCH))
    checkpoint = StatsCheckpoint(tmp_path / "saves", 1, "pass")
    collect_statistics(model, blocks, itertools.islice(ParquetBatches(data, BATCH), 5),
                       checkpoint=checkpoint)
    damaged = damaged_copy(data, tmp_path / "damaged", (0, 0), (0, 1))
    reader = ParquetBatches(damaged, BATCH)
    resumed = collect_statistics(model, blocks, reader, checkpoint=checkpoint)
    assert resumed.meta["resumed_from_batch"] == 5
    assert_same_statistics(resumed, reference)
    assert reader.first_batch == 0  # the reader is left as it came
    with pytest.raises(InputError, match="unreadable Parquet data"):  # a fresh pass reads them
        collect_statistics(model, blocks, reader, checkpoint=StatsCheckpoint(tmp_path / "new", 1, "new"))


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_resumed_statistics_over_plain_iterables(tmp_path, kind):
    """Batches without ``set_first_batch`` (a list, a generator without ``len``) are read
    through the saved ones, and the result is the uninterrupted pass's."""
    model, blocks = model_and_blocks()
    batches = [random_batch(40, 3, seed=s, tables=TABLES) for s in range(6)]
    source = (lambda: iter(batches)) if kind == "generator" else (lambda: batches)
    reference = collect_statistics(model, blocks, source())
    checkpoint = StatsCheckpoint(tmp_path / "saves", 2, "pass")
    collect_statistics(model, blocks, itertools.islice(source(), 5), checkpoint=checkpoint)
    resumed = collect_statistics(model, blocks, source(), checkpoint=checkpoint)
    assert resumed.meta["resumed_from_batch"] == 4
    assert_same_statistics(resumed, reference)


# ----------------------------------------------------------------------- the stats stage


def stats_argv(model: Path, data: Path, out: Path) -> list[str]:
    return ["stats", "--model", str(model), "--data", str(data), "--out", str(out),
            "--batch-size", str(BATCH), "--checkpoint-every", "1", "--no-probes", "--quiet"]


def child(fault: str, argv: list[str]) -> Completed:
    """The CLI in a subprocess with ``fault`` (forked as ``cli_process.py`` does)."""
    return run_fault_child([fault, "--", *argv], timeout=180)


def test_killed_stats_stage_resumes_building_only_the_batches_left(data, tmp_path):
    """``afmrec stats`` killed (SIGKILL) while building batch 10 of 24 has saved 9; the
    rerun builds only the 15 left (a 16th build would kill it), counts their rows alone
    in its throughput, and writes the statistics of the uninterrupted pass."""
    model_dir = save_model(model_and_blocks()[0], ModelRecord(tiny_config("dlrm")), tmp_path / "model")
    reference = stats_stage(model_dir, DataRef(data), tmp_path / "reference.pt", batch_size=BATCH,
                            progress=False)
    out = tmp_path / "stats.pt"
    killed = child("kill-at-batch:10", stats_argv(model_dir, data, out))
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    assert not out.exists()
    rerun = child("kill-at-batch:16", stats_argv(model_dir, data, out))
    assert rerun.returncode == 0 and "rc=0" in rerun.stdout, rerun.stderr[-3000:]
    stats = load_statistics(out)
    assert stats.meta["resumed_from_batch"] == 9
    assert RunInfo.from_dict(stats.meta["throughput"]).total_samples == ROWS - 9 * BATCH
    assert_same_statistics(stats, reference)
    assert not (tmp_path / ".stats.pt.partial").exists()


# ---------------------------------------------------------------- the process-group helpers


def test_process_group_helpers_without_a_group():
    assert not is_distributed() and not is_collective() and is_rank_zero()
    assert rank_world() == (0, 1) and min_over_ranks(7) == 7
    raise_on_any_rank(None)
    with pytest.raises(InputError, match="^only here$"):
        raise_on_any_rank("only here")


def _two_ranks(env, out_dir: Path, data: Path, damaged: Path) -> dict:
    """Each rank: the helpers, then a statistics pass over its half of the rows, killed
    after 6 saves with rank 1's last save lost, resumed on the damaged copy."""
    helpers = {"rank_world": rank_world(), "collective": is_collective(),
               "rank_zero": is_rank_zero(), "min": min_over_ranks(10 + env.rank)}
    try:
        raise_on_any_rank("bad on rank 1" if env.rank == 1 else None)
    except InputError as e:
        helpers["raised"] = str(e)
    model, blocks = model_and_blocks()
    reference = collect_statistics(model, blocks, ParquetBatches(data, BATCH, rank=env.rank,
                                                                 world_size=2))
    reference.all_reduce_()
    checkpoint = StatsCheckpoint(out_dir / "saves", 1, "pass", env.rank)
    killed = itertools.islice(ParquetBatches(data, BATCH, rank=env.rank, world_size=2), 6)
    collect_statistics(model, blocks, killed, checkpoint=checkpoint)
    if env.rank == 1:  # killed while saving: rank 1's save of 6 batches is lost
        (out_dir / "saves" / f"rank1-{6:012d}.pt").unlink()
    reader = ParquetBatches(damaged, BATCH, rank=env.rank, world_size=2)
    resumed = collect_statistics(model, blocks, reader, checkpoint=checkpoint)
    resumed.all_reduce_()
    assert_same_statistics(resumed, reference)
    return {**helpers, "resumed_from_batch": resumed.meta["resumed_from_batch"]}


def test_two_ranks_resume_from_the_save_all_hold_reading_none_before_it(data, tmp_path):
    """Rank 0 holds saves of 5 and 6 batches, rank 1 of 5 only: both resume from 5.
    Rank 0's rows 0-249 and rank 1's rows 600-849 are skipped; the row groups [0, 200)
    and [600, 800) are damaged, the partly skipped ones are not."""
    damaged = damaged_copy(data, tmp_path / "damaged", (0, 0), (0, 1), (2, 0), (2, 1))
    out = tmp_path / "ranks"
    out.mkdir()
    results = run_distributed(_two_ranks, 2, out, data, damaged, timeout_s=300)
    for rank, r in enumerate(results):
        assert r["rank_world"] == (rank, 2) and r["collective"] and r["rank_zero"] == (rank == 0)
        assert r["min"] == 10
        assert r["raised"] == "bad on rank 1"  # raised on both ranks
        assert r["resumed_from_batch"] == 5
