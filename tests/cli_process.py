"""The ``afmrec`` CLI in a process of its own, forked from one that has imported it.

A fresh interpreter spends 5 to 9 seconds of a 2-core machine importing torch, TorchRec
and afmrec; the reliability tests run dozens of commands in processes of their own (to
kill them, limit the size of their files, see all they print). multiprocessing's
forkserver imports those modules once, in a server process that runs nothing else, and
forks each command's process from it: its own pid, rlimits and signals, the real CLI
code, started in a fraction of a second. The server is forked before any of torch's
threads exist, so the children are as sound as a fresh interpreter.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

# What every command's process starts with (imported by the server, once).
PRELOAD = ["afmrec.launch.cli", "afmrec.pipeline.stages", "afmrec.pipeline.export",
           "afmrec.launch.slurm", "tests.fault_child"]
# The children's environment: one thread each (2 cores, tests in parallel with them).
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

_CONTEXT: multiprocessing.context.ForkServerContext | None = None
_START = threading.Lock()


@dataclass(frozen=True)
class Completed:
    """A finished command process (as ``subprocess.CompletedProcess``): ``returncode`` is
    negative for a signal (``-9`` for SIGKILL)."""

    returncode: int
    stdout: str
    stderr: str


def _context() -> multiprocessing.context.ForkServerContext:
    global _CONTEXT
    with _START:
        if _CONTEXT is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            _CONTEXT = context
    return _CONTEXT


def _child(args: list[str], out: str, err: str) -> None:
    """In the forked process: ``fault_child.main(args)`` with its output in two files."""
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    # tqdm's default lock is a multiprocessing semaphore: a killed child would leave it to
    # the resource tracker, which complains on stderr.
    from tqdm import tqdm

    from tests import fault_child

    tqdm.set_lock(threading.RLock())
    status = 1
    try:
        status = fault_child.main(args)
    finally:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_fault_child(args: list[str], timeout: float = 300) -> Completed:
    """``tests/fault_child.py ARGS`` in a process forked from the server.

    Raises:
        TimeoutError: the process ran longer than ``timeout`` (it is killed).
    """
    context = _context()
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # the server (started by the first call) inherits them
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            process = context.Process(target=_child, args=(args, str(out), str(err)))
            process.start()
            process.join(timeout)
            if process.exitcode is None:
                process.kill()
                process.join()
                raise TimeoutError(f"fault_child {args[:3]}... ran over {timeout} s")
            return Completed(process.exitcode, out.read_text(), err.read_text())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
