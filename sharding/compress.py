"""Shard-local folding of embedding tables: ``E' = E U`` where the rows live.

``E U`` is row-local, so a table sharded table-wise, row-wise or table-row-wise is folded
on the ranks that hold its rows, without communication. A column-wise shard holds
``E[:, c]`` and contributes ``E[:, c] U[c, :]``: the partial products of one row block are
summed with all-reduces over chunks of rows, and the result is kept by the rank that holds
the block's first column shard, so the compressed table comes out row-sharded. A whole
table (original or compressed) is never materialised on one rank, unless it was
replicated (``data_parallel``) to begin with.

Every rank must call :func:`fold_table` for the same tables in the same order: the
collectives are issued in an order derived from the global shard metadata, which all
ranks share. :func:`compress_sharded_state` builds a whole compressed model's state
dict this way from a sharded model's.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata
from torch.distributed.tensor import DTensor

# Rows per all-reduce when summing column-wise partial products: bounds the extra memory
# to CHUNK_ROWS x K per rank.
CHUNK_ROWS = 1 << 16


def fold_table(
    weight: ShardedTensor | torch.Tensor, components: torch.Tensor, *, chunk_rows: int = CHUNK_ROWS
) -> ShardedTensor | torch.Tensor:
    """``E @ U`` for a table given as this rank's shards.

    Args:
        weight: the table ``E`` (V, D): a ``ShardedTensor`` (from ``dmp.state_dict()``) or
            a plain replicated tensor (``data_parallel`` tables).
        components: ``U``, (D, K), the same on every rank.
        chunk_rows: rows per all-reduce for column-wise tables.
    Returns:
        ``E U`` (V, K), sharded by rows over the ranks that held ``E``'s rows (a plain
        tensor for a plain input).
    """
    if not isinstance(weight, ShardedTensor):
        return (weight.double() @ components.to(weight.device).double()).to(weight.dtype)
    v, d = weight.size()
    k = components.shape[1]
    metas = weight.metadata().shards_metadata
    local = {tuple(s.metadata.shard_offsets): s.tensor for s in weight.local_shards()}
    blocks: dict[tuple[int, int], list[ShardMetadata]] = defaultdict(list)
    for m in metas:
        blocks[(m.shard_offsets[0], m.shard_sizes[0])].append(m)
    out_shards = []
    for (row0, rows), shards in sorted(blocks.items()):
        shards.sort(key=lambda m: m.shard_offsets[1])
        owner = shards[0]
        folded = (
            _fold_block(shards, local, components, rows, chunk_rows)
            if len(shards) > 1
            else _partial(owner, local, components)
        )
        if folded is not None and tuple(owner.shard_offsets) in local:
            meta = ShardMetadata([row0, 0], [rows, k], owner.placement)
            out_shards.append(Shard(folded.to(weight.dtype), meta))
    return ShardedTensor._init_from_local_shards(out_shards, v, k)


def _partial(meta: ShardMetadata, local: dict, components: torch.Tensor) -> torch.Tensor | None:
    """This rank's ``E[rows, c] U[c, :]`` for one shard, or None if it is not held here."""
    tensor = local.get(tuple(meta.shard_offsets))
    if tensor is None:
        return None
    c0, width = meta.shard_offsets[1], meta.shard_sizes[1]
    u = components[c0 : c0 + width].to(tensor.device).double()
    return tensor.double() @ u


def _fold_block(
    shards: list[ShardMetadata],
    local: dict,
    components: torch.Tensor,
    rows: int,
    chunk_rows: int,
) -> torch.Tensor | None:
    """Sums the column shards' partial products of one row block, chunk by chunk; every
    rank takes part in the all-reduces, the first column shard's holder keeps the sum."""
    owner_here = tuple(shards[0].shard_offsets) in local
    k = components.shape[1]
    device = next(iter(local.values())).device if local else components.device
    kept = torch.empty(rows, k, dtype=torch.float64, device=device) if owner_here else None
    held = [m for m in shards if tuple(m.shard_offsets) in local]
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        acc = torch.zeros(stop - start, k, dtype=torch.float64, device=device)
        for m in held:
            tensor = local[tuple(m.shard_offsets)][start:stop]
            c0, width = m.shard_offsets[1], m.shard_sizes[1]
            acc += tensor.double() @ components[c0 : c0 + width].to(device).double()
        dist.all_reduce(acc)
        if kept is not None:
            kept[start:stop] = acc
    return kept


def compress_sharded_state(
    sharded: Mapping[str, Any],
    skeleton: nn.Module,
    compress: Callable[[nn.Module], Any],
    tables: Sequence[tuple[str, str, torch.Tensor | None]],
) -> dict[str, Any]:
    """The compressed model's state dict, tables folded where their shards live.

    ``skeleton`` (the uncompressed architecture, tables on ``meta``) takes this rank's
    copy of the replicated weights of ``sharded`` (everything that is not a
    ``ShardedTensor`` or ``DTensor``) and is compressed in place by ``compress``: that
    folds every Linear and builds the projections, and only shapes the tables. Each table
    ``E`` is then replaced by ``E U`` computed from its local shards (:func:`fold_table`).

    Args:
        sharded: the sharded model's ``state_dict()`` (``DistributedModelParallel``'s).
        skeleton: the uncompressed model, its tables on the ``meta`` device.
        compress: compresses ``skeleton`` in place.
        tables: per table, in the order every rank folds them: its key in ``sharded``,
            its key in the compressed model where compression renames it (the key in
            ``sharded`` is kept where the compressed model has no such key), and ``U``
            (D, K), or None for a table kept whole.

    Returns:
        The compressed model's state: the skeleton's materialised tensors and the folded
        tables (sharded by rows, as :func:`fold_table` returns them).

    Collective: every rank calls it with the same ``tables``.
    """
    replicated = {k: v for k, v in sharded.items() if not isinstance(v, (ShardedTensor, DTensor))}
    skeleton_state = skeleton.state_dict()
    skeleton.load_state_dict(
        {k: v for k, v in replicated.items() if k in skeleton_state and not skeleton_state[k].is_meta},
        strict=False,
    )
    compress(skeleton)
    full = skeleton.state_dict()
    state = {k: v for k, v in full.items() if not v.is_meta}
    for src, dst, components in tables:
        key = dst if dst in full else src
        state[key] = sharded[src] if components is None else fold_table(sharded[src], components)
    return state
