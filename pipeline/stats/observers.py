"""The forward hooks' side of a statistics pass: observers of block outputs.

An :class:`Observer` holds what its hooks saw during one forward pass and, once the pass
has returned, adds the moments of those outputs to its sums: a :class:`WidthGroup` for
the Linear blocks of one output width, a :class:`TableObserver` for the tables of one
sparse arch. The update reads nothing but its inputs and the sums, so that
:class:`~afmrec.pipeline.stats.StatsCollector` can capture it once as a CUDA graph
(:mod:`.graphs`) and replay it on buffers it refills every batch.

Where tables are observed: at the output of the module that owns the collection (TorchRec's
``SparseArch``), i.e. where the dense part consumes the pooled features. A collection no
``SparseArch`` owns (a user's own model) is observed at its own output, an unsharded
``KeyedTensor`` (:func:`~afmrec.pipeline.blocks.table_hooks`). Empty bags are not
counted: their output is exactly 0 before and after compression.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from afmrec.models.kernels.centring import RowGroups, reads_in_place

from ..blocks import Block
from ..errors import InputError
from .moments import Moments, add_batch_moments_, batch_moments


def stacked_moments(blocks: list[Block], device: torch.device | None) -> dict[str, Moments]:
    """Zero moments of blocks of one width (a sparse arch's tables, or the Linears of one
    output width), as views of stacked (T,), (T, m), (T, m, m) sums (row j: ``blocks[j]``),
    so that one in-place add updates all of them. Blocks of mixed widths get moments of
    their own."""
    widths = {b.out_features for b in blocks}
    if len(widths) != 1:
        return {b.name: Moments.zeros(b.out_features, device) for b in blocks}
    z = dict(dtype=torch.float64, device=device)
    t, m = len(blocks), widths.pop()
    n, s, g = torch.zeros(t, **z), torch.zeros(t, m, **z), torch.zeros(t, m, m, **z)
    return {b.name: Moments(n[j], s[j], g[j]) for j, b in enumerate(blocks)}


def pooled_fields(output: Any, features: Sequence[str]) -> torch.Tensor:
    """The (B, F, D) pooled fields of ``features`` from where tables are observed
    (:class:`~afmrec.pipeline.blocks.TableHook`): a sparse arch's (B, F, D) output (DeepFM's
    also returns the deep tower's input beside them), or a collection's ``KeyedTensor``
    (its ``features``, all D wide, stacked: a copy)."""
    if isinstance(output, KeyedTensor):
        by_key = output.to_dict()
        return torch.stack([by_key[f] for f in features], dim=1)
    fields = output[0] if isinstance(output, tuple) else output
    if not isinstance(fields, torch.Tensor):
        raise InputError(f"cannot observe tables in a {type(fields).__name__} (a sharded collection's "
                         "output): observe them through a TorchRec SparseArch")
    return fields


def _check_unmodified(name: str, y: torch.Tensor, version: int) -> None:
    if y._version != version:
        raise InputError(
            f"the output of {name} was modified in place before the forward pass ended; its "
            "statistics cannot be read (use out-of-place activations)")


# What an observer saw in one forward pass: a hashable key (structure, shapes, dtypes) and
# the tensors themselves.
Seen = tuple[Hashable, list[torch.Tensor]]


class Observer:
    """Outputs held during one forward pass, and how their moments are added to the sums.

    Per batch, :meth:`take` hands over what the hooks saw, :meth:`buffers` allocates the
    update's inputs, :meth:`fill` copies what was seen into them and :meth:`update` adds
    their moments to the sums. The update reads nothing but its inputs and the sums, so
    :class:`~afmrec.pipeline.stats.StatsCollector` can capture it once as a CUDA graph and
    replay it on buffers it refills every batch.
    """

    def take(self) -> Seen | None:
        raise NotImplementedError

    def buffers(self, key: Hashable, seen: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def fill(self, key: Hashable, buffers: list[torch.Tensor], seen: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def update(self, key: Hashable, inputs: list[torch.Tensor]) -> None:
        raise NotImplementedError


@dataclass
class WidthGroup(Observer):
    """The Linear blocks of one output width: their moments are views of stacked sums, and
    the outputs of one forward pass go through one :func:`batch_moments` call."""

    names: list[str]
    stack: list[torch.Tensor]  # n (G,), s (G, m), g (G, m, m): the views' bases
    precision: str = "float32"
    pending: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)  # (j, y, version)

    def observe(self, j: int, y: torch.Tensor) -> None:
        self.pending.append((j, y, y._version))

    def take(self) -> Seen | None:
        items, self.pending = self.pending, []
        if not items:
            return None
        for j, y, version in items:
            _check_unmodified(self.names[j], y, version)
        layout = tuple((j, tuple(y.shape), y.stride(), y.dtype) for j, y, _ in items)
        everyone_once = [j for j, *_ in layout] == list(range(len(self.names)))
        # stacked: every block once, same rows; else (a block skipped or run twice) each alone
        stacked = everyone_once and len({(shape, stride) for _, shape, stride, _ in layout}) == 1
        seen = [y for _, y, _ in items]
        in_place = _in_place(self.precision, seen)
        return (stacked, in_place, layout), seen

    @staticmethod
    def _groups(key: Hashable, seen: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The outputs of each Gram product: all at once (stacked), or each alone."""
        return [seen] if key[0] else [[y] for y in seen]

    def buffers(self, key: Hashable, seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        return [_rows_input((len(ys), *ys[0].shape), ys[0].stride(0), ys[0], key[1])
                for ys in self._groups(key, seen)]

    def fill(self, key: Hashable, buffers: list[torch.Tensor | RowGroups],
             seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        for rows, ys in zip(buffers, self._groups(key, seen)):
            if isinstance(rows, RowGroups):
                rows.point_at([y.data_ptr() for y in ys])
            else:
                torch.stack(ys, out=rows)
        return buffers

    def update(self, key: Hashable, inputs: list[torch.Tensor | RowGroups]) -> None:
        stacked, _, layout = key
        if stacked:
            add_batch_moments_(self.stack, inputs[0], None, self.precision)
            return
        for (j, *_), y in zip(layout, inputs):
            add_batch_moments_([total[j : j + 1] for total in self.stack], y, None, self.precision)


def _in_place(precision: str, outputs: Sequence[torch.Tensor]) -> bool:
    """Whether an update reads ``outputs`` where they lie (:class:`RowGroups`): where the
    Triton pass reads them all, and not for float64 products (which take tensors)."""
    return precision != "float64" and all(reads_in_place(y) for y in outputs)


def _rows_input(shape: tuple[int, ...], row_stride: int, like: torch.Tensor,
                in_place: bool) -> torch.Tensor | RowGroups:
    """An update's (G, R, m) input: the addresses of rows read where they lie (see
    :class:`~afmrec.models.kernels.centring.RowGroups`), or a tensor of ``like``'s type and
    device that the rows are copied into."""
    if in_place:
        return RowGroups(*shape, row_stride, like.device)
    return like.new_empty(shape)


class TableObserver(Observer):
    """The tables of one sparse arch, observed where it returns its (B, F, D) fields: one
    batched Gram product serves every table, and (when each table serves one feature, as
    ours do) three in-place adds into the stacked sums that the tables' :class:`Moments`
    are views of, whatever the number of tables. Empty bags (exactly 0 before and after
    compression) are left out."""

    def __init__(self, blocks: list[Block], feature_names: list[str], moments: Mapping[str, Moments],
                 precision: str) -> None:
        self.precision = precision
        self.plan = [(moments[b.name], [feature_names.index(f) for f in b.features]) for b in blocks]
        self.feature_names = feature_names
        self.observed = sorted({i for _, index in self.plan for i in index})
        first = self.plan[0][0]
        self.stacked = all(len(index) == 1 for _, index in self.plan) and first.n._base is not None
        self.rows: list[int] = []
        if self.stacked:  # the views of block j sit at row j of the stack, in `blocks` order
            self.stack = [t._base for t in first.tensors()]
            self.rows = [self.observed.index(index[0]) for _, index in self.plan]
        self.in_order = self.rows == list(range(len(self.observed)))  # no reordering needed
        self._index: dict[tuple[torch.device, tuple[str, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.pending: list[tuple[torch.Tensor, torch.Tensor, tuple[str, ...], int]] = []

    def hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        kjt: KeyedJaggedTensor = args[0] if args else next(iter(kwargs.values()))
        fields = pooled_fields(output, self.feature_names)
        self.pending.append((fields, kjt.lengths(), tuple(kjt.keys()), fields._version))

    def _index_tensors(self, device: torch.device, keys: tuple[str, ...]):
        """(observed fields, their rows in the lengths, stack rows), built once per device
        and key order (a Python list index would copy to the device every batch)."""
        if (device, keys) not in self._index:
            order = [keys.index(self.feature_names[i]) for i in self.observed]
            as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
            self._index[device, keys] = (as_tensor(self.observed), as_tensor(order), as_tensor(self.rows))
        return self._index[device, keys]

    def take(self) -> Seen | None:
        items, self.pending = self.pending, []
        if not items:
            return None
        for fields, _, _, version in items:
            _check_unmodified("the sparse arch", fields, version)
        in_place = _in_place(self.precision, [f for f, *_ in items])
        layout = tuple((tuple(f.shape), f.stride(), f.dtype, f.device, tuple(n.shape), n.dtype, keys)
                       for f, n, keys, _ in items)
        return (in_place, layout), [t for f, n, _, _ in items for t in (f, n)]

    def buffers(self, key: Hashable, seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        in_place, layout = key
        out = []
        for i, (shape, stride, _, _, _, _, _) in enumerate(layout):
            fields, lengths = seen[2 * i], seen[2 * i + 1]
            out.append(_rows_input((len(self.observed), shape[0], shape[2]), stride[0], fields, in_place))
            out.append(torch.empty_like(lengths))
        return out

    def fill(self, key: Hashable, buffers: list[torch.Tensor | RowGroups],
             seen: list[torch.Tensor]) -> list[torch.Tensor | RowGroups]:
        for i, (_, _, _, device, _, _, keys) in enumerate(key[1]):
            fields, lengths, rows = seen[2 * i], seen[2 * i + 1], buffers[2 * i]
            if isinstance(rows, RowGroups):  # field f's rows: a column of (B, F, D)
                step = fields.stride(1) * fields.element_size()
                rows.point_at([fields.data_ptr() + f * step for f in self.observed])
            else:
                if len(self.observed) != fields.shape[1]:
                    fields = fields.index_select(1, self._index_tensors(device, keys)[0])
                rows.copy_(fields.transpose(0, 1))  # (F', B, D)
            buffers[2 * i + 1].copy_(lengths)
        return buffers

    def update(self, key: Hashable, inputs: list[torch.Tensor | RowGroups]) -> None:
        for i, (_, _, _, device, _, _, keys) in enumerate(key[1]):
            fields, lengths = inputs[2 * i], inputs[2 * i + 1]
            _, order, rows = self._index_tensors(device, keys)
            nonempty = lengths.view(len(keys), -1).index_select(0, order) > 0  # (F', B)
            if self.stacked and self.in_order:
                add_batch_moments_(self.stack, fields, nonempty, self.precision)
                continue
            n, s, g = batch_moments(fields, nonempty, self.precision)
            if self.stacked:
                for total, part in zip(self.stack, (n, s, g)):
                    total += part.index_select(0, rows)
                continue
            for moments, index in self.plan:
                for f in index:
                    j = self.observed.index(f)
                    moments.n += n[j]
                    moments.s += s[j]
                    moments.g += g[j]
