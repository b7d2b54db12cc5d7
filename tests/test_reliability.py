"""Reliability (issue 8): bad input stops a stage with one clear line; faults lose nothing.

Bad input drives the CLI in this process: ``main(argv)`` returns 2 and prints one line
``afmrec CMD: error: ...`` naming the file, table, column or block. Kills and write
failures run the real CLI in a subprocess (forked from one that has imported it,
``tests/cli_process.py``; ``tests/fault_child.py`` kills it with SIGKILL at a named
point, or limits the size of its files), and the tests judge what is left on
disk: no partial artifact visible, inputs byte-identical, and a rerun that gives the
uninterrupted run's result. The numbers in the test names are the issue's cases.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp

from afmrec.launch.cli import main
from afmrec.pipeline.artifacts import STATISTICS_FORMAT, load_checked, output_lock, save_checked
from afmrec.pipeline.bases import Bases
from afmrec.pipeline.compress import compress_
from afmrec.pipeline.data import DataSchema, SparseField, write_dataset
from afmrec.pipeline.errors import InputError
from afmrec.pipeline.model_io import load_model, save_model
from afmrec.pipeline.stages import load_statistics

from .cli_process import Completed, run_fault_child

pytestmark = pytest.mark.reliability

FAULT_CHILD = Path(__file__).with_name("fault_child.py")
END = "-- end of command --"  # fault_child.END: what follows each command's stderr
MODEL = ["--embedding-dim", "8", "--over-arch", "16,1", "--epochs", "1", "--batch-size", "256",
         "--quiet"]
TUNE = ["--epochs", "1", "--batch-size", "256", "--quiet"]
TABLE = "sparse_arch.embedding_bag_collection.embedding_bags.{}.weight"
BLOCK = "sparse_arch.embedding_bag_collection.{}"
KILLED = -signal.SIGKILL
CHILD_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    """A small finished run: every stage's artifact, made once for the module."""

    data: Path  # data/train and data/test
    root: Path  # the run folder, holding:
    original: Path
    other: Path  # another architecture (tables 4 wide)
    stats: Path
    afm: Path
    afm_ft: Path

    @classmethod
    def at(cls, folder: Path) -> "Run":
        root = folder / "run"
        names = ("original", "other", "stats.pt", "afm", "afm_ft")
        return cls(folder / "data", root, *(root / name for name in names))

    @property
    def train(self) -> Path:
        return self.data / "train"

    @property
    def test(self) -> Path:
        return self.data / "test"

    # The commands of the run, with the output moved elsewhere.
    def train_argv(self, out: Path, *extra: str) -> list[str]:
        return ["train", "--data", str(self.train), "--out", str(out), *MODEL, *extra]

    def stats_argv(self, out: Path, *extra: str, model: Path | None = None) -> list[str]:
        return ["stats", "--model", str(model or self.original), "--data", str(self.train),
                "--out", str(out), "--batch-size", "512", "--quiet", *extra]

    def compress_argv(self, out: Path, *extra: str, stats: Path | None = None,
                      model: Path | None = None) -> list[str]:
        return ["compress", "--model", str(model or self.original), "--stats",
                str(stats or self.stats), "--ratio", "2", "--out", str(out), "--quiet", *extra]

    def finetune_argv(self, out: Path, *extra: str) -> list[str]:
        return ["finetune", "--model", str(self.afm), "--data", str(self.train), "--out",
                str(out), *TUNE, *extra]

    def evaluate_argv(self, data: Path, model: Path | None = None) -> list[str]:
        return ["evaluate", "--data", str(data), f"a={model or self.original}", "--quiet"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    r = Run.at(tmp_path_factory.mktemp("reliability"))
    assert main(["synth", "--out", str(r.data), "--rows", "3000", "--test-rows", "500",
                 "--tables", "60,300,20", "--dense", "3", "--quiet"]) == 0
    assert main(r.train_argv(r.original)) == 0
    assert main(r.train_argv(r.other, "--embedding-dim", "4")) == 0  # another architecture
    assert main(r.stats_argv(r.stats)) == 0
    assert main(r.compress_argv(r.afm)) == 0
    assert main(r.finetune_argv(r.afm_ft)) == 0
    return r


# ------------------------------------------------------------------------------ helpers


def fail(capsys, argv: list[str], *fragments: str) -> str:
    """Runs the CLI, which must exit 2 with one line ``afmrec CMD: error: ...`` holding
    every fragment."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"afmrec {argv[0]}: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(*paths: Path) -> dict[str, str]:
    """SHA-256 of every file (hidden ones too) under ``paths``: inputs must keep it."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    """What interrupted writes leave in ``folder``: hidden temporaries and set-aside copies."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") and any(f".{k}-" in p.name for k in ("tmp", "old", "probe")))


