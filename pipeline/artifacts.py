"""Atomic, never-overwriting writes of run-directory artifacts.

Every stage writes its outputs through :func:`atomic_file` or :func:`atomic_dir`: the
content goes to a hidden temporary name in the same folder (``.NAME.tmp-HOST-PID-XXXXXXXX``)
and is renamed into place only when complete, so a crash or a kill never leaves a
half-written artifact visible. What a killed process left beside an output is removed
by the next write of that output (:func:`clean_stale`). A write that fails (disk full,
file-size limit, permissions) raises :class:`WriteError`, one line naming the output, and
replaces nothing. :func:`output_lock` keeps two jobs from writing the same output.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError
from .locks import locked_here, output_lock  # noqa: F401 (output_lock: re-exported)

log = logging.getLogger(__name__)

# A folder that --overwrite may replace is empty or an artifact: it holds one of these, at
# its top or in a subfolder (a model; a dataset, or synth's train/ and test/). Anything
# else is a user's folder that a mistyped --out must never delete.
ARTIFACT_MARKERS = ("model.json", "_dataset.json")

_HOST = socket.gethostname()
# How much a failed write's diagnosis tries to write (see _probe).
_PROBE_BYTES = 1 << 20


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


# --- temporary names and their cleanup ----------------------------------------------------


def _scratch(path: Path, kind: str = "tmp") -> Path:
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(path: str | os.PathLike[str]) -> None:
    """Removes what interrupted writes of ``path`` left beside it.

    A process killed while writing leaves its hidden temporary (``.NAME.tmp-*``); one
    killed between the two renames of an ``--overwrite`` leaves the previous version set
    aside (``.NAME.old-*``) and no ``path``: that version is put back. Names of processes
    still alive are left alone, unless this process holds the output's
    :func:`output_lock` (then no one else can be writing it).
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
                _remove(p)
                log.info("%s: removed %s, left by an interrupted write", path, p.name)


# --- failed writes --------------------------------------------------------------------------


def _probe(path: Path) -> str | None:
    """Why writing beside ``path`` fails, if it does, else None.

    torch's writers report a failed ``write`` as ``unexpected pos ...`` and lose the
    errno: writing some bytes ourselves on the same filesystem recovers it (no space
    left, file too large for ``ulimit -f``, read-only filesystem...).
    """
    probe = _scratch(path, "probe")
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
def _write_errors(path: Path) -> Iterator[None]:
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


