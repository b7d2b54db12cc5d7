"""Throughput and peak memory of a stage, per rank and over the whole job.

A stage creates a :class:`StageMeter` when it starts (this resets the device's peak
memory counter), wraps the batches it consumes with :meth:`StageMeter.count`, times its
pass with :meth:`StageMeter.timed`, and calls :meth:`StageMeter.gather` (collective in a
job of several ranks) for a :class:`RunInfo`: every rank's samples, seconds, samples/s
and peak memory, and the job's total samples/s. ``RunInfo.to_dict()`` is what the stages
store (``stats.meta["throughput"]``, ``provenance["throughput"]`` of ``model.json``, the
``throughput`` column of the evaluation report).

Two memory figures, never mixed:

* ``peak_memory_gib``: the most device memory held by tensors on this rank's GPU
  (``torch.cuda.max_memory_allocated``) from the meter's creation to the gather; the
  caching allocator's reserve is not included. ``None`` on the CPU.
* ``peak_rss_gib``: the process's peak resident set size (``getrusage``), host memory,
  since the process started (it cannot be reset): an upper bound for the stage's own.

Example::

    meter = StageMeter("stats", env)
    with meter.timed():
        for batch in meter.count(batches):
            model(batch.dense_features, batch.sparse_features)
    info = meter.gather()
    print(info.summary())  # stats: 2 ranks, 812,345 samples/s total (rank 0 ...), ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

from afmrec.sharding.env import DistEnv

GIB = 2**30


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_seconds(fn: Callable[[], Any], device: torch.device, env: DistEnv | None = None) -> float:
    """Wall time of ``fn``, the device synchronised at both ends (queued GPU work counts
    where it was launched); in a job of several ranks, between barriers on every rank."""
    synchronize(device)
    if env is not None and env.is_distributed:
        dist.barrier()
    start = time.perf_counter()
    fn()
    synchronize(device)
    if env is not None and env.is_distributed:
        dist.barrier()
    return time.perf_counter() - start


def fastest_interleaved(fns: Sequence[Callable[[], Any]], device: torch.device,
                        env: DistEnv | None = None, repeats: int = 3) -> list[float]:
    """The fastest :func:`wall_seconds` of each of ``fns``, run in turn ``repeats`` times:
    other load on the machine affects every one alike."""
    times = [[wall_seconds(fn, device, env) for fn in fns] for _ in range(repeats)]
    return [min(column) for column in zip(*times)]


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak of ``device``'s allocated memory (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by tensors on ``device`` since the last reset, in GiB
    (``None`` on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def peak_rss_gib() -> float | None:
    """This process's peak resident set size since it started, in GiB (``None`` where
    ``resource`` is unavailable, as on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB  # bytes / KiB


@dataclass(frozen=True)
class RankRun:
    """What one rank did in a stage.

    Attributes:
        rank: the rank.
        samples: rows of the batches it processed (``None``: a stage without samples).
        seconds: wall time of its timed pass.
        samples_per_s: ``samples / seconds`` (``None`` without samples or time).
        peak_memory_gib: peak GPU memory allocated by tensors, ``None`` on the CPU.
        peak_rss_gib: peak resident host memory of the process since it started.
    """

    rank: int
    samples: int | None
    seconds: float
    samples_per_s: float | None
    peak_memory_gib: float | None
    peak_rss_gib: float | None


