"""The CUDA graph of a batch's statistics update.

On CUDA the update of a batch is a few dozen small kernels, which the host launches more
slowly than the GPU runs them: :class:`~afmrec.pipeline.stats.StatsCollector` captures it
once per shape (:func:`capture`) and replays it, one launch a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from afmrec.models.kernels.centring import RowGroups, SharedAddresses

from .observers import Observer, Seen


@dataclass
class CapturedUpdate:
    """A CUDA graph of one batch's update, the input buffers it reads, and the one address
    table of the buffers that read rows in place."""

    buffers: list[list[torch.Tensor | RowGroups]]
    addresses: SharedAddresses
    graph: Any  # torch.cuda.CUDAGraph


def capture(work: list[tuple[Observer, Seen]], sums: list[torch.Tensor]) -> CapturedUpdate:
    """Captures the update of ``work`` as a CUDA graph over fresh input buffers. The sums
    are left as they were: the warm-up run that capture needs (on a side stream, as
    ``torch.cuda.graphs`` asks) is undone, and capture itself runs nothing."""
    buffers = [o.buffers(key, seen) for o, (key, seen) in work]
    addresses = SharedAddresses([b for bs in buffers for b in bs if isinstance(b, RowGroups)])
    for (o, (key, seen)), bs in zip(work, buffers):
        o.fill(key, bs, seen)
    addresses.upload()

    def run() -> None:
        for (o, (key, _)), inputs in zip(work, buffers):
            o.update(key, inputs)

    saved = [t.clone() for t in sums]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(sums, saved):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        run()
    return CapturedUpdate(buffers, addresses, graph)
