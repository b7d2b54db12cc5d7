"""The statistics pass: :class:`StatsCollector` and :func:`collect_statistics`.

"Prepare, run the caller's forward loop, convert" (as torchao's calibration): the
:class:`StatsCollector` installs forward hooks (:mod:`.observers`), the caller runs its
own loop, and :meth:`StatsCollector.result` returns mergeable
:class:`~afmrec.pipeline.stats.Statistics`. Under ``DistributedModelParallel`` the
collection itself returns a lazy awaitable, but ``SparseArch`` returns a plain (B, F, D)
tensor on every rank, so one hook serves both.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Hashable, Iterable, Mapping

import torch
from torch import nn

from ..blocks import Block, table_hooks
from ..errors import InputError
from .checkpoint import StatsCheckpoint
from .graphs import CapturedUpdate, capture
from .moments import Moments, Statistics, resolve_precision
from .observers import Observer, Seen, TableObserver, WidthGroup, stacked_moments


class StatsCollector:
    """Observes the outputs of ``blocks`` while the caller runs forward passes.

    Outputs are held until the observed model's forward pass returns; then one update adds
    them all: the tables of a sparse arch through one batched Gram product, the Linears of
    each width through another (a DLRM-DCNv2 has 11 Linear blocks in 5 widths).

    On CUDA the update is a few dozen small kernels a batch, which the host launches more
    slowly than the GPU runs them. So from the second batch of a shape on, the update is
    a CUDA graph: the held outputs are copied into its input buffers and the graph is
    replayed (one launch) on a side stream, where it runs beside the next batch's forward
    pass; its counts equal the eager update's and its sums match them (tested). At most
    :attr:`max_graphs` shapes are captured; others run eagerly. While the collector is
    open, the caller's work on that device runs on a high-priority stream: the GPU's
    scheduler then gives the forward pass's kernels the SMs first and the update fills
    what they leave, so the forward pass's host syncs (which gate a pass) wait only for
    its own kernels.

    Example::

        with StatsCollector(model, find_blocks(model)) as collector:
            for batch in batches:
                model(batch.dense_features, batch.sparse_features)
        stats = collector.result()
    """

    max_graphs = 4

    def __init__(
        self,
        model: nn.Module,
        blocks: Iterable[Block],
        device: torch.device | None = None,
        precision: str = "auto",
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.device = device
        self.precision = resolve_precision(precision, device)
        self.cuda_graphs = cuda_graphs
        self.replays = 0  # batches whose update ran as a CUDA graph
        self._moments: dict[str, Moments] = {}
        self._observers: list[Observer] = []
        self._handles: list[Any] = []
        self._seen: dict[Hashable, int] = {}
        self._graphs: dict[Hashable, CapturedUpdate] = {}
        self._stream: Any = None  # torch.cuda.Stream of the replays
        self._held: list[list[torch.Tensor]] = []  # the outputs the last replay reads
        self._streams: tuple[Any, Any] | None = None  # (the caller's stream, the high-priority one)

    @property
    def moments(self) -> dict[str, Moments]:
        """The sums so far, by block name (outputs still held are added first)."""
        self.flush()
        self._join()
        return self._moments

    def flush(self) -> None:
        """Adds the held outputs (called when the observed model returns)."""
        work = [(o, seen) for o in self._observers if (seen := o.take()) is not None]
        if not work:
            return
        captured = self._graph(work)
        if captured is None:
            self._join()
            for o, (key, seen) in work:
                o.update(key, o.fill(key, o.buffers(key, seen), seen))
            return
        # The graph runs on a side stream, beside the next batch's forward pass: a forward
        # pass waits for the host (launches, TorchRec's input syncs) and leaves the GPU
        # idle enough to hide most of the update. The buffers are refilled only once the
        # previous replay has read them.
        current = torch.cuda.current_stream()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._join()
        for (o, (key, seen)), buffers in zip(work, captured.buffers):
            o.fill(key, buffers, seen)
        captured.addresses.upload()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            captured.graph.replay()
        # The replay may read the outputs where they lie (RowGroups): they stay allocated
        # until the current stream has waited for it (the next _join).
        self._held = [seen for _, (_, seen) in work]
        self.replays += 1

    def _join(self) -> None:
        """Makes the current stream wait for the replayed updates (before the sums are read,
        or the outputs they read are freed)."""
        if self._stream is not None:
            torch.cuda.current_stream().wait_stream(self._stream)
        self._held = []

    def _graph(self, work: list[tuple[Observer, Seen]]) -> CapturedUpdate | None:
        """The CUDA graph of this batch's update: captured the second time a signature
        (which observers saw what shapes) comes; None to run it eagerly."""
        if not self.cuda_graphs or not all(t.is_cuda for _, (_, seen) in work for t in seen):
            return None
        signature = tuple((self._observers.index(o), key) for o, (key, _) in work)
        if signature not in self._graphs:
            self._seen[signature] = self._seen.get(signature, 0) + 1
            if self._seen[signature] < 2 or len(self._graphs) >= self.max_graphs:
                return None
            self._join()  # capture reads and restores the sums
            bases = {id(b): b for m in self._moments.values() for t in m.tensors()
                     for b in [t if t._base is None else t._base]}
            self._graphs[signature] = capture(work, list(bases.values()))
        return self._graphs[signature]

    def __enter__(self) -> "StatsCollector":
        modules = dict(self.model.named_modules())
        linear_by_width: dict[int, list[Block]] = {}
        for b in self.blocks:
            if b.kind == "linear":
                linear_by_width.setdefault(b.out_features, []).append(b)
        for blocks in linear_by_width.values():
            stacked = stacked_moments(blocks, self.device)
            self._moments.update(stacked)
            first = stacked[blocks[0].name]
            group = WidthGroup([b.name for b in blocks], [t._base for t in first.tensors()], self.precision)
            self._observers.append(group)
            for j, b in enumerate(blocks):
                self._handles.append(modules[b.module].register_forward_hook(self._linear_hook(group, j)))
        for point in table_hooks(self.model, self.blocks):
            blocks = list(point.blocks)
            self._moments.update(stacked_moments(blocks, self.device))
            observer = TableObserver(blocks, list(point.features), self._moments, self.precision)
            self._observers.append(observer)
            self._handles.append(modules[point.module].register_forward_hook(observer.hook, with_kwargs=True))
        if self._observers:
            self._handles.append(self.model.register_forward_hook(lambda *_: self.flush()))
        device = torch.device(self.device) if self.device is not None else None
        if self.cuda_graphs and device is not None and device.type == "cuda":
            outer = torch.cuda.current_stream(device)
            fast = torch.cuda.Stream(device, priority=-1)  # lower is sooner
            fast.wait_stream(outer)
            torch.cuda.set_stream(fast)
            self._streams = (outer, fast)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.flush()
        self._join()
        if self._streams is not None:
            outer, fast = self._streams
            outer.wait_stream(fast)
            torch.cuda.set_stream(outer)
            self._streams = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._graphs.clear()

    @staticmethod
    def _linear_hook(group: WidthGroup, j: int):
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # (B, m) as it comes: no reshape or detach where none is needed (each is a
            # dispatched op, and the host is what limits a pass on a GPU)
            y = output if output.dim() == 2 else output.reshape(-1, output.shape[-1])
            group.observe(j, y.detach() if y.requires_grad else y)

        return hook

    def load_(self, moments: Mapping[str, Moments]) -> None:
        """Starts from saved sums (a resumed pass): copied into the observed moments,
        which the hooks hold, so the accumulation continues exactly where it stopped."""
        if set(moments) != set(self._moments):
            diff = sorted(set(moments) ^ set(self._moments))
            raise InputError(f"saved statistics cover other blocks: {diff}")
        for name, saved in moments.items():
            for mine, value in zip(self._moments[name].tensors(), saved.tensors()):
                mine.copy_(value)

    def result(self, meta: dict[str, Any] | None = None) -> Statistics:
        return Statistics(dict(self.moments), dict(meta or {}))


def _batches_from(batches: Iterable[Any], first: int) -> Iterable[Any]:
    """``batches`` from batch ``first`` (0-based) on.

    A reader that can start there (``set_first_batch``, as
    :class:`~afmrec.pipeline.data.ParquetBatches` has) reads none of the batches before,
    and starts at 0 again once iterated; any other iterable is read through them.
    """
    if not hasattr(batches, "set_first_batch"):
        yield from itertools.islice(batches, first, None)
        return
    batches.set_first_batch(first)
    try:
        yield from batches
    finally:
        batches.set_first_batch(0)


def collect_statistics(
    model: nn.Module,
    blocks: Iterable[Block],
    batches: Iterable[Any],
    *,
    progress: bool = False,
    forward: nn.Module | None = None,
    precision: str = "auto",
    checkpoint: StatsCheckpoint | None = None,
    cuda_graphs: bool = True,
    feed: Callable[[nn.Module, Any], torch.Tensor] | None = None,
) -> Statistics:
    """One forward pass over ``batches`` (TorchRec ``Batch``es) with observers.

    Args:
        model: the module whose submodules are observed (block names are its paths).
        blocks: the blocks to observe.
        batches: the calibration batches.
        progress: show a progress bar.
        forward: the module to run, if not ``model`` itself (a
            ``DistributedModelParallel`` wrapping ``model``).
        precision: the batch products' precision, one of :data:`PRECISIONS` (see
            :func:`batch_moments`) or ``"auto"`` (:func:`resolve_precision` for the
            model's device); the sums over batches are float64 in all.
        checkpoint: save the moments every ``checkpoint.every`` batches and resume from
            the last save; ``batches`` must then come in the same order on every run. A
            resumed pass starts a reader that can (``set_first_batch``) at the first batch
            not saved: the batches before are not read.
        cuda_graphs: on CUDA, replay each batch's update as a CUDA graph (see
            :class:`StatsCollector`); False runs it eagerly.
        feed: how one batch is run, ``feed(module, batch)`` (batches of any type, on
            the model's device); default :func:`~afmrec.pipeline.evaluate.forward_logits`
            (``module(batch.dense_features, batch.sparse_features)``).

    Returns:
        The local (this process's) statistics, with ``meta["resumed_from_batch"]`` (0 for
        a pass from the start); call :meth:`Statistics.all_reduce_` to combine ranks.
    """
    from tqdm import tqdm

    from ..evaluate import eval_mode, forward_logits, model_device

    runner = forward if forward is not None else model
    run = feed if feed is not None else forward_logits
    collector = StatsCollector(model, blocks, model_device(model), precision, cuda_graphs)
    done, saved = checkpoint.resume() if checkpoint is not None else (0, {})
    total = len(batches) if hasattr(batches, "__len__") else None
    with eval_mode(runner), collector, torch.no_grad():
        if saved:
            collector.load_(saved)
        # The saved sums already count the batches before ``done``.
        todo = _batches_from(batches, done)
        bar = tqdm(todo, desc="stats", disable=not progress, unit="batch", total=total, initial=done)
        for i, batch in enumerate(bar, start=done + 1):
            run(runner, batch)
            if checkpoint is not None and i % checkpoint.every == 0:
                checkpoint.save(collector.moments, i)
    return collector.result({"resumed_from_batch": done})