def check_replaceable(path: str | os.PathLike[str], overwrite: bool, folder: bool) -> None:
    """An existing ``path`` is replaced only with ``overwrite``, only by the same kind of
    thing (a file by a file, a folder by a folder), and a folder only if it is empty or an
    artifact (see :data:`ARTIFACT_MARKERS`). The atomic writers check it; a stage that
    works long before it writes checks it first, so as not to fail at the end.

    Raises:
        InputError: ``path`` may not be replaced, saying why.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not overwrite:
        raise InputError(f"{path} already exists; refusing to overwrite it (--overwrite replaces it)")
    if path.is_dir() != folder:
        have, want = ("folder", "file") if path.is_dir() else ("file", "folder")
        raise InputError(f"{path} is a {have}; refusing to replace it with a {want}")
    if folder and any(path.iterdir()):
        places = [path, *(p for p in path.iterdir() if p.is_dir())]
        if not any((p / m).is_file() for p in places for m in ARTIFACT_MARKERS):
            raise InputError(
                f"{path} holds files that are not an afmrec artifact (no "
                f"{' or '.join(ARTIFACT_MARKERS)}); refusing to replace it, even with --overwrite"
            )


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Renames the complete ``tmp`` to ``path``; never over an output that appeared in
    the meantime unless ``overwrite``."""
    try:
        if overwrite and os.path.lexists(path):
            if tmp.is_dir():  # no atomic swap of folders: set the old one aside first
                old = _scratch(path, "old")
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
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
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path; on success it is fsynced and renamed to ``path``.

    Args:
        path: final file name.
        overwrite: replace an existing file (atomically). Without it an existing
            ``path`` is an :class:`InputError`.

    Raises:
        WriteError: the file could not be written (nothing was replaced).
    """
    path = Path(path)
    clean_stale(path)
    check_replaceable(path, overwrite, folder=False)
    tmp = _scratch(path)
    try:
        with _write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            _publish(tmp, path, overwrite)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder; on success it is renamed to ``path``.

    With ``overwrite`` an existing ``path`` is replaced only after the new content is
    complete (the old folder is moved aside, then removed; a kill between the two renames
    is repaired by the next write, see :func:`clean_stale`).

    Raises:
        WriteError: the folder could not be written (nothing was replaced).
    """
    path = Path(path)
    clean_stale(path)
    check_replaceable(path, overwrite, folder=True)
    tmp = _scratch(path)
    try:
        with _write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            _publish(tmp, path, overwrite)
    finally:
        if tmp.exists():
            _remove(tmp)


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def shared_atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """:func:`atomic_dir` for a folder that every rank of a job writes into (a sharded
    checkpoint). Collective: rank 0 picks the temporary folder and renames it when every
    rank is done; in a single process it is :func:`atomic_dir`.
    """
    # Imported here, as torch.distributed is: importing this module does not import torch.
    from afmrec.sharding.env import barrier, is_collective, is_rank_zero

    if not is_collective():
        with atomic_dir(path, overwrite=overwrite) as tmp:
            yield tmp
        return
    path = Path(path)
    decision: tuple[str | None, str | None] | None = None
    if is_rank_zero():
        try:
            clean_stale(path)
            check_replaceable(path, overwrite, folder=True)
            with _write_errors(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = _scratch(path)
                tmp.mkdir()
            decision = (None, str(tmp))
        except InputError as e:
            decision = (str(e), None)
    error, tmp_name = _broadcast(decision)
    if error:
        raise InputError(error)
    tmp = Path(tmp_name)
    try:
        with _write_errors(path):
            yield tmp
    except BaseException:
        if is_rank_zero():  # every rank failed in the same collective (or is about to)
            _remove(tmp)
        raise
    barrier()
    error = None
    if is_rank_zero():
        try:
            with _write_errors(path):
                _publish(tmp, path, overwrite)
        except InputError as e:
            _remove(tmp)
            error = str(e)
    error = _broadcast(error)
    if error:
        raise InputError(error)


# --- inputs --------------------------------------------------------------------------


def check_not_input(out: str | os.PathLike[str], *inputs: str | os.PathLike[str]) -> None:
    """Outputs never replace, hold, or sit inside an input (inputs stay byte-identical),
    whatever ``--overwrite`` says; paths are compared after resolving symbolic links."""
    out = Path(out).resolve()
    for p in inputs:
        p = Path(p).resolve()
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise InputError(f"output {out} would overwrite or sit inside the input {p}")


# --- small artifacts and provenance ----------------------------------------------------------


def write_json(path: str | os.PathLike[str], obj: Any, *, overwrite: bool = False) -> None:
    """Writes ``obj`` as indented JSON, atomically."""
    with atomic_file(path, overwrite=overwrite) as tmp:
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


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-serialisable object (configs, file listings)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Hash of a file or of every file under a folder (names, sizes and content)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def run_record() -> dict[str, Any]:
    """What a measurement ran on: package versions, the git commit of this checkout
    (``None`` outside one; ``+dirty`` with uncommitted changes), the CPU and any GPU."""
    import platform
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    device = {"cpu": _cpu_name() or platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            device["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return {"versions": versions(), "git_commit": commit, "device": device}


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    """Versions of the packages that produced an artifact."""
    from importlib import metadata

    out = {}
    for pkg in ("afmrec", "torch", "torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
