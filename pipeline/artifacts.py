"""Atomic, never-overwriting writes of run-directory artifacts.

Every stage writes its outputs through :func:`atomic_file` or :func:`atomic_dir`: the
content goes to a hidden temporary name in the same folder and is renamed into place only
when complete, so a crash or a kill never leaves a half-written artifact visible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary path; on success it is fsynced and renamed to ``path``.

    Args:
        path: final file name.
        overwrite: replace an existing file (atomically). Without it an existing
            ``path`` is an :class:`InputError`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder; on success it is renamed to ``path``.

    With ``overwrite`` an existing ``path`` is replaced only after the new content is
    complete (the old folder is moved aside, then removed).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _collective() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    if not _collective():
        with atomic_dir(path, overwrite=overwrite) as tmp:
            yield tmp
        return
    import torch.distributed as dist

    path = Path(path)
    if dist.get_rank() == 0:
        error = str(path) + " already exists; refusing to overwrite it" if path.exists() and not overwrite else None
        tmp = _tmp_sibling(path)
        if error is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        decision = (error, str(tmp))
    else:
        decision = None
    error, tmp_name = _broadcast(decision)
    if error:
        raise InputError(error)
    tmp = Path(tmp_name)
    yield tmp
    dist.barrier()
    if dist.get_rank() == 0:
        if path.exists():
            old = _tmp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    dist.barrier()


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