@dataclass(frozen=True)
class RunInfo:
    """Throughput and peak memory of one stage over all ranks of a job.

    Attributes:
        stage: the stage's name (``"train"``, ``"stats"``...).
        world_size: number of ranks.
        device: ``"cuda"`` or ``"cpu"``.
        per_rank: one :class:`RankRun` per rank, by rank (at least one).
    """

    stage: str
    world_size: int
    device: str
    per_rank: tuple[RankRun, ...]

    @property
    def total_samples(self) -> int | None:
        """Samples over all ranks (``None`` for a stage without samples)."""
        counts = [r.samples for r in self.per_rank]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]

    @property
    def seconds(self) -> float:
        """Wall time of the slowest rank: the job's."""
        return max(r.seconds for r in self.per_rank)

    @property
    def total_samples_per_s(self) -> float | None:
        """Total samples over the slowest rank's seconds."""
        total = self.total_samples
        return total / self.seconds if total is not None and self.seconds > 0 else None

    @property
    def peak_memory_gib(self) -> float | None:
        """The largest GPU peak over the ranks (``None`` on the CPU)."""
        peaks = [r.peak_memory_gib for r in self.per_rank if r.peak_memory_gib is not None]
        return max(peaks, default=None)

    def to_dict(self) -> dict[str, Any]:
        """JSON- and ``torch.load(weights_only=True)``-safe: plain dicts, lists, numbers."""
        return {
            "stage": self.stage,
            "world_size": self.world_size,
            "device": self.device,
            "per_rank": [dataclasses.asdict(r) for r in self.per_rank],
            "total_samples": self.total_samples,
            "seconds": self.seconds,
            "total_samples_per_s": self.total_samples_per_s,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunInfo:
        """The inverse of :meth:`to_dict` (the derived keys are recomputed)."""
        return cls(d["stage"], d["world_size"], d["device"],
                   tuple(RankRun(**r) for r in d["per_rank"]))

    @classmethod
    def from_json(cls, text: str) -> RunInfo:
        """A record from the JSON text of a report's ``throughput`` column."""
        return cls.from_dict(json.loads(text))

    def report_columns(self) -> dict[str, Any]:
        """The columns of an evaluation report row: total samples/s, the largest GPU peak,
        and the whole record as JSON text (one Parquet type whatever the world size)."""
        return {"samples_per_s": self.total_samples_per_s,
                "peak_memory_gib": self.peak_memory_gib,
                "throughput": json.dumps(self.to_dict())}

    def summary(self, label: str | None = None) -> str:
        """One line, e.g. ``stats: 2 ranks, 812,345 samples/s total (rank 0 405,120,
        rank 1 407,225), peak memory per rank 3.10, 3.02 GiB``.

        Stages without samples give their wall time instead; on the CPU the peak
        resident memory (``peak RSS``) stands in for the GPU's.
        """
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        total = self.total_samples_per_s
        if total is not None:
            each = ", ".join(f"rank {r.rank} {r.samples_per_s or 0:,.0f}" for r in self.per_rank)
            speed = f"{total:,.0f} samples/s total ({each})"
        else:
            each = ", ".join(f"rank {r.rank} {r.seconds:.2f}" for r in self.per_rank)
            speed = f"{self.seconds:.2f} s ({each})"
        if self.device == "cuda":
            what, peaks = "peak memory", [r.peak_memory_gib for r in self.per_rank]
        else:
            what, peaks = "peak RSS", [r.peak_rss_gib for r in self.per_rank]
        memory = ", ".join("-" if p is None else f"{p:.2f}" for p in peaks)
        return f"{label or self.stage}: {ranks}, {speed}, {what} per rank {memory} GiB"


def speedup(many: RunInfo, one: RunInfo) -> float | None:
    """How much faster ``many`` ranks ran than ``one``: the ratio of total samples/s, or
    for stages without samples the ratio of wall times (``None`` where undefined)."""
    if many.total_samples_per_s is not None and one.total_samples_per_s:
        return many.total_samples_per_s / one.total_samples_per_s
    if one.total_samples is None and many.seconds > 0:
        return one.seconds / many.seconds
    return None


class CountedBatches:
    """Batches that add their rows (``batch.labels.numel()``) to a meter as they are read.

    Re-iterable when the source is (one count per pass: a training run's epochs add up);
    ``len()`` and every other attribute (``set_epoch``, ``set_first_batch``...) are the
    source's.
    """

    def __init__(self, batches: Iterable[Any], meter: StageMeter) -> None:
        self._batches = batches
        self._meter = meter

    def __iter__(self) -> Iterator[Any]:
        for batch in self._batches:
            self._meter.samples = (self._meter.samples or 0) + batch.labels.numel()
            yield batch

    def __len__(self) -> int:
        return len(self._batches)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never the source's internals (nor a loop while unpickling)
            raise AttributeError(name)
        return getattr(self._batches, name)


@dataclass
class StageMeter:
    """Counts this rank's samples and times its pass; peak memory since its creation.

    Create it when the stage starts (it resets the peak memory counter of ``env``'s
    CUDA device, so that loading the model counts), wrap the batches with
    :meth:`count` and the pass with :meth:`timed`, then :meth:`gather`.

    Attributes:
        stage: name of the stage, for the record.
        env: this rank's place in the job (device, rank, world size).
        samples: rows counted so far (``None`` until :meth:`count` is used).
        seconds: time spent inside :meth:`timed` blocks so far.
    """

    stage: str
    env: DistEnv
    samples: int | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        reset_peak_memory(self.env.device)

    def count(self, batches: Iterable[Any]) -> CountedBatches:
        """``batches``, adding the rows of each one read to :attr:`samples`."""
        self.samples = self.samples or 0
        return CountedBatches(batches, self)

    @contextlib.contextmanager
    def timed(self) -> Iterator[StageMeter]:
        """Adds the block's wall time to :attr:`seconds` (the device is synchronised at
        both ends, so that queued GPU work counts where it was launched)."""
        synchronize(self.env.device)
        start = time.perf_counter()
        try:
            yield self
        finally:
            synchronize(self.env.device)
            self.seconds += time.perf_counter() - start

    def local(self) -> RankRun:
        """This rank's record."""
        speed = self.samples / self.seconds if self.samples is not None and self.seconds > 0 else None
        return RankRun(self.env.rank, self.samples, self.seconds, speed,
                       peak_memory_gib(self.env.device), peak_rss_gib())

    def gather(self) -> RunInfo:
        """Every rank's record (collective when a process group exists; gloo or NCCL)."""
        mine = dataclasses.asdict(self.local())
        if self.env.is_distributed:
            records: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(records, mine)
        else:
            records = [mine]
        return RunInfo(self.stage, len(records), self.env.device.type,
                       tuple(RankRun(**r) for r in records))


def device_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 10, warmup: int = 3) -> float:
    """Mean milliseconds of one call of ``fn`` on the device's stream (CUDA events), after
    ``warmup`` calls (autotuning, lazy initialisation, TorchScript's profiling runs)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats
