"""Reliability, second round (issue 22): no traceback, no silent damage, nothing lost.

Every case runs the real CLI in a subprocess. The bad inputs run in one process, one
command after the other (``tests/fault_child.py none``, which keeps each command's exit
status and stderr apart); faults (a file-size limit, a killed statistics pass) and jobs of
several ranks (torchrun, submitit) get processes of their own. A bad input must exit with
status 2 and print one line, ``afmrec COMMAND: error: ...``, and leave every file as it
was (no output, user files and earlier artifacts byte-identical). The numbers in the test
names are the classes of ``docs/reliability.md`` (the first round's are 1 to 9).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afmrec.launch.cli import main
from afmrec.pipeline.artifacts import STATISTICS_FORMAT, save_checked
from afmrec.pipeline.data import read_schema, write_dataset
from afmrec.pipeline.model_io import load_record
from afmrec.pipeline.report import read_report

from .cli_process import run_fault_child
from .reliability_run import (CHILD_ENV, END, FAULT_CHILD, MODEL, TUNE, Run, assert_same_model,
                              assert_same_stats, copy_model, leftovers, snapshot)

pytestmark = pytest.mark.reliability

DENSE = ["I1", "I2", "I3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """A small finished run (data, original, statistics, compressed model) and a report."""
    r = Run.at(tmp_path_factory.mktemp("round2"))
    assert main(["synth", "--out", str(r.data), "--rows", "3000", "--test-rows", "500",
                 "--tables", "60,300,20", "--dense", "3", "--quiet"]) == 0
    assert main(r.train_argv(r.original)) == 0
    assert main(r.stats_argv(r.stats)) == 0
    assert main(r.compress_argv(r.afm)) == 0
    assert main(["evaluate", "--data", str(r.test), f"a={r.original}", "--out",
                 str(r.root / "report.parquet"), "--quiet"]) == 0
    return r


# ------------------------------------------------------------------------------ helpers


@dataclass(frozen=True)
class Result:
    """What one command of a child printed and returned."""

    rc: int
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_commands(fault: str, commands: list[list[str]], timeout: float = 300) -> list[Result]:
    """The CLI in one subprocess (``fault_child.py``, forked as ``cli_process.py`` does):
    each command's status and stderr."""
    args = [fault]
    for command in commands:
        args += ["--", *command]
    out = run_fault_child(args, timeout)
    codes = [int(line[3:]) for line in out.stdout.splitlines() if line.startswith("rc=")]
    errors = out.stderr.split(END + "\n")
    assert len(codes) == len(commands), (out.returncode, out.stderr[-3000:])
    return [Result(rc, err) for rc, err in zip(codes, errors)]


