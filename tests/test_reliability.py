"""Reliability (issue 8): bad input stops a stage with one clear line; faults lose nothing.

Bad input drives the CLI in this process: ``main(argv)`` returns 2 and prints one line
``afmrec CMD: error: ...`` naming the file, table, column or block. Kills and write
failures run the real CLI in a subprocess (forked from one that has imported it,
``tests/cli_process.py``; ``tests/fault_child.py`` kills it with SIGKILL at a named
point, or limits the size of its files), and the tests judge what is left on
disk: no partial artifact visible, inputs byte-identical, and a rerun that gives the
uninterrupted run's result. The numbers in the test names are the issue's cases: 1 to 5
(bad input) here, 6 to 8 (outputs, kills, failed writes) in test_reliability_faults.py.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp

from afmrec.launch.cli import main
from afmrec.pipeline.artifacts import STATISTICS_FORMAT, load_checked, save_checked
from afmrec.pipeline.bases import Bases
from afmrec.pipeline.compress import compress_
from afmrec.pipeline.data import DataSchema, SparseField, write_dataset
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.model_io import load_model, save_model

from .reliability_run import (BLOCK, MODEL, TABLE, TUNE, Run, bad_dataset, copy_model, edit_record, fail,
                              leftovers, set_column)

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def run(reliability_run: Run) -> Run:
    """The run that conftest.py makes once for both reliability modules."""
    return reliability_run


# ------------------------------------------------ 1. checkpoint missing, damaged, mismatched


def _remove(rel: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        p = model / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return edit


def _truncate(rel: str, keep_checksums: bool = True) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        p = model / rel
        os.truncate(p, p.stat().st_size // 2)
        if not keep_checksums:
            (model / "checkpoint" / "checksums.json").unlink()
    return edit


def _flip(rel: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        p = model / rel
        data = bytearray(p.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(255 - b for b in data[middle : middle + 8])
        p.write_bytes(bytes(data))
    return edit


DAMAGE = {
    "no model.json": (_remove("model.json"), ["model.json: file not found"]),
    "model.json cut short": (_truncate("model.json"), ["model.json: not valid JSON"]),
    "no checkpoint folder": (_remove("checkpoint"), ["checkpoint: checkpoint not found"]),
    "no .metadata": (_remove("checkpoint/.metadata"), ["not a checkpoint (no .metadata file)"]),
    "data file missing": (_remove("checkpoint/__0_0.distcp"), ["__0_0.distcp: checkpoint file missing"]),
    "data file cut short": (_truncate("checkpoint/__0_0.distcp"),
                            ["__0_0.distcp:", "bytes where", "(truncated or replaced)"]),
    "data file damaged": (_flip("checkpoint/__0_0.distcp"), ["__0_0.distcp: damaged"]),
    ".metadata damaged": (_flip("checkpoint/.metadata"), [".metadata: damaged"]),
    # checkpoints without checksums.json (plain DCP): DCP's own errors, in one line
    "data file cut short, no checksums": (_truncate("checkpoint/__0_0.distcp", False),
                                          ["could not read the checkpoint (", "cut short"]),
    ".metadata cut short, no checksums": (_truncate("checkpoint/.metadata", False),
                                          ["unreadable checkpoint metadata"]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_1_damaged_checkpoint_is_an_error_naming_the_file(run, tmp_path, capsys, damage):
    edit, fragments = DAMAGE[damage]
    model = copy_model(run.original, tmp_path / "model")
    edit(model)
    fail(capsys, run.evaluate_argv(run.test, model), *fragments)


def test_1_missing_model_folder(run, tmp_path, capsys):
    fail(capsys, run.evaluate_argv(run.test, tmp_path / "nope"), "nope: model directory not found")


def _table(name: str, rows: int | None = None, drop: bool = False, add: str | None = None):
    def edit(config: dict) -> None:
        tables = config["tables"]
        if drop:
            tables[:] = [t for t in tables if t["name"] != name]
        elif add:
            tables.append({"name": add, "num_embeddings": 10})
        else:
            next(t for t in tables if t["name"] == name)["num_embeddings"] = rows
    return edit


MISMATCH = {
    "wrong row count": (_table("C2", rows=301),
                        [repr(TABLE.format("C2")), "(300, 8) in the checkpoint", "expects (301, 8)"]),
    "wrong width": (lambda c: c.update(embedding_dim=16, dense_arch=[32, 16]),
                    [repr(TABLE.format("C1")), "(60, 8) in the checkpoint", "expects (60, 16)"]),
    "table missing from the checkpoint": (_table("C1", add="C9"),
                                          ["has no tensor", repr(TABLE.format("C9"))]),
    "table missing from the model": (_table("C3", drop=True),
                                     ["holds tensor", repr(TABLE.format("C3")), "does not have"]),
}


@pytest.mark.parametrize("mismatch", MISMATCH)
def test_1_checkpoint_not_matching_the_model_config(run, tmp_path, capsys, mismatch):
    edit, fragments = MISMATCH[mismatch]
    model = copy_model(run.original, tmp_path / "model")
    edit_record(model, edit)
    fail(capsys, run.evaluate_argv(run.test, model), *fragments)


def test_1_checkpoint_with_entries_outside_the_model_loads(run, tmp_path):
    """A training loop's extras (optimizer state, step counter) beside the model's tensors
    are not a mismatch: production checkpoints often carry them."""
    model = copy_model(run.original, tmp_path / "model")
    shutil.rmtree(model / "checkpoint")
    state = load_model(run.original)[0].state_dict()
    dcp.save({**state, "step": torch.tensor(7), "optimizer.lr": torch.tensor(0.1)},
             checkpoint_id=str(model / "checkpoint"))
    assert main(run.evaluate_argv(run.test, model)) == 0


def test_1_checkpoint_of_another_model(run, tmp_path, capsys):
    model = copy_model(run.original, tmp_path / "model")
    shutil.rmtree(model / "checkpoint")
    shutil.copytree(run.other / "checkpoint", model / "checkpoint")  # embedding-dim 4
    fail(capsys, run.evaluate_argv(run.test, model), "shape", "the model expects")


# ---------------------------------------------------- 2. statistics or bases of another model


def test_2_statistics_of_another_model_or_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "afm"
    # another architecture
    fail(capsys, run.compress_argv(out, model=run.other), "statistics were computed for another "
         "model or checkpoint", str(run.original))
    # the same architecture with other weights (one value changed)
    model, record = load_model(run.original)
    with torch.no_grad():
        model.over_arch.model[-1].bias.add_(1e-3)
    save_model(model, record, tmp_path / "tweaked")
    fail(capsys, run.compress_argv(out, model=tmp_path / "tweaked"), "another model or checkpoint")
    # a statistics file that is not one
    bad = tmp_path / "stats.pt"
    bad.write_bytes(run.stats.read_bytes()[:1000])
    fail(capsys, run.compress_argv(out, stats=bad), "stats.pt: not a readable statistics file")
    assert not out.exists() and leftovers(tmp_path) == []


def test_2_bases_of_another_model(run):
    bases = Bases.from_state(torch.load(run.afm / "bases.pt", weights_only=True))
    other, _ = load_model(run.other)  # width 4: the 8-wide bases do not fit
    with pytest.raises(InputError, match=r"block \S+: basis of shape \(8, \d\) does not fit an "
                                         r"output of width 4"):
        compress_(other, bases)
    bases.bases["sparse_arch.embedding_bag_collection.C7"] = bases.bases.popitem()[1]
    original, _ = load_model(run.original)
    with pytest.raises(InputError, match="which this model does not have"):
        compress_(original, bases)


# ----------------------------------------------------------- 3. NaN/Inf; blocks without samples


@pytest.fixture(scope="module")
def nan_model(run, tmp_path_factory) -> Path:
    """The original with one NaN in table C2, written by plain DCP (save_model refuses)."""
    out = copy_model(run.original, tmp_path_factory.mktemp("nan") / "model")
    shutil.rmtree(out / "checkpoint")
    model, _ = load_model(run.original)
    with torch.no_grad():
        model.sparse_arch.embedding_bag_collection.embedding_bags["C2"].weight[5, 3] = float("nan")
    dcp.save(model.state_dict(), checkpoint_id=str(out / "checkpoint"))
    return out


@pytest.mark.parametrize("command", ["stats", "compress", "finetune", "evaluate"])
def test_3_nan_in_weights_names_the_tensor(run, nan_model, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {
        "stats": run.stats_argv(out, model=nan_model),
        "compress": run.compress_argv(out, model=nan_model),
        "finetune": ["finetune", "--model", str(nan_model), "--data", str(run.train), "--out",
                     str(out), *TUNE],
        "evaluate": run.evaluate_argv(run.test, nan_model),
    }[command]
    fail(capsys, argv, f"tensor {TABLE.format('C2')!r} holds 1 NaN or infinite value(s)")
    assert not out.exists()


def test_3_nan_weights_are_never_saved(run, tmp_path):
    model, record = load_model(run.original)
    with torch.no_grad():
        model.over_arch.model[-1].weight[0, 0] = float("inf")
    with pytest.raises(InputError, match=r"'over_arch\..*weight' holds 1 NaN or infinite value\(s\): "
                                         r"refusing to save the model"):
        save_model(model, record, tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_3_nan_in_a_batch_names_file_and_column(run, tmp_path, capsys, value):
    data = bad_dataset(run, tmp_path / "data", lambda t: set_column(t, "I2", [1.0, value]))
    out = tmp_path / "s.pt"
    fail(capsys, ["stats", "--model", str(run.original), "--data", str(data), "--out", str(out),
                  "--quiet"], "part-00000.parquet (row group 0): column 'I2' has NaN or infinite values")
    assert not out.exists()


def _edited_stats(run: Run, path: Path, block: str, edit: Callable[[dict], None]) -> Path:
    """Statistics written with edited values (so with a matching checksum)."""
    state = load_checked(run.stats, STATISTICS_FORMAT, "statistics file")
    edit(state["moments"][block])
    save_checked(state, path, STATISTICS_FORMAT)
    return path


def test_3_nan_in_statistics_names_the_block(run, tmp_path, capsys):
    block = BLOCK.format("C3")
    stats = _edited_stats(run, tmp_path / "nan.pt", block, lambda m: m["g"].__setitem__((0, 0), float("nan")))
    fail(capsys, run.compress_argv(tmp_path / "afm", stats=stats),
         f"block {block}: statistics hold NaN or Inf")


def test_3_block_without_samples_in_statistics(run, tmp_path, capsys):
    block = BLOCK.format("C1")

    def empty(m: dict) -> None:
        for t in m.values():
            t.zero_()

    stats = _edited_stats(run, tmp_path / "empty.pt", block, empty)
    fail(capsys, run.compress_argv(tmp_path / "afm", stats=stats), f"block {block}: no samples")


def test_3_block_without_samples_in_the_data(tmp_path, capsys):
    """A multi-hot field whose bags are all empty: its table is never observed."""
    schema = DataSchema(("I1",), (SparseField("C1", 10), SparseField("C2", 5, multi_hot=True)))
    n = 512
    table = pa.table({
        "label": pa.array([i % 2 for i in range(n)], pa.int8()),
        "I1": pa.array([float(i % 7) for i in range(n)], pa.float32()),
        "C1": pa.array([i % 10 for i in range(n)], pa.int64()),
        "C2": pa.array([[] for _ in range(n)], pa.list_(pa.int64())),
    })
    write_dataset(table, schema, tmp_path / "data")
    model = tmp_path / "model"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(model), "--embedding-dim",
                 "4", "--over-arch", "8,1", "--epochs", "1", "--batch-size", "128", "--quiet"]) == 0
    fail(capsys, ["stats", "--model", str(model), "--data", str(tmp_path / "data"), "--out",
                  str(tmp_path / "s.pt"), "--quiet"], f"block {BLOCK.format('C2')}: no samples")
    assert not (tmp_path / "s.pt").exists()


# ------------------------------------------------------------------------------------ 4. ranks

def test_4_rank_larger_than_every_block(run, tmp_path, capsys):
    fail(capsys, ["compress", "--model", str(run.original), "--stats", str(run.stats), "--rank",
                  "100", "--out", str(tmp_path / "afm"), "--quiet"],
         "rank 100 is larger than the width of every block")


def test_4_rank_larger_than_the_block_named(run, tmp_path, capsys):
    fail(capsys, run.compress_argv(tmp_path / "afm", "--rank-pattern", f"{BLOCK.format('C1')}=12"),
         f"block {BLOCK.format('C1')}: rank 12 is larger than its width 8")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_4_table_rank_not_a_multiple_of_4_is_rounded_up_with_a_warning(run, tmp_path):
    out = tmp_path / "afm"
    records = _Records()
    logger = logging.getLogger("afmrec.pipeline.ranks")
    logger.addHandler(records)
    try:
        assert main(["compress", "--model", str(run.original), "--stats", str(run.stats),
                     "--rank", "3", "--out", str(out), "--quiet"]) == 0
    finally:
        logger.removeHandler(records)
    rows = {r["block"]: r for r in pq.read_table(out / "ranks.parquet").to_pylist()}
    tables = [b for b, r in rows.items() if r["kind"] == "table"]
    assert tables and all(rows[b]["rank"] == 4 for b in tables)
    assert all(rows[b]["rank"] == 3 for b, r in rows.items() if r["kind"] == "linear" and r["compressed"])
    assert {f"block {b}: rank 3 rounded up to 4" for b in tables} <= set(records.messages)


def test_4_table_rank_not_a_multiple_of_4_is_an_error_by_config(run, tmp_path, capsys):
    fail(capsys, ["compress", "--model", str(run.original), "--stats", str(run.stats), "--rank",
                  "3", "--table-rank-rounding", "error", "--out", str(tmp_path / "afm"), "--quiet"],
         f"block {BLOCK.format('C1')}: table rank 3 is not a multiple of --table-multiple 4")


@pytest.mark.parametrize("policy, fragment", [
    (["--ratio", "500"], "target ratio 500 is unreachable"),
    (["--rank", "0"], "rank must be >= 1"),
    (["--energy", "1.5"], "energy must be in (0, 1]"),
    (["--ratio", "2", "--rank-pattern", "nope*=2"], "pattern 'nope*' matches no block"),
])
def test_4_rank_policy_that_cannot_be_met(run, tmp_path, capsys, policy, fragment):
    argv = ["compress", "--model", str(run.original), "--stats", str(run.stats), *policy,
            "--out", str(tmp_path / "afm"), "--quiet"]
    fail(capsys, argv, fragment)
    assert not (tmp_path / "afm").exists()


# ------------------------------------------------------------------------------------- 5. data


def _part_bytes(edit: Callable[[bytearray], None]):
    def write(run: Run, folder: Path) -> Path:
        folder.mkdir()
        data = bytearray((run.test / "part-00000.parquet").read_bytes())
        edit(data)
        (folder / "part-00000.parquet").write_bytes(bytes(data))
        return folder
    return write


def _damage_middle(data: bytearray) -> None:
    middle = len(data) // 2
    data[middle : middle + 32] = bytes(255 - b for b in data[middle : middle + 32])


def _other_schema(table: pa.Table) -> pa.Table:
    import json

    schema = json.loads(table.schema.metadata[b"afmrec.schema"])
    schema["sparse"][0]["num_embeddings"] = 61
    return table.replace_schema_metadata({b"afmrec.schema": json.dumps(schema).encode()})


DATA = {
    "empty folder": (None, ["no .parquet files in the folder"]),
    "no rows": (lambda t: t.slice(0, 0), ["no rows selected"]),
    "missing column": (lambda t: t.drop_columns(["I1"]), ["missing column(s) ['I1']"]),
    "extra column": (lambda t: t.append_column("extra", pa.array([0] * t.num_rows)),
                     ["column(s) ['extra'] are not in the dataset schema"]),
    "label as text": (lambda t: t.set_column(0, "label", pc.cast(t.column("label"), pa.string())),
                      ["column 'label' has type string"]),
    "ids as floats": (lambda t: t.set_column(4, "C1", pc.cast(t.column("C1"), pa.float64())),
                      ["column 'C1' has type double; field 'C1' holds an integer id per row"]),
    "negative id": (lambda t: set_column(t, "C1", [-1]), ["column 'C1' has a negative id -1"]),
    "id beyond the table": (lambda t: set_column(t, "C2", [300]),
                            ["column 'C2' has id 300 >= its table size 300"]),
    "null label": (lambda t: set_column(t, "label", [None]), ["column 'label' has 1 null value(s)"]),
    "label 2": (lambda t: set_column(t, "label", [2]), ["column 'label' must hold 0 or 1, found 2"]),
    "label -1": (lambda t: set_column(t, "label", [-1]), ["column 'label' must hold 0 or 1, found -1"]),
}


@pytest.mark.parametrize("case", DATA)
def test_5_bad_parquet_data_names_file_and_column(run, tmp_path, capsys, case):
    edit, fragments = DATA[case]
    data = bad_dataset(run, tmp_path / "data", edit)
    line = fail(capsys, run.evaluate_argv(data), *fragments)
    if "column" in fragments[0]:
        assert f"{data / 'part-00000.parquet'} (row group 0): " in line


@pytest.mark.parametrize("case, fragments", [
    ("damaged page", ["part-00000.parquet (row group 0): unreadable Parquet data",
                      "CRC checksum verification failed"]),
    ("cut short", ["part-00000.parquet: not a readable Parquet file"]),
])
def test_5_damaged_parquet_part(run, tmp_path, capsys, case, fragments):
    edit = _damage_middle if case == "damaged page" else (lambda d: d.__delitem__(slice(len(d) // 2, None)))
    data = _part_bytes(edit)(run, tmp_path / "data")
    fail(capsys, run.evaluate_argv(data), *fragments)


def test_5_data_of_another_schema(run, tmp_path, capsys):
    data = bad_dataset(run, tmp_path / "data", _other_schema)
    fail(capsys, run.evaluate_argv(data), "the data does not match the model", "('C1', 61)")


@pytest.mark.parametrize("command", ["train", "stats"])
def test_5_bad_training_data_writes_nothing(run, tmp_path, capsys, command):
    data = bad_dataset(run, tmp_path / "data", lambda t: set_column(t, "C3", [7, 20]))
    out = tmp_path / "out"
    argv = {"train": ["train", "--data", str(data), "--out", str(out), *MODEL],
            "stats": ["stats", "--model", str(run.original), "--data", str(data), "--out", str(out),
                      "--quiet"]}[command]
    fail(capsys, argv, "column 'C3' has id 20 >= its table size 20")
    assert not out.exists() and leftovers(tmp_path) == []
