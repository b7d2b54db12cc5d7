"""Runs the ``afmrec`` CLI in this process with one fault injected (for test_reliability).

    python tests/fault_child.py FAULT -- ARGV... [-- ARGV...]

Each ARGV is one ``afmrec`` command line, run in turn; the exit status of each is printed
as ``rc=N``, and :data:`END` follows what it printed on stderr (an exception that escapes
a command prints its traceback there, as the interpreter would, and counts as status 1).
FAULT is one of:

  none                 no fault: bad inputs run as real commands, several in one process
  kill-at-batch:N      SIGKILL (what ``kill -9`` sends) when the data reader builds its
                       N-th batch: in the middle of a statistics or training pass
  kill-before:NAME     SIGKILL just before a rename onto a file or folder named NAME: the
                       output is complete under its temporary name
  kill-after:NAME      SIGKILL just after a rename onto NAME
  kill-at-fsync:SUFFIX SIGKILL just after a file whose name ends in SUFFIX was fsynced (a
                       DCP data file: in the middle of a checkpoint, before its .metadata)
  fsize:BYTES          no kill: no file may grow beyond BYTES (``ulimit -f``; Python
                       ignores SIGXFSZ, so the write fails with EFBIG, as on a full disk)

The process kills itself at a named point rather than being killed from outside after a
delay, so that every run stops at the same place.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import traceback

END = "-- end of command --"


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap_renames(name: str, before: bool) -> None:
    for attr in ("replace", "rename", "link"):
        real = getattr(os, attr)

        def renamed(src, dst, *args, _real=real, **kwargs):
            hit = os.path.basename(os.fspath(dst)) == name
            if hit and before:
                _die()
            result = _real(src, dst, *args, **kwargs)
            if hit:
                _die()
            return result

        setattr(os, attr, renamed)


def _wrap_fsync(suffix: str) -> None:
    real = os.fsync

    def fsync(fd):
        real(fd)
        path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        if path.endswith(suffix):
            _die()

    os.fsync = fsync


def _wrap_batches(n: int) -> None:
    from afmrec.pipeline.data import reader

    real, count = reader.make_batch, [0]

    def make_batch(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            _die()
        return real(*args, **kwargs)

    reader.make_batch = make_batch


def main(argv: list[str]) -> int:
    fault, sep, *rest = argv
    assert sep == "--", "usage: fault_child.py FAULT -- ARGV... [-- ARGV...]"
    commands, current = [], []
    for a in rest:
        if a == "--":
            commands.append(current)
            current = []
        else:
            current.append(a)
    commands.append(current)

    from afmrec.launch.cli import main as afmrec

    kind, _, value = fault.partition(":")
    if kind == "none":
        pass
    elif kind == "kill-at-batch":
        _wrap_batches(int(value))
    elif kind in ("kill-before", "kill-after"):
        _wrap_renames(value, before=kind == "kill-before")
    elif kind == "kill-at-fsync":
        _wrap_fsync(value)
    elif kind == "fsize":
        limit = int(value)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    status = 0
    for command in commands:
        try:
            rc = afmrec(command)
        except Exception:
            traceback.print_exc()
            rc = 1
        print(f"rc={rc}", flush=True)
        print(END, file=sys.stderr, flush=True)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