def assert_one_line(result: Result, command: str, *fragments: str) -> str:
    """Exit status 2 and one line ``afmrec COMMAND: error: ...`` holding every fragment."""
    assert result.rc == 2 and len(result.lines) == 1, (result.rc, result.stderr[-3000:])
    line = result.lines[0]
    assert line.startswith(f"afmrec {command}: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def kept(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, less the lock files that afmrec leaves
    beside its outputs (``.NAME.lock``, by design)."""
    return {k: v for k, v in snapshot(folder).items() if not k.endswith(".lock")}


def flip(path: Path, at: float = 0.5) -> None:
    """Inverts 8 bytes of ``path`` at fraction ``at`` of its length."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 8] = bytes(255 - b for b in data[i : i + 8])
    path.write_bytes(bytes(data))


def with_notes(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "NOTES.md").write_text("my notes")
    return folder


def model_json(model: Path, edit: Callable[[dict], object]) -> Path:
    """``model`` with ``model.json`` replaced by ``edit(record)`` (what it returns, or the
    record it changed in place)."""
    path = model / "model.json"
    record = json.loads(path.read_text())
    changed = edit(record)
    path.write_text(json.dumps(record if changed is None else changed))
    return model


def dataset_with_dense(run: Run, folder: Path, names: list[str], order: list[int]) -> Path:
    """The test split with its dense columns renamed to ``names`` and stored in ``order``."""
    table = pq.read_table(run.test)
    schema = read_schema(run.test)
    table = table.rename_columns([dict(zip(DENSE, names)).get(c, c) for c in table.column_names])
    dense = tuple(names[i] for i in order)
    return write_dataset(table, dataclasses.replace(schema, dense=dense), folder)


def other_schema_data(folder: Path) -> Path:
    assert main(["synth", "--out", str(folder), "--rows", "600", "--tables", "50,40", "--dense",
                 "2", "--quiet"]) == 0
    return folder / "train"


# ------------------------------------------------------------------ the bad inputs, one child

# A command: (the run, a folder of its own) -> the command line. It prepares what it needs
# in the folder; whatever else the folder holds after it ran is what it wrote.
Command = Callable[[Run, Path], list[str]]


def _train(run: Run, folder: Path, *extra: str) -> list[str]:
    return run.train_argv(folder / "model", *extra)


def _finetune(run: Run, folder: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(run.afm), "--data", str(run.train), "--out",
            str(folder / "tuned"), *TUNE, *extra]


def _evaluate(run: Run, model: Path, data: Path | None = None, *extra: str) -> list[str]:
    return ["evaluate", "--data", str(data or run.test), f"a={model}", "--quiet", *extra]


def _copy(source: Callable[[Run], Path], name: str, then: Callable[[Run, Path], list[str]],
          edit: Callable[[Path], object] = lambda p: None) -> Command:
    """``then(run, out)``, ``out`` a copy of ``source(run)`` in the case's folder (edited)."""
    def command(run: Run, folder: Path) -> list[str]:
        out, src = folder / name, source(run)
        shutil.copytree(src, out) if src.is_dir() else shutil.copy(src, out)
        edit(out)
        return then(run, out)
    return command


def _onto_text(then: Callable[[Run, Path], list[str]]) -> Command:
    def command(run: Run, folder: Path) -> list[str]:
        (folder / "notes.txt").write_text("mine")
        return then(run, folder / "notes.txt")
    return command


def _with_json(edit: Callable[[dict], object]) -> Command:
    """evaluate of a copy of the original whose ``model.json`` is ``edit``ed."""
    def command(run: Run, folder: Path) -> list[str]:
        return _evaluate(run, model_json(copy_model(run.original, folder / "m"), edit))
    return command


def _with_stats(write: Callable[[Run, Path], None]) -> Command:
    """compress with the statistics file that ``write`` makes."""
    def command(run: Run, folder: Path) -> list[str]:
        write(run, folder / "stats.pt")
        return run.compress_argv(folder / "afm", stats=folder / "stats.pt")
    return command


def _synth_onto(out: Path) -> list[str]:
    return ["synth", "--out", str(out), "--rows", "100", "--tables", "5", "--overwrite", "--quiet"]


def _convert_onto(out: Path) -> list[str]:
    source = out.parent / "tiny.libfm"
    source.write_text("1 0:1 100:1\n0 5:1 150:1\n1 7:1 120:1\n")
    return ["convert", "libfm", "--out", str(out), "--fields", "user:0-99,item:100-199",
            str(source), "--overwrite", "--quiet"]


def _export_onto(run: Run, out: Path) -> list[str]:
    return ["export", "--model", str(run.afm), "--out", str(out), "--overwrite", "--device",
            "cpu", "--quiet"]


def _manifest(run: Run, folder: Path, ratio: str) -> Path:
    manifest = folder / "nightly.csv"
    manifest.write_text(f"checkpoint,calibration,out,ratio\n{run.original},{run.train},row,{ratio}\n")
    return manifest


def _batch(run: Run, out: Path, ratio: str = "2") -> list[str]:
    return ["batch", "--manifest", str(_manifest(run, out.parent, ratio)), "--out", str(out),
            "--executor", "debug", "--folder", str(out.parent / "jobs"), "--quiet"]


def _notes_holding_a_model(run: Run, folder: Path) -> list[str]:
    out = with_notes(folder / "work")
    copy_model(run.original, out / "model")
    return run.train_argv(out, "--overwrite")


def _raw_logs_beside_a_dataset(run: Run, folder: Path) -> list[str]:
    out = folder / "criteo"
    shutil.copytree(run.test, out / "train")
    (out / "day_0.tsv.gz").write_bytes(b"\x1f\x8b raw logs")
    return _synth_onto(out)


def _other_model(folder: Path) -> Path:
    """A model of another input schema (two tables, two dense features)."""
    model = folder / "other_model"
    assert main(["train", "--data", str(other_schema_data(folder / "other")), "--out", str(model),
                 *MODEL]) == 0
    return model


def _flipped(run: Run, path: Path) -> None:
    shutil.copy(run.stats, path)
    flip(path)


# (command, fragments of its one line), by case; a class of docs/reliability.md each.
OUTPUTS: dict[str, tuple[Command, tuple[str, ...]]] = {
    "train --overwrite, a folder of notes holding a model": (
        _notes_holding_a_model,
        ("work is not an afmrec artifact (a folder holding NOTES.md, model); refusing to replace "
         "it, even with --overwrite",)),
    "finetune --overwrite, a model folder holding notes": (
        _copy(lambda r: r.afm, "tuned", lambda r, out: _finetune(r, out.parent, "--overwrite"),
              with_notes),
        ("tuned is not an afmrec artifact (a folder holding NOTES.md",)),
    "synth --overwrite, raw logs beside a dataset": (
        _raw_logs_beside_a_dataset,
        ("criteo is not an afmrec artifact (a folder holding day_0.tsv.gz, train)",)),
    "synth --overwrite onto a model": (
        _copy(lambda r: r.original, "model", lambda r, out: _synth_onto(out)),
        ("model is a model folder; refusing to replace it with a synthetic dataset",)),
    "convert --overwrite onto a model": (
        _copy(lambda r: r.original, "model", lambda r, out: _convert_onto(out)),
        ("model is a model folder; refusing to replace it with a dataset",)),
    "train --overwrite onto a dataset": (
        _copy(lambda r: r.test, "test", lambda r, out: r.train_argv(out, "--overwrite")),
        ("test is a dataset; refusing to replace it with a model folder",)),
    "compress --overwrite onto synth's output": (
        _copy(lambda r: r.data, "data", lambda r, out: r.compress_argv(out, "--overwrite")),
        ("data is a synthetic dataset (train/ and test/); refusing to replace it with a model folder",)),
    "stats --overwrite onto a report": (
        _copy(lambda r: r.root / "report.parquet", "report.parquet",
              lambda r, out: r.stats_argv(out, "--overwrite")),
        ("report.parquet is a report; refusing to replace it with a statistics file",)),
    "export --overwrite onto statistics": (
        _copy(lambda r: r.stats, "stats.pt", _export_onto),
        ("stats.pt is a statistics file; refusing to replace it with a serving artifact",)),
    "evaluate --out onto statistics": (
        _copy(lambda r: r.stats, "stats.pt", lambda r, out: _evaluate(r, r.original, None, "--out", str(out))),
        ("stats.pt is a statistics file; refusing to replace it with a report",)),
    "evaluate --out onto a text file": (
        _onto_text(lambda r, out: _evaluate(r, r.original, None, "--out", str(out))),
        ("notes.txt is not an afmrec artifact (a file that afmrec did not write)",)),
    "batch --out onto a text file": (
        _onto_text(_batch), ("notes.txt is not an afmrec artifact (a file that afmrec did not write)",)),
}

SILENT: dict[str, tuple[Command, tuple[str, ...]]] = {
    "dense columns of other names": (
        lambda r, f: _evaluate(r, r.original, dataset_with_dense(r, f / "d", ["I1", "I2", "X"], [0, 1, 2])),
        ("the data's dense columns ['I1', 'I2', 'X'] are not the model's ['I1', 'I2', 'I3']",)),
    "statistics with changed bytes": (
        _with_stats(_flipped),
        ("stats.pt: damaged (its content differs from the SHA-256 recorded when it was written)",)),
    "training that diverges (validation)": (
        lambda r, f: _train(r, f, "--dense-lr", "1e6"),
        ("training diverged: validation logloss", "(a coin flip scores 0.693); nothing was saved")),
    "training that diverges (no validation)": (
        lambda r, f: _train(r, f, "--dense-lr", "1e6", "--val-fraction", "0"),
        ("training diverged: training loss",)),
    "training loss NaN": (
        lambda r, f: _train(r, f, "--sparse-lr", "1e30"),
        ("training diverged: the training loss is nan; nothing was saved; lower the learning rates",)),
    "fine-tuning that diverges": (lambda r, f: _finetune(r, f, "--dense-lr", "1e6"), ("training diverged",)),
}

MALFORMED: dict[str, tuple[Command, tuple[str, ...]]] = {
    "model.json a JSON list": (_with_json(lambda d: [d]), ("model.json: not an afmrec model (JSON [{",)),
    "model.json a number": (_with_json(lambda d: 0), ("model.json: not an afmrec model (JSON 0, not an object)",)),
    "model.json: a table name that is a number": (
        _with_json(lambda d: d["model"]["tables"][0].update(name=7)),
        ("model.json: field model.tables[0].name must be a string, got 7",)),
    "model.json: a width that is not an integer": (
        _with_json(lambda d: d["model"].update(embedding_dim=8.0)),
        ("model.json: field model.embedding_dim must be an integer, got 8.0",)),
    "model.json: ranks that are not an object": (
        _with_json(lambda d: d.update(ranks="abc")), ("model.json: field ranks must be an object, got 'abc'",)),
    "model.json: an unknown field": (
        _with_json(lambda d: d["model"].update(bogus=1)), ("model.json: field model has unknown field(s) ['bogus']",)),
    "model.json: dense names of another count": (
        _with_json(lambda d: d["model"].update(dense_names=["I1"])),
        ("model.json: field model is invalid: dense_names must name each of the 3 dense features",)),
    "model.json: ranks of blocks the model lacks": (
        _with_json(lambda d: d.update(ranks={"nope": 4}, compress={"activation": None, "fuse": True})),
        ("model.json: the model has no blocks named ['nope']",)),
    "statistics of no block": (
        _with_stats(lambda r, path: save_checked({"moments": {}, "meta": {}}, path, STATISTICS_FORMAT)),
        ("stats.pt: the statistics cover no block",)),
    "--ratio nan": (lambda r, f: r.compress_argv(f / "afm", "--ratio", "nan"),
                    ("argument --ratio: expected a finite number, got 'nan'",)),
    "--weight-decay inf": (lambda r, f: _train(r, f, "--weight-decay", "inf"),
                           ("argument --weight-decay: expected a finite number, got 'inf'",)),
    "--dense-lr 1e300": (lambda r, f: _train(r, f, "--dense-lr", "1e300"),
                         ("dense_lr must be > 0 and at most 3.4e+38, got 1e+300",)),
    "--dcn-low-rank-dim 0": (lambda r, f: _train(r, f, "--arch", "dcn", "--dcn-low-rank-dim", "0"),
                             ("dcn_low_rank_dim >= 1",)),
    "synth --zipf nan": (lambda r, f: ["synth", "--out", str(f / "d"), "--zipf", "nan", "--quiet"],
                         ("argument --zipf: expected a finite number, got 'nan'",)),
    "stats --target of no pattern": (
        lambda r, f: r.stats_argv(f / "s.pt", "--target"),
        ("argument --target: expected at least one argument", "(`afmrec stats --help` lists the options)")),
    "evaluate of no model": (lambda r, f: ["evaluate", "--data", str(r.test), "--quiet"],
                             ("the following arguments are required: NAME=DIR",)),
    "compress --ratio and --rank": (lambda r, f: r.compress_argv(f / "afm", "--rank", "4"),
                                    ("argument --rank: not allowed with argument --ratio",)),
    "batch manifest: ratio nan": (
        lambda r, f: _batch(r, f / "results.parquet", "nan"),
        ("nightly.csv, row 1, column 'ratio': expected float, got 'nan'",)),
}

STAGES: dict[str, tuple[Command, tuple[str, ...]]] = {
    "stats: patterns that leave no block": (
        lambda r, f: r.stats_argv(f / "s.pt", "--exclude", "*"),
        ("the target patterns ['*'] less the excluded ['*'] leave no block",)),
    "finetune --teacher of another schema": (
        lambda r, f: _finetune(r, f, "--teacher", str(_other_model(f))),
        ("other_model: the teacher's inputs are not the student's",)),
    "train --val of another schema": (
        lambda r, f: _train(r, f, "--val", str(other_schema_data(f / "other"))),
        ("the data does not match the model (tables differ",)),
    "finetune --val of another schema": (
        lambda r, f: _finetune(r, f, "--val", str(other_schema_data(f / "other"))),
        ("the data does not match the model (tables differ",)),
}

BAD_INPUTS = {**OUTPUTS, **SILENT, **MALFORMED, **STAGES}


# Commands that succeed, whose outputs a test compares.
def _reordered_dense(run: Run, folder: Path) -> list[str]:
    data = dataset_with_dense(run, folder / "d", DENSE, [2, 0, 1])
    return _evaluate(run, run.original, data, "--out", str(folder / "report.parquet"))


def _batch_row_of_malformed_records(run: Run, folder: Path) -> list[str]:
    """A batch row whose folder holds a ledger and a result that are valid JSON of the
    wrong shape (``[]``): the row runs again (reading them crashed ``batch``)."""
    row = folder / "row"
    row.mkdir()
    for name in ("stages.json", "result.json"):
        (row / name).write_text("[]")
    return _batch(run, folder / "results.parquet")


RUNS: dict[str, Command] = {
    "evaluate, dense in the model's order": lambda r, f: _evaluate(
        r, r.original, None, "--out", str(f / "report.parquet")),
    "evaluate, dense in another order": _reordered_dense,
    "batch, a row's records of the wrong shape": _batch_row_of_malformed_records,
}


@dataclass(frozen=True)
class Ran:
    """A command of the child: its line, result, folder, and the folder's files before."""

    argv: list[str]
    result: Result
    folder: Path
    before: dict[str, str]


@pytest.fixture(scope="module")
def ran(run, tmp_path_factory) -> dict[str, Ran]:
    """Every command of :data:`BAD_INPUTS` and :data:`RUNS`, in one child process."""
    base = tmp_path_factory.mktemp("cases")
    commands = {**{k: v[0] for k, v in BAD_INPUTS.items()}, **RUNS}
    argvs, folders, before = {}, {}, {}
    for i, (name, command) in enumerate(commands.items()):
        folders[name] = base / f"case{i:02d}"
        folders[name].mkdir()
        argvs[name] = command(run, folders[name])
        before[name] = kept(folders[name])
    inputs = kept(run.root.parent)
    results = run_commands("none", list(argvs.values()))
    assert kept(run.root.parent) == inputs  # no command changed the run or its data
    return {name: Ran(argvs[name], r, folders[name], before[name]) for name, r in zip(argvs, results)}


def check_bad_input(ran: dict[str, Ran], case: str) -> None:
    """Status 2, one line naming what is wrong, and no file written or replaced."""
    r = ran[case]
    assert_one_line(r.result, r.argv[0], *BAD_INPUTS[case][1])
    assert kept(r.folder) == r.before
    assert leftovers(r.folder) == []


@pytest.mark.parametrize("case", OUTPUTS)
def test_10_overwrite_replaces_only_an_output_of_the_same_kind(ran, case):
    check_bad_input(ran, case)


@pytest.mark.parametrize("case", SILENT)
def test_11_what_would_be_silently_wrong_is_refused(ran, case):
    check_bad_input(ran, case)


@pytest.mark.parametrize("case", MALFORMED)
def test_12_malformed_files_and_option_values_are_one_line(ran, case):
    check_bad_input(ran, case)


@pytest.mark.parametrize("case", STAGES)
def test_13_inputs_a_stage_cannot_use_are_one_line(ran, case):
    check_bad_input(ran, case)


def test_11_dense_columns_are_matched_by_name(ran):
    """The same dense columns stored in another order evaluate to the same AUC and
    logloss (they were read by position: AUC 0.554 instead of 0.601)."""
    runs = [ran["evaluate, dense in the model's order"], ran["evaluate, dense in another order"]]
    assert [r.result.rc for r in runs] == [0, 0], [r.result.stderr[-2000:] for r in runs]
    (same,), (other,) = (read_report(r.folder / "report.parquet") for r in runs)
    assert (other["auc"], other["logloss"]) == (same["auc"], same["logloss"])


def test_12_a_batch_row_whose_records_are_malformed_runs_again(ran):
    r = ran["batch, a row's records of the wrong shape"]
    assert r.result.rc == 0, r.result.stderr[-3000:]
    (result,) = pq.read_table(r.folder / "results.parquet").to_pylist()
    assert (result["status"], result["skipped"]) == ("ok", False)
    assert json.loads((r.folder / "row" / "result.json").read_text())["status"] == "ok"


# ----------------------------------------------------------------------- faults, own children


def test_11_a_damaged_save_of_the_statistics_pass_is_never_resumed_from(run, tmp_path):
    """A pass killed after its saves, one save then damaged: the rerun ignores it (its
    checksum) and resumes from the save before, or from the start, with the uninterrupted
    pass's result (the damaged sums went into the statistics, and the compressed model)."""
    out = tmp_path / "stats.pt"
    argv = run.stats_argv(out, "--checkpoint-every", "1")
    result = run_fault_child(["kill-at-batch:5", "--", *argv])
    assert result.returncode == -9, result.stderr[-3000:]
    saves = sorted((tmp_path / ".stats.pt.partial").glob("rank0-*.pt"))
    assert len(saves) == 2  # the last two are kept
    flip(saves[-1], 0.6)  # inside its tensors
    (rerun,) = run_commands("none", [argv])
    assert rerun.rc == 0, rerun.stderr[-3000:]
    assert_same_stats(out, run.stats)


def test_13_export_onto_a_full_disk_is_one_line_and_replaces_nothing(run, tmp_path):
    """Files may not grow beyond 2 KiB (``ulimit -f``: EFBIG, as a full disk): torch's
    writer aborted the process (status 134) and left its temporary file."""
    out = tmp_path / "afm.pt"
    (result,) = run_commands("fsize:2048", [["export", "--model", str(run.afm), "--out", str(out),
                                              "--device", "cpu", "--quiet"]])
    assert_one_line(result, "export", f"{out}: write failed (File too large); no partial output "
                    "was left and nothing was replaced")
    assert kept(tmp_path) == {} and leftovers(tmp_path) == []


# ------------------------------------------------------------------ 14. jobs of several ranks


def stats_on(run: Run, data: Path, out: Path, *extra: str) -> list[str]:
    argv = run.stats_argv(out, *extra)
    argv[argv.index("--data") + 1] = str(data)
    return argv


def bad_part(run: Run, folder: Path, part: int) -> Path:
    """The training split in two parts (a rank's rows each, under 2 ranks), with an id
    beyond its table in the last row of ``part``: only one rank reads it."""
    table = pq.read_table(run.train)
    write_dataset(table, read_schema(run.train), folder, rows_per_file=table.num_rows // 2)
    path = folder / f"part-{part:05d}.parquet"
    rows = pq.read_table(path)
    ids = rows.column("C3").to_pylist()
    ids[-1] = 20
    field = rows.schema.field("C3")
    pq.write_table(rows.set_column(rows.schema.get_field_index("C3"), field, pa.array(ids, field.type)),
                   path)
    return folder


# (command, start and fragment of the one line that one rank prints), in the order they
# run: each fails on both ranks but the last, on rank 1 only (its rank 0 waits in a
# collective until rank 1 leaves: the launch ends there).
RANK_CASES: dict[str, tuple[Command, str, str]] = {
    "a bad command line": (lambda r, f: r.stats_argv(f / "s.pt", "--target"),
                           "afmrec stats: error: ", "argument --target: expected at least one argument"),
    "a bad option, before the process group": (
        lambda r, f: r.train_argv(f / "m", "--sharding", "bogus"),
        "afmrec train: error: ", "--sharding expects GLOB=TYPE, got 'bogus'"),
    "export under torchrun": (
        lambda r, f: ["export", "--model", str(r.afm), "--out", str(f / "a.pt"), "--quiet"],
        "afmrec export: error: ", "export runs in one process"),
    "a bad option, seen by every rank in the stage": (
        lambda r, f: r.stats_argv(f / "s.pt", "--target", "nope*", "--device", "cpu"),
        "afmrec stats: error: ", "pattern 'nope*' matches no block"),
    "evaluate of data of another schema": (
        lambda r, f: _evaluate(r, r.original, other_schema_data(f / "other"), "--device", "cpu"),
        "afmrec evaluate: error: ", "the data does not match the model"),
    "finetune from a teacher of another schema": (
        lambda r, f: _finetune(r, f, "--teacher", str(_other_model(f)), "--device", "cpu"),
        "afmrec finetune: error: ", "the teacher's inputs are not the student's"),
    "bad data seen by one rank": (
        lambda r, f: stats_on(r, bad_part(r, f / "data", 1), f / "s.pt", "--device", "cpu"),
        "afmrec stats: error: ", "part-00001.parquet (row group 0): column 'C3' has id 20 >= its table size 20"),
}


@dataclass(frozen=True)
class RankLog:
    """One rank's exit status and stderr, by command."""

    codes: list[int]
    errors: list[str]


def rank_logs(log_dir: Path, world: int) -> list[RankLog]:
    """Each rank's output, from torchrun's ``--log-dir`` (``--redirects 3``)."""
    logs = []
    for rank in range(world):
        (folder,) = log_dir.glob(f"*/attempt_0/{rank}")
        codes = [int(line[3:]) for line in (folder / "stdout.log").read_text().splitlines()
                 if line.startswith("rc=")]
        logs.append(RankLog(codes, (folder / "stderr.log").read_text().split(END + "\n")))
    return logs


@dataclass(frozen=True)
class Launch:
    """A torchrun launch of 2 ranks: each rank's log and each command's folder."""

    logs: list[RankLog]
    folders: list[Path]


def _compress_on_two_ranks(run: Run, folder: Path) -> list[str]:
    return run.compress_argv(folder / "afm", "--device", "cpu", "--sharding", "*=row_wise")


@pytest.fixture(scope="module")
def torchrun(run, tmp_path_factory) -> Launch:
    """``torchrun --nproc_per_node 2`` of a compression (test_9), then of every case of
    :data:`RANK_CASES`, in one launch (one command after the other on each rank)."""
    base = tmp_path_factory.mktemp("torchrun")
    commands = [_compress_on_two_ranks, *(command for command, _, _ in RANK_CASES.values())]
    folders, argv = [], []
    for i, command in enumerate(commands):
        folders.append(base / f"command{i}")
        folders[-1].mkdir()
        argv += ["--", *command(run, folders[-1])]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    "2", "--log-dir", str(base / "logs"), "--redirects", "3", str(FAULT_CHILD), "none",
                    *argv], capture_output=True, text=True, timeout=300, env=CHILD_ENV)
    return Launch(rank_logs(base / "logs", 2), folders)


