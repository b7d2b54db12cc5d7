"""``output_lock``: one writer per output, across processes and hosts sharing a folder.

The lock is ``fcntl.flock`` on a hidden file ``.NAME.lock`` beside the output, held for
the duration of a stage, and removed when the stage ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from afmrec.common.files import clean_stale, held_here

from .errors import InputError

log = logging.getLogger(__name__)

_HOST = socket.gethostname()


def _acquire(path: Path, lock: Path) -> tuple[int | None, str | None]:
    """(file descriptor holding the lock, None) or (None, why it is not ours).

    The lock file is removed by its holder when the stage ends (:func:`_release`), so a
    process may lock a file that was just unlinked: after locking, it checks that the
    path still names the file it holds, and starts over if not.
    """
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return None, f"{path}: cannot create the lock file {lock} ({e.strerror})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            return None, (f"{path} is being written by another process ({holder}); wait for it "
                          "to finish or choose another --out")
        except OSError as e:  # a filesystem without locks: say so, and go on unprotected
            os.close(fd)
            log.warning("%s: cannot lock %s (%s); concurrent writers will not be detected",
                        path, lock.name, e.strerror)
            return None, None
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed it after we opened it: try again
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {_HOST}\n".encode(), 0)
    return fd, None


def _release(lock: Path, fd: int) -> None:
    """Removes the lock file, then unlocks it: whoever opened it meanwhile sees it gone."""
    try:
        lock.unlink(missing_ok=True)
    except OSError as e:  # a read-only folder: leave it, the kernel lock is what counts
        log.info("%s: could not remove the lock file (%s)", lock, e.strerror)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Holds an advisory lock on the output ``path`` for the duration of a stage.

    The lock is ``fcntl.flock`` on ``.NAME.lock`` beside ``path``. The file records the
    holder and is removed when the stage ends (a killed holder leaves it: the kernel
    releases its lock, and the next holder removes the file). A second writer of the
    same output fails at once with an :class:`InputError` naming the holder. Once locked,
    what earlier, interrupted writes of ``path`` left is cleaned up (:func:`clean_stale`).
    Collective under a process group: rank 0 holds the lock for the job.

    Example::

        with output_lock(out):
            compress_stage(model_dir, stats, out, ...)
    """
    # Imported here, as torch.distributed is: importing this module does not import torch.
    from afmrec.sharding.env import broadcast_object, is_collective, is_rank_zero

    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    fd, error = (None, None)
    if is_rank_zero():
        fd, error = _acquire(path, lock)
    if is_collective():
        error = broadcast_object(error)
    if error is not None:
        raise InputError(error)
    try:
        with held_here(path):
            if is_rank_zero():
                clean_stale(path)  # before the stage looks at what exists
            yield
    finally:
        if fd is not None:
            _release(lock, fd)
