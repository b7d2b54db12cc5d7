"""The artifacts afmrec writes: their kinds, checksummed torch files, provenance.

Every stage writes its outputs atomically and never over an input or an output of
another kind: the writers are :mod:`afmrec.common.files` (re-exported here, so that a
stage imports one module), :func:`shared_atomic_dir` is their collective form for a
folder that every rank of a job writes, and :func:`output_lock` keeps two jobs from
writing the same output. This module is the catalogue of what the pipeline writes: the
:class:`Kind` of each artifact (a model folder, a dataset, a statistics file, a report...),
registered with the writers when it is imported, so that an existing output is replaced
only by one of its own kind (:func:`check_replaceable`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

# The writers, re-exported: the stages import them from here.
from afmrec.common.files import (  # noqa: F401
    GENERIC,
    JSON,
    PARQUET,
    Kind,
    WriteError,
    atomic_dir,
    atomic_file,
    check_replaceable,
    clean_stale,
    entries,
    kind_of,
    locked_here,
    parquet_columns,
    publish,
    read_json,
    register_kinds,
    remove_path,
    scratch_path,
    write_errors,
    write_json,
)

from .errors import InputError
from .locks import output_lock  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


# --- kinds of artifact ------------------------------------------------------------------------

# What a model folder holds (save_model: model.json, checkpoint/, and for a compressed
# model the bases and ranks that compress writes beside them).
MODEL_ENTRIES = frozenset({"model.json", "checkpoint", "bases.pt", "ranks.parquet"})
DATASET_MARKER = "_dataset.json"
SPLIT_NAMES = frozenset({"train", "test"})


def _is_model_folder(path: Path) -> bool:
    return (path / "model.json").is_file() and entries(path) <= MODEL_ENTRIES


def _is_dataset(path: Path) -> bool:
    return (path / DATASET_MARKER).is_file() and all(
        n == DATASET_MARKER or n.endswith(".parquet") for n in entries(path))


def _is_splits(path: Path) -> bool:
    """``afmrec synth``'s output: ``train/`` and perhaps ``test/``, each a dataset."""
    names = entries(path)
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


def _is_report(path: Path) -> bool:
    from .report import REPORT_COLUMNS

    return set(REPORT_COLUMNS) <= (parquet_columns(path) or set())


def _is_batch_results(path: Path) -> bool:
    from .batch import RESULT_SCHEMA

    return set(RESULT_SCHEMA.names) <= (parquet_columns(path) or set())


def _is_serving_artifact(path: Path) -> bool:
    from .export import read_metadata

    try:
        read_metadata(path)
    except InputError:
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
# Tried in this order, before the generic kinds (PARQUET, JSON: benchmark records,
# learning curves).
register_kinds(MODEL, SPLITS, DATASET, STATISTICS, STATISTICS_SAVE, REPORT, BATCH_RESULTS, SERVING)


# --- a folder that every rank writes ---------------------------------------------------------


@contextlib.contextmanager
def shared_atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False,
                      kind: Kind | None = None) -> Iterator[Path]:
    """:func:`atomic_dir` for a folder that every rank of a job writes into (a sharded
    checkpoint). Collective: rank 0 picks the temporary folder and renames it when every
    rank is done; in a single process it is :func:`atomic_dir`.
    """
    # Imported here, as torch.distributed is: importing this module does not import torch.
    from afmrec.sharding.env import barrier, broadcast_object, is_collective, is_rank_zero

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
            with write_errors(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = scratch_path(path)
                tmp.mkdir()
            decision = (None, str(tmp))
        except InputError as e:
            decision = (str(e), None)
    error, tmp_name = broadcast_object(decision)
    if error:
        raise InputError(error)
    tmp = Path(tmp_name)
    try:
        with write_errors(path):
            yield tmp
    except BaseException:
        if is_rank_zero():  # every rank failed in the same collective (or is about to)
            remove_path(tmp)
        raise
    barrier()
    error = None
    if is_rank_zero():
        try:
            with write_errors(path):
                publish(tmp, path, overwrite, kind)
        except InputError as e:
            remove_path(tmp)
            error = str(e)
    error = broadcast_object(error)
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


# --- provenance ----------------------------------------------------------------------------


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