def test_9_compress_on_two_ranks_a_checkpoint_written_by_one(run, torchrun):
    """torchrun --nproc_per_node 2 reshards the one-process checkpoint (row-wise), writes the
    compressed one from two ranks, and one process loads it: the same model as compressing
    in one process."""
    out = torchrun.folders[0] / "afm"
    assert [log.codes[0] for log in torchrun.logs] == [0, 0], [log.errors[0][-3000:] for log in torchrun.logs]
    assert_same_model(out, run.afm, atol=1e-6)
    assert load_record(out).provenance["world_size"] == 2
    assert main(run.evaluate_argv(run.test, out)) == 0


@pytest.mark.parametrize("case", RANK_CASES)
def test_14_under_torchrun_every_rank_stops_and_one_prints_the_line(torchrun, case):
    """Every rank exits with status 2; the line is printed once, by one rank; no rank
    prints a traceback (rank 0 of the last case printed gloo's, 130 lines with torchrun's)."""
    i = 1 + list(RANK_CASES).index(case)
    logs = torchrun.logs
    assert [log.codes[i] for log in logs] == [2, 2], [log.errors[i][-2000:] for log in logs]
    lines = [line for log in logs for line in log.errors[i].splitlines() if line.strip()]
    _, start, fragment = RANK_CASES[case]
    assert len(lines) == 1 and lines[0].startswith(start) and fragment in lines[0], lines


