"""Reliability (issue 8), cases 6 to 8: outputs and inputs, kills, failed writes.

An output is never written over an input nor, without ``--overwrite``, over an existing
artifact; a second writer of an output is refused. A stage killed with SIGKILL (the real
CLI in a subprocess, ``tests/fault_child.py``) leaves no partial artifact and a rerun gives
the uninterrupted run's result; a write that fails (a full disk, a file-size limit) is
one line and keeps the previous artifacts. Cases 1 to 5 are in test_reliability.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from afmrec.launch.cli import main
from afmrec.pipeline.artifacts import output_lock

from .reliability_run import (CHILD_ENV, END, KILLED, Run, assert_same_compression, assert_same_model,
                              assert_same_stats, child, copy_model, fail, leftovers, snapshot)

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def run(reliability_run: Run) -> Run:
    """The run that conftest.py makes once for both reliability modules."""
    return reliability_run


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
    # without --overwrite: the set-aside version is put back (and said), then refused
    capsys.readouterr()
    assert main(run.finetune_argv(out)) == 2
    notice, error = capsys.readouterr().err.strip().splitlines()
    assert notice == f"{out}: restored the previous version, set aside by an interrupted --overwrite"
    assert error.startswith("afmrec finetune: error: ") and "afm_ft already exists" in error
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