def child(fault: str, *commands: list[str], timeout: float = 120) -> Completed:
    """The CLI in a subprocess with ``fault`` (see fault_child.py), one or more commands
    (a process forked from one that has imported the CLI: see cli_process.py)."""
    args = [fault]
    for command in commands:
        args += ["--", *command]
    return run_fault_child(args, timeout)


def assert_same_model(a: Path, b: Path, atol: float = 0.0) -> None:
    ma, ra = load_model(a)
    mb, rb = load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], rtol=0, atol=atol), (k, (sa[k] - sb[k]).abs().max())
    assert ra.model == rb.model and ra.ranks == rb.ranks and ra.compress == rb.compress


def assert_same_stats(a: Path, b: Path) -> None:
    sa, sb = load_statistics(a), load_statistics(b)
    assert sa.moments.keys() == sb.moments.keys()
    for name in sa.moments:
        for x, y in zip(sa.moments[name].tensors(), sb.moments[name].tensors()):
            assert torch.equal(x, y), name


def assert_same_compression(a: Path, b: Path) -> None:
    assert_same_model(a, b)
    ba = torch.load(a / "bases.pt", weights_only=True)["bases"]
    bb = torch.load(b / "bases.pt", weights_only=True)["bases"]
    assert ba.keys() == bb.keys()
    assert all(torch.equal(ba[k]["components"], bb[k]["components"]) for k in ba)
    assert pq.read_table(a / "ranks.parquet").equals(pq.read_table(b / "ranks.parquet"))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_record(model_dir: Path, edit: Callable[[dict], None]) -> None:
    import json

    path = model_dir / "model.json"
    record = json.loads(path.read_text())
    edit(record["model"])
    path.write_text(json.dumps(record))


def bad_dataset(run: Run, folder: Path, edit: Callable[[pa.Table], pa.Table] | None) -> Path:
    """A copy of the test split with its one part edited (the schema metadata kept)."""
    folder.mkdir()
    if edit is not None:
        table = pq.read_table(run.test / "part-00000.parquet")
        metadata = table.schema.metadata
        table = edit(table)  # keeps the schema's metadata, or changes it on purpose
        table = table.replace_schema_metadata(table.schema.metadata or metadata)
        pq.write_table(table, folder / "part-00000.parquet")
    return folder


def set_column(table: pa.Table, name: str, values: list, type: pa.DataType | None = None) -> pa.Table:
    column = table.column(name).to_pylist()
    column[: len(values)] = values
    index = table.schema.get_field_index(name)
    return table.set_column(index, pa.field(name, type or table.schema.field(name).type),
                            pa.array(column, type=type or table.schema.field(name).type))


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


# ------------------------------------------------------------------- 6. outputs, inputs, locks


def test_6_existing_output_is_kept_without_overwrite(run, tmp_path, capsys):
    before = snapshot(run.root)
    fail(capsys, run.train_argv(run.original), "original already exists")
    fail(capsys, run.stats_argv(run.stats), "stats.pt already exists")
    fail(capsys, run.compress_argv(run.afm), "afm already exists")
    fail(capsys, run.finetune_argv(run.afm_ft), "afm_ft already exists")
    assert snapshot(run.root) == before


