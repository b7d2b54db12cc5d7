"""Atomic, never-overwriting writes of files and folders.

Every output is written through :func:`atomic_file` or :func:`atomic_dir`: the content
goes to a hidden temporary name in the same folder (``.NAME.tmp-HOST-PID-XXXXXXXX``) and
is renamed into place only when complete, so a crash or a kill never leaves a
half-written output visible. What a killed process left beside an output is removed by
the next write of that output (:func:`clean_stale`). A write that fails (disk full,
file-size limit, permissions) raises :class:`WriteError`, one line naming the output, and
replaces nothing.

An existing output is replaced only with ``overwrite``, and only by an output of the same
:class:`Kind` (a model by a model, a report by a report), recognised on disk by what it
holds: a folder holding anything that afmrec did not write, or a file of another kind, is
never replaced (:func:`check_replaceable`). This module knows the generic kinds (Parquet
tables, JSON files); the pipeline registers the kinds of its artifacts
(:func:`register_kinds`, done by :mod:`afmrec.pipeline.artifacts`).

A leaf: it imports nothing of afmrec but :mod:`afmrec.common.errors`, so that every folder
(``sharding`` among them) may write through it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import InputError

log = logging.getLogger(__name__)

_HOST = socket.gethostname()
# How much a failed write's diagnosis tries to write (see _probe).
_PROBE_BYTES = 1 << 20
# Outputs this process holds an output lock on (resolved paths; see held_here).
_LOCKED: set[str] = set()


class WriteError(InputError):
    """Writing an output failed: disk full, file-size limit, permissions, I/O error.

    A subclass of :class:`InputError` so that the CLI prints it as one line: the cure is
    outside the program. Nothing was replaced: an earlier version of the output, if any,
    is intact, and no partial output is left.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"{path}: write failed ({reason}); no partial output was left and nothing was replaced"
        )


# --- outputs locked by this process ------------------------------------------------------


def locked_here(path: Path) -> bool:
    """Whether this process holds the output lock of ``path``
    (:func:`afmrec.pipeline.locks.output_lock`)."""
    return str(path.resolve()) in _LOCKED


@contextlib.contextmanager
def held_here(path: Path) -> Iterator[None]:
    """Marks ``path`` as locked by this process for the duration (see :func:`locked_here`):
    :func:`clean_stale` then removes what any process left beside it, since no one else
    can be writing it."""
    key = str(path.resolve())
    _LOCKED.add(key)
    try:
        yield
    finally:
        _LOCKED.discard(key)


# --- temporary names and their cleanup ----------------------------------------------------


