"""Model checkpoints with ``torch.distributed.checkpoint`` (DCP).

The same two calls save and load an unsharded model in one process and a sharded one
under ``DistributedModelParallel`` (each rank writes and reads its own shards), and a
checkpoint written under one plan or world size loads under another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from afmrec.pipeline.errors import InputError


def save_state(model: nn.Module | dict[str, Any], checkpoint_dir: str | os.PathLike[str]) -> None:
    """Writes ``model.state_dict()`` (or a state dict) to ``checkpoint_dir`` with DCP.

    Collective under a process group: each rank writes its shards; replicated tensors
    are written once.
    """
    state = model if isinstance(model, dict) else model.state_dict()
    dcp.save(state, checkpoint_id=str(checkpoint_dir))


def load_state_(model: nn.Module, checkpoint_dir: str | os.PathLike[str]) -> None:
    """Loads a DCP checkpoint into ``model`` in place.

    Raises:
        InputError: the checkpoint is missing, unreadable, or does not match the model
            (a missing or extra tensor, or one of another shape), naming the tensor.
    """
    path = Path(checkpoint_dir)
    if not (path / ".metadata").is_file():
        raise InputError(f"{path}: not a checkpoint (no .metadata file)")
    state = model.state_dict()
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a truncated or corrupt .metadata
        raise InputError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
    _check_matches(state, metadata.state_dict_metadata, path)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        raise InputError(f"{path}: could not read the checkpoint ({type(e).__name__}: {e})") from None
    # In one process DCP loads into the state dict's tensors, which for plain modules are
    # the parameters themselves; load_state_dict makes that explicit for every module kind.
    model.load_state_dict(state)


def _check_matches(state: dict[str, Any], stored: dict[str, Any], path: Path) -> None:
    missing = sorted(set(state) - set(stored))
    if missing:
        raise InputError(f"{path}: the checkpoint has no tensor {missing[0]!r} that the model needs")
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            have = tuple(stored[key].size) if hasattr(stored[key], "size") else None
            if have is not None and tuple(value.shape) != have:
                raise InputError(
                    f"{path}: tensor {key!r} has shape {have} in the checkpoint, "
                    f"the model expects {tuple(value.shape)}"
                )