def test_6_overwrite_replaces_an_artifact_never_a_user_folder(run, tmp_path, capsys):
    out = copy_model(run.afm_ft, tmp_path / "afm")  # another run's artifact
    assert main(run.compress_argv(out, "--overwrite")) == 0
    assert_same_compression(out, run.afm)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    fail(capsys, run.train_argv(notes, "--overwrite"), "not an afmrec artifact")
    fail(capsys, run.stats_argv(notes, "--overwrite"), "is a folder; refusing to replace it with a file")
    assert (notes / "todo.txt").read_text() == "mine"


def test_6_output_equal_to_or_inside_an_input_is_always_refused(run, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(run.original, target_is_directory=True)
    before = snapshot(run.root, run.data)
    cases = [
        run.finetune_argv(run.afm, "--overwrite"),  # --model afm --out afm
        run.compress_argv(run.stats, "--overwrite"),  # --stats run/stats.pt --out run/stats.pt
        run.stats_argv(run.original / "checkpoint", "--overwrite"),  # inside the model
        run.train_argv(run.data, "--overwrite"),  # holds the training data
        ["evaluate", "--data", str(run.test), "--out", str(run.test), f"a={run.original}"],
        run.finetune_argv(run.test, "--val", str(run.test), "--overwrite"),  # the validation data
        run.compress_argv(link, "--overwrite"),  # the model, through a symbolic link
    ]
    for argv in cases:
        fail(capsys, argv, "would overwrite or sit inside the input")
    assert snapshot(run.root, run.data) == before


def test_6_a_second_writer_of_the_same_output_is_refused(run, tmp_path, capsys):
    """A real second process holds the output; once it is killed (-9) the lock is free."""
    out = tmp_path / "model"
    # no validation rows, so no early stopping: it trains until it is killed
    endless = run.train_argv(out, "--epochs", "500", "--val-fraction", "0")
    holder = subprocess.Popen([sys.executable, "-m", "afmrec.launch.cli", *endless],
                              env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / ".model.lock"
    try:
        deadline = time.monotonic() + 60
        while f"pid {holder.pid} " not in (lock.read_text() if lock.exists() else ""):
            assert holder.poll() is None and time.monotonic() < deadline, "the holder never locked"
            time.sleep(0.05)
        fail(capsys, run.train_argv(out), f"model is being written by another process (pid {holder.pid} on")
        with output_lock(tmp_path / "stats.pt"):  # and so is this one, by this process
            fail(capsys, run.stats_argv(tmp_path / "stats.pt"), "stats.pt is being written by another process")
    finally:
        holder.kill()
        holder.wait()
    assert main(run.train_argv(out)) == 0  # the kernel released the killed holder's lock
    assert_same_model(out, run.original)
    assert leftovers(tmp_path) == []


def test_stages_leave_no_lock_files(run):
    """Issue 23: every stage of the run removed its .NAME.lock when it ended."""
    assert sorted(p.name for p in run.root.parent.rglob(".*.lock")) == []


# ------------------------------------------------------------------------ 7. kill -9 mid-stage


def _killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == KILLED, (result.returncode, result.stderr[-3000:])


@dataclass(frozen=True)
class Kill:
    """SIGKILL at ``fault`` while ``command`` writes ``output``; what must hold after."""

    fault: str
    output: str
    command: Callable[[Run, Path], list[str]]
    inputs: Callable[[Run], tuple[Path, ...]]
    left: list[str]  # the hidden temporary a kill leaves (removed by the rerun), if any
    reference: Callable[[Run], Path]  # the uninterrupted run's output
    same: Callable[[Path, Path], None]


KILLS = {
    "stats, mid-pass": Kill("kill-at-batch:3", "stats.pt", Run.stats_argv,
                            lambda r: (r.original, r.train), [], lambda r: r.stats, assert_same_stats),
    "stats, before the rename": Kill("kill-before:stats.pt", "stats.pt", Run.stats_argv,
                                     lambda r: (r.original, r.train), [".stats.pt.tmp"],
                                     lambda r: r.stats, assert_same_stats),
    "compress, mid-checkpoint": Kill("kill-at-fsync:.distcp", "afm", Run.compress_argv,
                                     lambda r: (r.original, r.stats), [".afm.tmp"],
                                     lambda r: r.afm, assert_same_compression),
    "finetune, mid-training": Kill("kill-at-batch:4", "afm_ft", Run.finetune_argv,
                                   lambda r: (r.afm, r.train), [], lambda r: r.afm_ft,
                                   assert_same_model),
    "train, checkpoint written, model.json not": Kill(
        "kill-before:model.json", "original", Run.train_argv, lambda r: (r.train,),
        [".original.tmp"], lambda r: r.original, assert_same_model),
}


@pytest.mark.parametrize("case", KILLS)
def test_7_kill_leaves_no_partial_artifact_and_a_rerun_matches(run, tmp_path, case):
    kill = KILLS[case]
    out = tmp_path / kill.output
    inputs = snapshot(*kill.inputs(run))
    _killed(child(kill.fault, kill.command(run, out)))
    assert not out.exists()
    assert [n.split("-")[0] for n in leftovers(tmp_path)] == kill.left
    assert snapshot(*kill.inputs(run)) == inputs
    assert main(kill.command(run, out)) == 0
    assert leftovers(tmp_path) == []  # the dead writer's temporary is gone
    kill.same(out, kill.reference(run))


def test_7_kill_once_the_compressed_model_is_visible(run, tmp_path):
    out = tmp_path / "afm"
    _killed(child("kill-after:afm", run.compress_argv(out)))
    assert sorted(p.name for p in out.iterdir()) == ["bases.pt", "checkpoint", "model.json",
                                                     "ranks.parquet"]
    assert_same_compression(out, run.afm)


def test_7_kill_between_the_renames_of_an_overwrite(run, tmp_path, capsys):
    """--overwrite sets the old folder aside, then renames the new one in: a kill between
    the two leaves neither visible; the next run of that output puts the old one back."""
    out = copy_model(run.afm, tmp_path / "afm_ft")  # the previous version: another model
    previous = snapshot(out)
    _killed(child(f"kill-before:{out.name}", run.finetune_argv(out, "--overwrite")))
    assert not out.exists()
    assert sorted(n.split("-")[0] for n in leftovers(tmp_path)) == [".afm_ft.old", ".afm_ft.tmp"]
    fail(capsys, run.finetune_argv(out), "afm_ft already exists")  # without --overwrite
    assert snapshot(out) == previous and leftovers(tmp_path) == []
    assert main(run.finetune_argv(out, "--overwrite")) == 0
    assert_same_model(out, run.afm_ft)


# --------------------------------------------------------------------- 8. disk full, write error


def test_8_write_failures_are_one_line_and_keep_the_previous_artifacts(run, tmp_path):
    model = copy_model(run.original, tmp_path / "model")
    stats = tmp_path / "stats.pt"
    shutil.copy(run.stats, stats)
    afm = copy_model(run.afm, tmp_path / "afm")
    before = snapshot(model, stats, afm)
    # Files may not grow beyond 2 KiB: every artifact write fails with EFBIG.
    result = child("fsize:2048", run.train_argv(model, "--overwrite"),
                   run.stats_argv(stats, "--overwrite"), run.compress_argv(afm, "--overwrite"))
    assert result.stdout.split() == ["rc=2"] * 3, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.strip() and line != END]
    assert [e.split(":")[0] for e in errors] == ["afmrec train", "afmrec stats", "afmrec compress"]
    for line, path in zip(errors, (model, stats, afm)):
        assert f"error: {path}: write failed (File too large); no partial output" in line, line
    assert snapshot(model, stats, afm) == before
    assert leftovers(tmp_path) == []


# 9. another world size: test_9 in test_reliability_round2.py, which shares its torchrun
# launch with the cases of jobs of several ranks.
