"""Output locks (issue 23): the ``.NAME.lock`` file is removed when the stage ends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from afmrec.pipeline import locks
from afmrec.pipeline.artifacts import output_lock
from afmrec.pipeline.errors import InputError


def test_lock_file_is_removed_when_the_stage_ends(tmp_path: Path):
    out, lock = tmp_path / "model", tmp_path / ".model.lock"
    with output_lock(out):
        assert lock.read_text() == f"pid {os.getpid()} on {locks._HOST}\n"
    assert not lock.exists()
    with pytest.raises(InputError, match="boom"), output_lock(out):
        raise InputError("boom")  # a stage that fails removes it too
    assert list(tmp_path.iterdir()) == []


def test_a_lock_file_left_by_a_killed_holder_is_reused_then_removed(tmp_path: Path):
    lock = tmp_path / ".model.lock"
    lock.write_text("pid 1 on elsewhere\n")  # no process holds it: the kernel lock is gone
    with output_lock(tmp_path / "model"):
        assert lock.read_text().startswith(f"pid {os.getpid()} ")
    assert not lock.exists()


def test_a_lock_file_removed_before_it_was_locked_is_not_held(tmp_path: Path, monkeypatch):
    """The previous holder removes the file between our open and our flock: we would
    hold a lock on a file no one else can see, so the lock is taken again, on the file
    the path names."""
    lock, real_open, opened = tmp_path / ".model.lock", os.open, []

    def open_then_lose_it(path, *args):
        fd = real_open(path, *args)
        if not opened:
            os.unlink(path)  # the previous holder's _release, just after our open
        opened.append(fd)
        return fd

    monkeypatch.setattr(locks.os, "open", open_then_lose_it)
    fd, error = locks._acquire(tmp_path / "model", lock)
    assert error is None and len(opened) == 2 and fd == opened[1]
    assert os.path.samestat(os.fstat(fd), os.stat(lock))
    locks._release(lock, fd)
    assert not lock.exists()
