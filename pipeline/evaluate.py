"""Quality, size and speed of a CTR model: AUC, logloss, parameters, bytes, latency.

Every function takes the model as built by :func:`afmrec.models.build_model` (or a
compressed one): ``model(dense (B, N), sparse KJT) -> logits (B, 1)``, and batches of
:class:`torchrec.datasets.utils.Batch`. Shapes: ``B`` is a batch size, ``S`` the number
of samples over all batches, ``N`` the number of dense features.

Under ``torch.distributed`` (one process per rank, each with its own part of the data),
:func:`evaluate` returns the metrics of the union of all ranks' samples: torchmetrics
gathers the AUC inputs, and the logloss sums are all-reduced once.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark
from torchmetrics.classification import BinaryAUROC
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch

from afmrec.sharding.env import is_distributed

from .errors import InputError


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model over a set of labelled samples.

    Attributes:
        auc: area under the ROC curve (NaN when the labels hold only one class).
        logloss: mean binary cross-entropy of the predicted probabilities, in float64.
        num_samples: number of samples evaluated (over all ranks).
    """

    auc: float
    logloss: float
    num_samples: int


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Runs the model on one batch, moved to ``model``'s device if needed.

    Args:
        model: a CTR model, ``forward(dense (B, N), sparse KJT) -> (B, 1)``.
        batch: dense (B, N), sparse KJT, labels (B,).
    Returns:
        Logits of shape (B,), on the model's device.
    """
    device = model_device(model)
    if batch.dense_features.device != device:
        batch = batch.to(device, non_blocking=True)
    return model(batch.dense_features, batch.sparse_features).view(-1)


def prefetched(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """``batches`` on ``device``, each copied while the one before it computes.

    On CUDA a batch that lies in host memory is copied on a side stream one batch ahead
    (from pinned memory the copy overlaps the step; TorchRec's ``TrainPipelineSparseDist``
    copies its batches the same way), and the compute stream waits for the copy before
    it uses the batch (``record_stream`` tells the allocator which stream uses it).
    Elsewhere, and for batches already on the device, the batches pass through as they
    are (:func:`forward_logits` moves them).

    Args:
        batches: an iterable of batches, iterated once.
        device: the model's device.
    Yields:
        The same batches, in order; on ``device`` where it is a CUDA device.
    """
    if device.type != "cuda":
        yield from batches
        return
    if device.index is None:  # tensors name their device with its index
        device = torch.device("cuda", torch.cuda.current_device())
    copy_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)

    def start_copy(batch: Batch) -> Batch:
        if batch.dense_features.device == device:
            return batch
        with torch.cuda.stream(copy_stream):
            return batch.to(device, non_blocking=True)

    ahead: Batch | None = None
    for batch in batches:
        incoming = start_copy(batch)
        if ahead is not None:
            yield ahead
        compute_stream.wait_stream(copy_stream)
        incoming.record_stream(compute_stream)
        ahead = incoming
    if ahead is not None:
        yield ahead


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts ``model`` in eval mode and restores its previous mode on exit."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def predict_logits(model: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """The model's logits for every sample, in batch order (this rank's samples only).

    Args:
        model: a CTR model.
        batches: batches to score (their labels are ignored).
    Returns:
        Tensor of shape (S,), float, on the CPU.

    Example::

        logits = predict_logits(model, [batch])  # (B,)
    """
    with eval_mode(model), torch.no_grad():
        chunks = [forward_logits(model, b).cpu() for b in batches]
    if not chunks:
        return torch.zeros(0)
    return torch.cat(chunks)


def logits_auc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUC (ties count one half) of logits (S,) against labels (S,) in {0, 1}, fed
    to torchmetrics as float64 probabilities as :func:`evaluate` feeds them."""
    return float(binary_auroc(torch.sigmoid(logits.double()), labels.long()))


def batches_auc(logits_of: Callable[[Batch], torch.Tensor], batches: Iterable[Batch]) -> float:
    """:func:`logits_auc` over labelled ``batches`` of the logits (B,) ``logits_of`` gives
    each (a model, a served artifact, a hidden labelling model)."""
    logits, labels = zip(*[(logits_of(b).cpu(), b.labels.cpu()) for b in batches])
    return logits_auc(torch.cat(logits), torch.cat(labels))