def test_14_under_submitit_a_rank_zero_error_stops_both_tasks_on_one_line(run, tmp_path):
    """Two tasks of a local submitit job; rank 0, which holds the job's store, reads the
    bad rows. ``submit`` reports the stage's line and exits 2 (it reported "RuntimeError:
    afmrec stats exited with status 2", exit 1); rank 1 exits quietly, no gloo traceback."""
    stage = stats_on(run, bad_part(run, tmp_path / "data", 0), tmp_path / "s.pt", "--device", "cpu")
    # (no `--` before the stage: fault_child separates its commands with it)
    (result,) = run_commands("none", [["submit", "--executor", "local", "--tasks-per-node", "2",
                                        "--folder", str(tmp_path / "jobs"), "--wait", *stage]])
    line = assert_one_line(result, "submit", "part-00000.parquet (row group 0): column 'C3' has id "
                           "20 >= its table size 20", "(log: ")
    assert re.match(r"afmrec submit: error: job \d+: afmrec stats: error: ", line), line
    logs = sorted((tmp_path / "jobs").glob("*/*_log.err"))
    assert len(logs) == 2
    texts = [p.read_text() for p in logs]
    printed = [line for t in texts for line in t.splitlines() if line.startswith("afmrec stats: error: ")]
    assert len(printed) == 1 and printed[0] in texts[0]  # by rank 0 only (then submitit's record
    assert "Connection closed" not in texts[1] and "gloo" not in texts[1]  # of the job's failure)
    assert not (tmp_path / "s.pt").exists()