def scratch_path(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of ``path`` owned by this process: ``.NAME.KIND-HOST-PID-XXXXXXXX``."""
    return path.with_name(f".{path.name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _owner(suffix: str) -> tuple[str, int] | None:
    """(host, pid) from what follows ``.NAME.KIND-``; None if it is not one of our names."""
    parts = suffix.rsplit("-", 2)
    if len(parts) == 2:  # written before host names were recorded: by this host
        parts = [_HOST, *parts]
    try:
        return parts[0], int(parts[1])
    except (IndexError, ValueError):
        return None


def _alive(host: str, pid: int) -> bool:
    if host != _HOST:
        return True  # cannot tell from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path: Path) -> None:
    """Removes a file, a link or a whole folder; a missing ``path`` is no error."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(path: str | os.PathLike[str]) -> None:
    """Removes what interrupted writes of ``path`` left beside it.

    A process killed while writing leaves its hidden temporary (``.NAME.tmp-*``); one
    killed between the two renames of an ``--overwrite`` leaves the previous version set
    aside (``.NAME.old-*``) and no ``path``: that version is put back. Names of processes
    still alive are left alone, unless this process holds the output's lock
    (:func:`held_here`: then no one else can be writing it).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    locked = locked_here(path)
    for kind in ("tmp", "probe", "old"):
        prefix = f".{path.name}.{kind}-"
        for p in sorted(path.parent.glob(glob.escape(prefix) + "*")):
            owner = _owner(p.name[len(prefix):])
            if owner is None or owner == (_HOST, os.getpid()):
                continue
            if not locked and _alive(*owner):
                continue
            if kind == "old" and not os.path.lexists(path):
                os.replace(p, path)
                log.warning("%s: restored the previous version, set aside by an interrupted "
                            "--overwrite", path)
            else:
                remove_path(p)
                log.info("%s: removed %s, left by an interrupted write", path, p.name)


# --- kinds of output ----------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of output that afmrec writes, and how to recognise one on disk.

    Attributes:
        name: what messages call it ("model folder", "statistics file"...).
        folder: whether it is a folder (else a file).
        test: whether an existing, non-empty path is one. Folders are recognised by a
            marker file and by holding nothing but what the kind writes, so that a
            user's folder that merely contains an artifact is not one.
    """

    name: str
    folder: bool
    test: Callable[[Path], bool]

    def __str__(self) -> str:
        return self.name


# What afmrec leaves beside an output it writes: its lock, a statistics pass's saves, and
# the temporaries of an interrupted write (see scratch_path).
_BOOKKEEPING = re.compile(r"^\..+\.(lock|partial|(tmp|old|probe)-.+)$")
# JSON outputs are small; a larger file is not one of ours (and is not read whole).
_JSON_LIMIT = 64 << 20


def entries(path: Path) -> set[str]:
    """The names in the folder ``path``, less afmrec's bookkeeping beside its outputs."""
    return {p.name for p in path.iterdir() if not _BOOKKEEPING.match(p.name)}


def parquet_columns(path: Path) -> set[str] | None:
    """The column names of the Parquet file ``path``; None if it is not Parquet."""
    import pyarrow.parquet as pq

    try:
        return set(pq.read_schema(path).names)
    except Exception:  # not Parquet
        return None


def _is_json(path: Path) -> bool:
    if path.stat().st_size > _JSON_LIMIT:
        return False
    try:
        json.loads(path.read_bytes())
    except ValueError:  # also UnicodeDecodeError
        return False
    return True


# Generic kinds: what other writers produce (benchmark records, learning curves). They are
# tried after every registered kind, so that a file is recognised as its most specific kind.
PARQUET = Kind("Parquet table", False, lambda p: parquet_columns(p) is not None)
JSON = Kind("JSON file", False, _is_json)
GENERIC = (PARQUET, JSON)
# The specific kinds, in the order they are tried (register_kinds).
_REGISTERED: list[Kind] = []


def register_kinds(*kinds: Kind) -> None:
    """Adds kinds of output to those :func:`kind_of` recognises, tried in the order
    registered, before the generic kinds (registering a kind again changes nothing)."""
    _REGISTERED.extend(k for k in dict.fromkeys(kinds) if k not in _REGISTERED)


def known_kinds() -> tuple[Kind, ...]:
    """Every kind :func:`kind_of` tries, in order: the registered ones, then the generic."""
    return (*_REGISTERED, *GENERIC)


def kind_of(path: str | os.PathLike[str]) -> Kind | None:
    """The most specific :class:`Kind` of an existing, non-empty ``path``; None if it is
    nothing that afmrec writes."""
    path = Path(path)
    folder = path.is_dir()
    return next((k for k in known_kinds() if k.folder == folder and k.test(path)), None)


def _is_empty(path: Path) -> bool:
    return not entries(path) if path.is_dir() else path.stat().st_size == 0


def _foreign(path: Path) -> str:
    """What makes ``path`` a user's: a few of its entries, or "a file"."""
    if not path.is_dir():
        return "a file that afmrec did not write"
    names = sorted(entries(path))
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"a folder holding {shown}"


# --- failed writes --------------------------------------------------------------------------


def _probe(path: Path) -> str | None:
    """Why writing beside ``path`` fails, if it does, else None.

    torch's writers report a failed ``write`` as ``unexpected pos ...`` and lose the
    errno: writing some bytes ourselves on the same filesystem recovers it (no space
    left, file too large for ``ulimit -f``, read-only filesystem...).
    """
    probe = scratch_path(path, "probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        return e.strerror or str(e)
    try:
        chunk, written = bytes(1 << 16), 0
        while written < _PROBE_BYTES:
            written += os.write(fd, chunk)
        os.fsync(fd)
        return None
    except OSError as e:
        return e.strerror or str(e)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turns a failure to write ``path`` into a :class:`WriteError` naming it.

    Bad input (:class:`InputError`) passes through, and so does an error that is not a
    failing write (a bug keeps its traceback).
    """
    try:
        yield
    except WriteError as e:
        if e.path == path:
            raise
        raise WriteError(path, e.reason) from e  # a file inside a folder being written
    except InputError:
        raise
    except OSError as e:
        raise WriteError(path, e.strerror or str(e)) from e
    except Exception as e:
        reason = _probe(path)
        if reason is None:
            raise
        raise WriteError(path, reason) from e


def check_replaceable(path: str | os.PathLike[str], overwrite: bool, folder: bool | None = None,
                      kind: Kind | None = None) -> None:
    """An existing ``path`` is replaced only with ``overwrite``, only by the same kind of
    thing, and only if afmrec wrote it: an empty file or folder, or an output of ``kind``
    (:func:`kind_of`). Without a ``kind`` (a writer that tells its kind by what it writes,
    see :func:`atomic_dir`) it must be an output of some kind, a file if not ``folder``
    and a folder if ``folder``. The atomic writers check it; a stage that works long
    before it writes checks it first, so as not to fail at the end.

    Raises:
        InputError: ``path`` may not be replaced, saying why.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise InputError(f"{path} already exists; refusing to overwrite it (--overwrite replaces it)")
    folder = kind.folder if kind is not None else folder
    if folder is not None and path.is_dir() != folder:
        have, want = ("folder", "file") if path.is_dir() else ("file", "folder")
        raise InputError(f"{path} is a {have}; refusing to replace it with a {want}")
    if _is_empty(path):
        return
    have = kind_of(path)
    if have is None:
        raise InputError(f"{path} is not an afmrec artifact ({_foreign(path)}); refusing to "
                         "replace it, even with --overwrite")
    if kind is not None and have != kind:
        raise InputError(f"{path} is a {have}; refusing to replace it with a {kind}, even with "
                         "--overwrite")


def _check_same_kind(tmp: Path, path: Path, kind: Kind | None) -> None:
    """Before an ``overwrite`` publishes ``tmp``: ``path`` must be of the kind written."""
    if not os.path.lexists(path):
        return
    written = kind or kind_of(tmp)
    if written is None:  # a writer of no known kind replaces nothing but an empty path
        if not _is_empty(path):
            raise InputError(f"{path} exists; refusing to replace it with an output of no known kind")
        return
    check_replaceable(path, True, kind=written)


def publish(tmp: Path, path: Path, overwrite: bool, kind: Kind | None = None) -> None:
    """Renames the complete ``tmp`` to ``path``. With ``overwrite`` an existing ``path``
    must first be of the kind written (``kind``, or else ``tmp``'s); without it ``path``
    is never replaced, even by an output that appeared in the meantime.

    Raises:
        InputError: ``path`` may not be replaced, or was written meanwhile.
    """
    if overwrite:
        _check_same_kind(tmp, path, kind)
    _rename(tmp, path, overwrite)


def _rename(tmp: Path, path: Path, overwrite: bool) -> None:
    """Renames the complete ``tmp`` to ``path``; never over an output that appeared in
    the meantime unless ``overwrite``."""
    try:
        if overwrite and os.path.lexists(path):
            if tmp.is_dir():  # no atomic swap of folders: set the old one aside first
                old = scratch_path(path, "old")
                os.replace(path, old)
                os.replace(tmp, path)
                remove_path(old)
            else:
                os.replace(tmp, path)
        elif tmp.is_dir():
            os.rename(tmp, path)  # fails if path is now a non-empty folder or a file
        else:
            _link_or_replace(tmp, path)
    except FileExistsError:
        raise InputError(f"{path} was written meanwhile by another process; refusing to overwrite it") from None
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise InputError(f"{path} was written meanwhile by another process; refusing to overwrite it") from None
    _fsync_dir(path.parent)


def _link_or_replace(tmp: Path, path: Path) -> None:
    """Moves the file ``tmp`` to ``path`` unless ``path`` exists (``FileExistsError``)."""
    try:
        os.link(tmp, path)  # atomic: fails if path exists
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):  # a filesystem without hard links: check, then rename
            raise FileExistsError(errno.EEXIST, "exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- atomic writes ----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = False,
                kind: Kind | None = None) -> Iterator[Path]:
    """Yields a temporary path; on success it is fsynced and renamed to ``path``.

    Args:
        path: final file name.
        overwrite: replace an existing file of the same kind (atomically). Without it an
            existing ``path`` is an :class:`InputError`.
        kind: what is written; None: recognised from the written file (:func:`kind_of`).

    Raises:
        InputError: ``path`` exists and may not be replaced (:func:`check_replaceable`).
        WriteError: the file could not be written (nothing was replaced).
    """
    path = Path(path)
    clean_stale(path)
    check_replaceable(path, overwrite, folder=False, kind=kind)
    tmp = scratch_path(path)
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            publish(tmp, path, overwrite, kind)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False,
               kind: Kind | None = None) -> Iterator[Path]:
    """Yields an empty temporary folder; on success it is renamed to ``path``.

    With ``overwrite`` an existing ``path`` of the same kind (``kind``, or else the kind
    of the written folder: a dataset replaces a dataset, never a model) is replaced only
    after the new content is complete (the old folder is moved aside, then removed; a
    kill between the two renames is repaired by the next write, see :func:`clean_stale`).

    Raises:
        InputError: ``path`` exists and may not be replaced (:func:`check_replaceable`).
        WriteError: the folder could not be written (nothing was replaced).
    """
    path = Path(path)
    clean_stale(path)
    check_replaceable(path, overwrite, folder=True, kind=kind)
    tmp = scratch_path(path)
    try:
        with write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            publish(tmp, path, overwrite, kind)
    finally:
        if tmp.exists():
            remove_path(tmp)


# --- small JSON artifacts ------------------------------------------------------------------


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = False) -> None:
    """Writes ``obj`` as indented JSON, atomically (``overwrite`` replaces a JSON file)."""
    with atomic_file(path, overwrite=overwrite, kind=JSON) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Reads a JSON artifact, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