def evaluate(model: nn.Module, batches: Iterable[Batch]) -> EvalResult:
    """AUC and logloss of ``model`` over ``batches`` (labels in {0, 1}).

    The model runs in eval mode under ``torch.no_grad``; its previous mode is restored.
    AUC is torchmetrics' exact ``BinaryAUROC`` (ties count one half). It is fed
    probabilities computed in float64 rather than logits: torchmetrics decides per
    ``update`` call whether its input is logits (any value outside [0, 1]), so a batch
    whose logits all happened to fall in [0, 1] would be scored on another scale.

    Args:
        model: a CTR model, ``forward(dense (B, N), sparse KJT) -> (B, 1)``.
        batches: labelled batches; iterated once.
    Returns:
        The metrics over all samples (all ranks' under ``torch.distributed``).
    Raises:
        InputError: when ``batches`` hold no sample.

    Example::

        result = evaluate(model, val_batches)
        print(f"AUC {result.auc:.4f}  logloss {result.logloss:.4f}")
    """
    device = model_device(model)
    auroc = BinaryAUROC().to(device)
    # [sum of BCE, number of samples, number of positives], summed in float64.
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    with eval_mode(model), torch.no_grad():
        for batch in batches:
            logits = forward_logits(model, batch).double()
            labels = batch.labels.to(device).view(-1).double()
            auroc.update(torch.sigmoid(logits), labels.long())
            totals += torch.stack(
                [
                    F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"),
                    logits.new_tensor(labels.numel()),
                    labels.sum(),
                ]
            )
    if is_distributed():
        dist.all_reduce(totals)
    loss_sum, n, positives = totals.tolist()
    if n == 0:
        raise InputError("evaluate: the batches hold no sample")
    # torchmetrics warns and returns 0 for a single class; the AUC is undefined there.
    auc = float(auroc.compute()) if 0 < positives < n else math.nan
    return EvalResult(auc=auc, logloss=loss_sum / n, num_samples=int(n))


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements; a parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers, each at the element size of its dtype.

    Shared parameters and buffers count once. Optimizer state is not included.
    """
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# Latency defaults: untimed passes, then timed samples (torch.utils.benchmark's Timer runs
# two more untimed passes before each sample).
LATENCY_WARMUP = 2
LATENCY_REPEATS = 10


def latency_note(batch_rows: int, num_threads: int | None = None) -> str:
    """How :func:`measure_latency` measures by default, as a report states it."""
    threads = num_threads or torch.get_num_threads()
    return (f"latency_ms: median of {LATENCY_REPEATS} forward passes of {batch_rows:,} rows "
            f"(torch.utils.benchmark, {LATENCY_WARMUP} warm-up passes, {threads} CPU "
            f"thread{'s' if threads != 1 else ''})")


def measure_latency(
    model: nn.Module,
    batch: Batch,
    *,
    warmup: int = LATENCY_WARMUP,
    repeats: int = LATENCY_REPEATS,
    num_threads: int | None = None,
    run: Callable[[nn.Module, Batch], Any] = forward_logits,
) -> float:
    """Median wall time of one forward pass over ``batch``, in milliseconds.

    Measured with ``torch.utils.benchmark.Timer``: ``warmup`` untimed passes, then
    ``repeats`` samples of one timed pass each (the Timer runs two untimed passes before
    each; on CUDA it synchronises), all with ``num_threads`` CPU threads (the caller's
    count is restored afterwards). Runs in eval mode (restored afterwards) under
    ``torch.no_grad``, on the model's device. Every count is fixed, so ranks of a
    sharded model run the same collectives.

    Args:
        model: a CTR model.
        batch: the input, moved to the model's device once, before timing.
        warmup: untimed passes first (allocator, lazy initialisation).
        repeats: timed samples; the median resists outliers from other processes.
        num_threads: CPU threads during the measurement (default: the current
            ``torch.get_num_threads()``); report it with the latency.
        run: how one pass is called (default: the model's ``(dense, KJT)`` forward; a
            serving artifact is called with ``afmrec.pipeline.export.call``).
    Returns:
        Median milliseconds per forward pass.
    """
    return measure_latencies({"model": model}, batch, warmup=warmup, repeats=repeats,
                             num_threads=num_threads, run=run)["model"]


def measure_latencies(
    models: Mapping[str, nn.Module],
    batch: Batch,
    *,
    warmup: int = LATENCY_WARMUP,
    repeats: int = LATENCY_REPEATS,
    num_threads: int | None = None,
    run: Callable[[nn.Module, Batch], Any] = forward_logits,
) -> dict[str, float]:
    """:func:`measure_latency` of several models (on one device), by name, their samples
    interleaved (model 1, model 2, ..., model 1, ...): a change of the machine's load
    during the measurement weighs on all of them alike, so their ratios hold."""
    if warmup < 0 or repeats < 1:
        raise InputError(
            f"measure_latency: need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}"
        )
    threads = num_threads or torch.get_num_threads()
    device = model_device(next(iter(models.values())))
    batch = batch.to(device)
    timers = {
        name: benchmark.Timer("run(model, batch)", globals={"run": run, "model": model, "batch": batch},
                              num_threads=threads, label=name)
        for name, model in models.items()
    }
    times_ms: dict[str, list[float]] = {name: [] for name in models}
    # Not inference_mode: FBGEMM's fused training kernels (a sharded model) have no CPU
    # kernel outside autograd ("split_embedding_codegen_lookup_adagrad_function_pt2").
    with contextlib.ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        stack.enter_context(torch.no_grad())
        stack.enter_context(_num_threads(threads))
        for _ in range(warmup):
            for model in models.values():
                run(model, batch)
        for _ in range(repeats):
            for name, timer in timers.items():
                times_ms[name].append(timer.timeit(number=1).median * 1e3)
    return {name: statistics.median(t) for name, t in times_ms.items()}


@contextlib.contextmanager
def _num_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
