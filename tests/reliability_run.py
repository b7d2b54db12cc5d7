"""The reliability tests' shared run and helpers (tests/test_reliability*.py).

:class:`Run` is a small finished run, every stage's artifact made once for the session
(the ``reliability_run`` fixture of conftest.py, :func:`build_run`); the helpers drive the
CLI in this process (:func:`fail`) or in a subprocess with a fault (:func:`child`), and
judge what is left on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from afmrec.launch.cli import main
from afmrec.pipeline.model_io import load_model
from afmrec.pipeline.stages import load_statistics

from .cli_process import Completed, run_fault_child

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
    """A small finished run: every stage's artifact, made once for the session."""

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


def build_run(folder: Path) -> Run:
    """Makes the run in ``folder``: data, two trained models, statistics, a compressed and
    a fine-tuned model (through the CLI)."""
    r = Run.at(folder)
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
