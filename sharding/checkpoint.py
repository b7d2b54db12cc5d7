"""Model checkpoints with ``torch.distributed.checkpoint`` (DCP).

The same two calls save and load an unsharded model in one process and a sharded one
under ``DistributedModelParallel`` (each rank writes and reads its own shards), and a
checkpoint written under one plan or world size loads under another.

DCP has no checksums: a damaged byte inside a tensor loads as a wrong weight, silently.
So every checkpoint also holds ``checksums.json`` (size and SHA-256 of each of its files),
and loading verifies it: a missing, truncated or damaged file is an error that names it.
Weights that are NaN or infinite are refused when saving and when loading, naming the
tensor. Under a process group these checks are collective (every rank raises the same
error), so that no rank is left waiting in a collective that another one skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from afmrec.common.errors import InputError
from afmrec.common.files import write_json

from .env import raise_on_any_rank, rank_world

CHECKSUMS = "checksums.json"
CHECKSUMS_FORMAT = "afmrec.checksums/1"
# Elements per chunk of the finiteness check: bounds its temporary memory on huge tables.
_FINITE_CHUNK = 1 << 24


def save_state(model: nn.Module | dict[str, Any], checkpoint_dir: str | os.PathLike[str]) -> None:
    """Writes ``model.state_dict()`` (or a state dict) to ``checkpoint_dir`` with DCP,
    then its ``checksums.json``.

    Collective under a process group: each rank writes its shards; replicated tensors
    are written once; each rank hashes the files it wrote.

    Raises:
        InputError: a tensor holds NaN or infinite values (nothing is written).
        OSError: a file could not be written (the errno of the first failing rank).
    """
    state = model if isinstance(model, dict) else model.state_dict()
    raise_on_any_rank(_nonfinite(state, "refusing to save the model (did training diverge?)"))
    path = Path(checkpoint_dir)
    try:
        dcp.save(state, checkpoint_id=str(path))
    except CheckpointException as e:  # not an Exception: DCP derives it from BaseException
        rank, cause = _first_failure(e)
        if isinstance(cause, OSError):
            raise cause from None  # keeps the errno (disk full, file too large...)
        raise RuntimeError(f"{path}: checkpoint write failed on rank {rank} ({_one_line(cause)})") from None
    _write_checksums(path)


def load_state_(model: nn.Module, checkpoint_dir: str | os.PathLike[str]) -> None:
    """Loads a DCP checkpoint into ``model`` in place.

    Raises:
        InputError: the checkpoint is missing, truncated, damaged, or does not match the
            model (a missing or extra tensor, or one of another shape), or holds NaN or
            infinite weights, naming the file or the tensor.
    """
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise InputError(f"{path}: checkpoint not found")
    if not (path / ".metadata").is_file():
        raise InputError(f"{path}: not a checkpoint (no .metadata file)")
    raise_on_any_rank(_verify_checksums(path))
    state = model.state_dict()
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or corrupt .metadata
        raise InputError(f"{path}: unreadable checkpoint metadata ({_one_line(e)})") from None
    stored = metadata.state_dict_metadata
    # Read under the names the checkpoint uses (the same tensors: DCP loads into them).
    to_load = {_legacy_name(key, stored): value for key, value in state.items()}
    _check_matches(to_load, stored, path)
    try:
        dcp.load(to_load, checkpoint_id=str(path))
    except CheckpointException as e:
        _, cause = _first_failure(e)
        raise InputError(f"{path}: could not read the checkpoint ({_one_line(cause)}): a file "
                         "is missing, cut short or damaged") from None
    except Exception as e:
        raise InputError(f"{path}: could not read the checkpoint ({_one_line(e)})") from None
    # In one process DCP loads into the state dict's tensors, which for plain modules are
    # the parameters themselves; load_state_dict makes that explicit for every module kind.
    model.load_state_dict(state)
    raise_on_any_rank(_nonfinite(state, f"the checkpoint {path} is unusable"))


# Names that earlier versions wrote, by the pattern of today's name: DLRM-DCNv2's cross
# layers were TorchRec's LowRankCrossNet (kernels of the same shapes) before they became
# CrossNet's Linear layers.
_LEGACY_NAMES = (
    (re.compile(r"^(.*crossnet)\.layers\.(\d+)\.down\.weight$"), r"\1.V_kernels.\2"),
    (re.compile(r"^(.*crossnet)\.layers\.(\d+)\.up\.weight$"), r"\1.W_kernels.\2"),
    (re.compile(r"^(.*crossnet)\.layers\.(\d+)\.up\.bias$"), r"\1.bias.\2"),
)


def _legacy_name(key: str, stored: dict[str, Any]) -> str:
    """``key``, or the name an earlier version stored the same tensor under."""
    if key in stored:
        return key
    for pattern, old in _LEGACY_NAMES:
        legacy = pattern.sub(old, key)
        if legacy != key and legacy in stored:
            return legacy
    return key


def _check_matches(state: dict[str, Any], stored: dict[str, Any], path: Path) -> None:
    missing = sorted(set(state) - set(stored))
    if missing:
        raise InputError(f"{path}: the checkpoint has no tensor {missing[0]!r} that the model needs")
    # Entries outside the model's modules (a training loop's optimizer state, step
    # counters) are not the model's business; one inside them is a table or layer the
    # model lacks.
    modules = {key.split(".")[0] for key in state}
    extra = sorted(k for k in set(stored) - set(state) if k.split(".")[0] in modules)
    if extra:
        raise InputError(
            f"{path}: the checkpoint holds tensor {extra[0]!r}, which the model does not have "
            "(a checkpoint of another architecture?)"
        )
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            have = tuple(stored[key].size) if hasattr(stored[key], "size") else None
            if have is not None and tuple(value.shape) != have:
                raise InputError(
                    f"{path}: tensor {key!r} has shape {have} in the checkpoint, "
                    f"the model expects {tuple(value.shape)}"
                )


# --- checks that every rank must agree on ---------------------------------------------------


def _local_tensors(value: Any) -> Iterator[torch.Tensor]:
    """This rank's part of a state-dict value."""
    if isinstance(value, ShardedTensor):
        yield from (shard.tensor for shard in value.local_shards())
    elif isinstance(value, DTensor):
        yield value.to_local()
    elif isinstance(value, torch.Tensor):
        yield value


