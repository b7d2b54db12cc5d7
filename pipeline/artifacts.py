"""Atomic, never-overwriting writes of run-directory artifacts.

Every stage writes its outputs through :func:`atomic_file` or :func:`atomic_dir`: the
content goes to a hidden temporary name in the same folder (``.NAME.tmp-HOST-PID-XXXXXXXX``)
and is renamed into place only when complete, so a crash or a kill never leaves a
half-written artifact visible. What a killed process left beside an output is removed
by the next write of that output (:func:`clean_stale`). A write that fails (disk full,
file-size limit, permissions) raises :class:`WriteError`, one line naming the output, and
replaces nothing. :func:`output_lock` keeps two jobs from writing the same output.

An existing output is replaced only with ``overwrite``, and only by an output of the same
:class:`Kind` (a model by a model, a report by a report), recognised on disk by what it
holds: a folder holding anything that afmrec did not write, or a file of another kind, is
never replaced (:func:`check_replaceable`).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
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
from .locks import locked_here, output_lock  # noqa: F401 (output_lock: re-exported)

log = logging.getLogger(__name__)

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


# What a model folder holds (save_model: model.json, checkpoint/, and for a compressed
# model the bases and ranks that compress writes beside them).
MODEL_ENTRIES = frozenset({"model.json", "checkpoint", "bases.pt", "ranks.parquet"})
DATASET_MARKER = "_dataset.json"
SPLIT_NAMES = frozenset({"train", "test"})
# JSON outputs are small; a larger file is not one of ours (and is not read whole).
_JSON_LIMIT = 64 << 20


# What afmrec leaves beside an output it writes: its lock, a statistics pass's saves, and
# the temporaries of an interrupted write (see _scratch).
_BOOKKEEPING = re.compile(r"^\..+\.(lock|partial|(tmp|old|probe)-.+)$")


def _entries(path: Path) -> set[str]:
    """The names in the folder ``path``, less afmrec's bookkeeping beside its outputs."""
    return {p.name for p in path.iterdir() if not _BOOKKEEPING.match(p.name)}


def _is_model_folder(path: Path) -> bool:
    return (path / "model.json").is_file() and _entries(path) <= MODEL_ENTRIES


def _is_dataset(path: Path) -> bool:
    return (path / DATASET_MARKER).is_file() and all(
        n == DATASET_MARKER or n.endswith(".parquet") for n in _entries(path))


def _is_splits(path: Path) -> bool:
    """``afmrec synth``'s output: ``train/`` and perhaps ``test/``, each a dataset."""
    names = _entries(path)
    return bool(names) and names <= SPLIT_NAMES and all(_is_dataset(path / n) for n in names)


def _torch_format(path: Path) -> str | None:
    """The ``format`` of a ``torch.save``d dict (its ``meta``'s for statistics written
    before they carried a checksum), read without loading its tensors (memory-mapped)."""
    import torch

    try:
        obj = torch.load(path, mmap=True, weights_only=True)
    except Exception:  # not a torch file, or one we cannot read: not ours
        return None
    if not isinstance(obj, dict):
        return None
    meta = obj.get("meta")
    found = obj.get("format") or (meta.get("format") if isinstance(meta, dict) else None)
    return found if isinstance(found, str) else None


def _is_statistics(path: Path) -> bool:
    return (_torch_format(path) or "").startswith("afmrec.stats/")  # a version of STATISTICS_FORMAT


def _is_statistics_save(path: Path) -> bool:
    return _torch_format(path) == STATISTICS_SAVE_FORMAT


def _parquet_columns(path: Path) -> set[str] | None:
    import pyarrow.parquet as pq

    try:
        return set(pq.read_schema(path).names)
    except Exception:  # not Parquet
        return None


def _is_report(path: Path) -> bool:
    from .report import REPORT_COLUMNS

    return set(REPORT_COLUMNS) <= (_parquet_columns(path) or set())


def _is_batch_results(path: Path) -> bool:
    from .batch import RESULT_SCHEMA

    return set(RESULT_SCHEMA.names) <= (_parquet_columns(path) or set())


def _is_serving_artifact(path: Path) -> bool:
    from .export import read_metadata

    try:
        read_metadata(path)
    except InputError:
        return False
    return True


def _is_json(path: Path) -> bool:
    if path.stat().st_size > _JSON_LIMIT:
        return False
    try:
        json.loads(path.read_bytes())
    except ValueError:  # also UnicodeDecodeError
        return False
    return True


MODEL = Kind("model folder", True, _is_model_folder)
DATASET = Kind("dataset", True, _is_dataset)
SPLITS = Kind("synthetic dataset (train/ and test/)", True, _is_splits)
STATISTICS = Kind("statistics file", False, _is_statistics)
STATISTICS_SAVE = Kind("statistics pass save", False, _is_statistics_save)
REPORT = Kind("report", False, _is_report)
BATCH_RESULTS = Kind("batch results table", False, _is_batch_results)
SERVING = Kind("serving artifact", False, _is_serving_artifact)
# Generic kinds last: what other writers produce (benchmark records, learning curves).
PARQUET = Kind("Parquet table", False, lambda p: _parquet_columns(p) is not None)
JSON = Kind("JSON file", False, _is_json)
KINDS = (MODEL, SPLITS, DATASET, STATISTICS, STATISTICS_SAVE, REPORT, BATCH_RESULTS, SERVING,
         PARQUET, JSON)


def kind_of(path: str | os.PathLike[str]) -> Kind | None:
    """The most specific :class:`Kind` of an existing, non-empty ``path``; None if it is
    nothing that afmrec writes."""
    path = Path(path)
    folder = path.is_dir()
    return next((k for k in KINDS if k.folder == folder and k.test(path)), None)


def _is_empty(path: Path) -> bool:
    return not _entries(path) if path.is_dir() else path.stat().st_size == 0


def _foreign(path: Path) -> str:
    """What makes ``path`` a user's: a few of its entries, or "a file"."""
    if not path.is_dir():
        return "a file that afmrec did not write"
    names = sorted(_entries(path))
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"a folder holding {shown}"


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
    tmp = _scratch(path)
    try:
        with _write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if overwrite:
                _check_same_kind(tmp, path, kind)
            _publish(tmp, path, overwrite)
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
    tmp = _scratch(path)
    try:
        with _write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            if overwrite:
                _check_same_kind(tmp, path, kind)
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
def shared_atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False,
                      kind: Kind | None = None) -> Iterator[Path]:
    """:func:`atomic_dir` for a folder that every rank of a job writes into (a sharded
    checkpoint). Collective: rank 0 picks the temporary folder and renames it when every
    rank is done; in a single process it is :func:`atomic_dir`.
    """
    # Imported here, as torch.distributed is: importing this module does not import torch.
    from afmrec.sharding.env import barrier, is_collective, is_rank_zero

    if not is_collective():
        with atomic_dir(path, overwrite=overwrite, kind=kind) as tmp:
            yield tmp
        return
    path = Path(path)
    decision: tuple[str | None, str | None] | None = None
    if is_rank_zero():
        try:
            clean_stale(path)
            check_replaceable(path, overwrite, folder=True, kind=kind)
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
                if overwrite:
                    _check_same_kind(tmp, path, kind)
                _publish(tmp, path, overwrite)
        except InputError as e:
            _remove(tmp)
            error = str(e)
    error = _broadcast(error)
    if error:
        raise InputError(error)


# --- torch files with a checksum ---------------------------------------------------------------

# Formats of the checked torch files (the "format" of their outer dict).
STATISTICS_FORMAT = "afmrec.stats/2"
STATISTICS_SAVE_FORMAT = "afmrec.stats.partial/1"


def _digest_into(h: "hashlib._Hash", obj: Any) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _digest_into(h, key)
            _digest_into(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}:".encode())
        for item in obj:
            _digest_into(h, item)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"cannot checksum a {type(obj).__name__}")


def content_digest(obj: Any) -> str:
    """SHA-256 of a nest of dicts, lists and tuples of tensors and JSON scalars: of the
    values (dtype, shape and bytes of every tensor), not of the file that holds them."""
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def save_checked(state: dict[str, Any], path: str | os.PathLike[str], format: str) -> None:
    """``torch.save`` of ``state`` with the SHA-256 of its content (:func:`content_digest`),
    verified by :func:`load_checked`.

    torch's zip files carry a CRC-32 per record, but ``torch.load`` does not check them:
    without this, a changed byte inside a tensor loads as a wrong number.
    """
    import torch

    torch.save({"format": format, "sha256": content_digest(state), "state": state}, path)


def load_checked(path: str | os.PathLike[str], format: str, what: str,
                 legacy: Callable[[Any], bool] | None = None) -> dict[str, Any]:
    """The state that :func:`save_checked` wrote to ``path`` as ``format``, verified.

    Args:
        path: the file.
        format: the format it must have.
        what: what the file is, for messages ("statistics file").
        legacy: accepts a file of an earlier version, written without a checksum
            (loaded as it is, with a warning); None: such files are refused.

    Raises:
        InputError: the file is missing, unreadable, of another format, or its content
            differs from the checksum recorded when it was written.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        obj = torch.load(path, weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not a readable {what} ({type(e).__name__})") from None
    if isinstance(obj, dict) and obj.get("format") == format:
        try:
            same = obj["sha256"] == content_digest(obj["state"])
        except (KeyError, TypeError):
            same = False
        if not same:
            raise InputError(f"{path}: damaged (its content differs from the SHA-256 recorded "
                             "when it was written)")
        return obj["state"]
    if legacy is not None and legacy(obj):
        log.warning("%s: written without a checksum (by an earlier afmrec); its content "
                    "cannot be verified", path)
        return obj
    raise InputError(f"{path}: not a readable {what} (not of format {format})")


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