def _nonfinite(state: dict[str, Any], consequence: str) -> str | None:
    """The first tensor (by name) with NaN or infinite values on this rank, as a message."""
    for key in sorted(state):
        for t in _local_tensors(state[key]):
            if t.is_meta or not t.is_floating_point() or t.numel() == 0:
                continue
            flat = t.detach().reshape(-1)
            if all(bool(torch.isfinite(c).all()) for c in flat.split(_FINITE_CHUNK)):
                continue
            bad = sum(int((~torch.isfinite(c)).sum()) for c in flat.split(_FINITE_CHUNK))
            return f"tensor {key!r} holds {bad} NaN or infinite value(s): {consequence}"
    return None


# --- checksums ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _writer(name: str, world: int) -> int:
    """The rank that hashes a file: DCP names rank r's files ``__r_i.distcp``."""
    m = re.match(r"__(\d+)_", name)
    return int(m.group(1)) % world if m else 0


def _write_checksums(path: Path) -> None:
    """Each rank hashes the files it wrote; rank 0 writes ``checksums.json``."""
    rank, world = rank_world()
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != CHECKSUMS)
    mine = {n: {"size": (path / n).stat().st_size, "sha256": _sha256(path / n)}
            for n in names if _writer(n, world) == rank}
    if world > 1:
        parts: list[dict[str, Any] | None] = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {k: v for part in parts for k, v in (part or {}).items()}
    if rank == 0:
        write_json(path / CHECKSUMS, {"format": CHECKSUMS_FORMAT, "files": mine}, overwrite=True)
    if world > 1:
        dist.barrier()


def _verify_checksums(path: Path) -> str | None:
    """Why the checkpoint's files are not those written, or None (also for a checkpoint
    without ``checksums.json``: written before it existed, or by plain DCP).

    Every rank checks every size (a truncated file); the content hashes are split over
    the ranks.
    """
    record_path = path / CHECKSUMS
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        files = {name: (int(v["size"]), str(v["sha256"])) for name, v in record["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{record_path}: unreadable ({_one_line(e)})"
    rank, world = rank_world()
    for i, (name, (size, digest)) in enumerate(sorted(files.items())):
        p = path / name
        if not p.is_file():
            return f"{p}: checkpoint file missing"
        have = p.stat().st_size
        if have != size:
            return f"{p}: {have} bytes where {size} were written (truncated or replaced)"
        if i % world == rank and _sha256(p) != digest:
            return f"{p}: damaged (its SHA-256 differs from the one recorded when it was written)"
    return None


# --- errors ------------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _first_failure(e: CheckpointException) -> tuple[int, BaseException]:
    """(rank, underlying error) of the lowest rank that failed in a DCP collective."""
    rank, failure = min(e.failures.items(), key=lambda kv: kv[0])
    return rank, failure[0] if isinstance(failure, tuple) else failure
