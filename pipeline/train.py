"""Training and fine-tuning of a CTR model, in place, with optional early stopping.

One trainer serves the three uses of the pipeline: training the original model,
fine-tuning a compressed one (the same call on the compressed model), and distilling a
compressed student from its original teacher (``teacher=``). Shapes as in
:mod:`afmrec.pipeline.evaluate`.

The optimizer is built in one place, :func:`make_optimizer`, and the step loop touches the
model only through ``forward`` / ``backward`` / ``optimizer.step``: under TorchRec's
``DistributedModelParallel`` the sharded tables are updated by the fused sparse
optimizer, and in one process :func:`~afmrec.pipeline.fused.fused_tables` gives the
tables the same fused path for the duration of training (``TrainConfig.fused_sparse``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from tqdm.auto import tqdm

from .errors import InputError
from .evaluate import EvalResult, evaluate, forward_logits, model_device, prefetched
from .fused import ADAGRAD_EPS, fused_optimizers, fused_parameter_ids, fused_tables
from .train_result import TrainRecord, TrainResult

logger = logging.getLogger(__name__)

# (logits (B,), batch) -> scalar loss
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]

# A model whose logloss is ten times a coin flip's (ln 2) is confidently wrong on most rows:
# its training diverged (too large a learning rate), it did not merely learn little. A
# model that learned nothing scores about ln 2 or the label entropy, below it.
DIVERGED_LOGLOSS = 10 * math.log(2)


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the data and the model are arguments of :func:`train_`).

    Args:
        epochs: passes over the training batches.
        max_steps: stop after this many optimizer steps in all (``None``: no limit).
        dense_lr: Adam learning rate of every parameter that is not an embedding table.
        sparse_lr: Adagrad learning rate of the embedding tables (the weights of every
            torchrec ``EmbeddingBagCollection`` in the model, including the K-wide
            tables inside a ``LowRankEmbeddingBagCollection``). Adagrad's per-coordinate
            step suits tables whose rows are updated with very unequal frequencies.
        weight_decay: L2 penalty of the dense parameters only. Tables get none: with
            dense gradients, decay would shrink every row at every step, also the rows
            the batch never looked up.
        patience: stop after this many evaluations in a row without a lower validation
            logloss (``None``: never stop early). Evaluations happen at the end of every
            epoch, so without ``eval_every`` patience counts epochs. Needs validation
            batches.
        eval_every: also evaluate (and record history) every this many steps.
        seed: seeds torch's RNG for the duration of training (dropout and any other
            randomness in the model); the caller's RNG state is restored afterwards.
            Data order is the batch source's business (e.g. its own seed).
        log_every: update the progress bar's running loss every this many steps.
        distill_temperature: ``T`` of the distillation loss (used only with a teacher).
        eval_at_start: also evaluate before the first step, so that the starting state
            can win: fine-tuning then never returns a model worse on the validation
            rows than the one it started from.
        fused_sparse: in one process, update the tables with TorchRec's fused Adagrad
            (FBGEMM, inside the backward pass, only the rows a batch looked up) instead
            of dense gradients and ``torch.optim.Adagrad``; both compute the same update.
            Under ``DistributedModelParallel`` the tables are always fused.
    """

    epochs: int = 1
    max_steps: int | None = None
    dense_lr: float = 1e-3
    sparse_lr: float = 0.05
    weight_decay: float = 0.0
    patience: int | None = None
    eval_every: int | None = None
    seed: int = 0
    log_every: int = 50
    distill_temperature: float = 1.0
    eval_at_start: bool = False
    fused_sparse: bool = True

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        for name in ("max_steps", "patience", "eval_every"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{name} must be None or >= 1, got {value}")
        # The optimizers hold these as float32 scalars: a larger value overflows.
        top = torch.finfo(torch.float32).max
        for name in ("dense_lr", "sparse_lr", "distill_temperature"):
            value = getattr(self, name)
            _require(0 < value <= top, f"{name} must be > 0 and at most {top:.3g}, got {value}")
        _require(0 <= self.weight_decay <= top,
                 f"weight_decay must be >= 0 and at most {top:.3g}, got {self.weight_decay}")
        _require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")


_LOWER_RATES = "nothing was saved; lower the learning rates (--dense-lr, --sparse-lr)"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(f"TrainConfig: {message}")


def make_optimizer(model: nn.Module, config: TrainConfig) -> KeyedOptimizer:
    """Adagrad for the embedding tables, Adam for everything else.

    Tables are found by module type (every ``EmbeddingBagCollection``, wherever it
    sits), so a compressed model's K-wide tables get Adagrad (``eps`` given explicitly,
    :data:`~afmrec.pipeline.fused.ADAGRAD_EPS`) and its projections Adam. Parameters
    that already carry an in-backward optimizer (TorchRec's fused kernels set
    ``_in_backward_optimizers``) are left to it; under ``DistributedModelParallel`` its
    ``fused_optimizer`` joins the result (key ``"fused"``) with ``sparse_lr``, and so do
    those of the ``FusedEmbeddingBagCollection`` s inside the model (keys ``"fused_0"``...,
    see :func:`~afmrec.pipeline.fused.fused_tables`), whose parameters no other
    optimizer gets.

    Args:
        model: the model to train.
        config: learning rates and weight decay.
    Returns:
        A ``CombinedOptimizer`` with keys ``"sparse"`` and ``"dense"`` (a key is left out
        when the model has no parameter of that kind).
    Raises:
        InputError: when the model has no trainable parameter.
    """
    table_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, (EmbeddingBagCollection, ShardedEmbeddingBagCollection))
        for p in module.parameters()
    }
    fused_ids = fused_parameter_ids(model)
    sparse, dense = {}, {}
    for name, param in model.named_parameters():
        if param.requires_grad and not hasattr(param, "_in_backward_optimizers") and id(param) not in fused_ids:
            (sparse if id(param) in table_ids else dense)[name] = param
    factories = {
        "sparse": lambda ps: torch.optim.Adagrad(ps, lr=config.sparse_lr, eps=ADAGRAD_EPS),
        "dense": lambda ps: torch.optim.Adam(
            ps, lr=config.dense_lr, weight_decay=config.weight_decay
        ),
    }
    optimizers = [
        (key, KeyedOptimizerWrapper(params, factories[key]))
        for key, params in (("sparse", sparse), ("dense", dense))
        if params
    ]
    # Under DMP the fused tables are updated inside backward by model.fused_optimizer,
    # whose zero_grad()/step() push param_groups' lr to the FBGEMM kernel; so are those
    # of the FusedEmbeddingBagCollections that fused_tables swapped in (one process).
    fused = [("fused", model.fused_optimizer)] if isinstance(model, FusedOptimizerModule) else []
    fused += [(f"fused_{i}", o) for i, o in enumerate(fused_optimizers(model))]
    for key, optimizer in fused:
        if optimizer.params:
            for group in optimizer.param_groups:
                group["lr"] = config.sparse_lr
            optimizers.append((key, optimizer))
    if not optimizers:
        raise InputError("make_optimizer: the model has no trainable parameter")
    return CombinedOptimizer(optimizers)


def label_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy of ``logits`` (B,) against ``batch.labels`` (B,)."""
    return F.binary_cross_entropy_with_logits(logits, batch.labels.to(logits).view(-1))


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * BCE(logits / T, sigmoid(teacher_logits / T))``, averaged over the batch.

    The student's logits are softened by the same ``T`` as the teacher's, so the loss is
    minimal exactly at ``logits == teacher_logits`` for any ``T`` (softening only the
    teacher would teach the student logits ``T`` times too small). ``T^2`` keeps gradient
    sizes comparable across temperatures (Hinton et al., 2015). At ``T = 1`` this is plain
    BCE against the teacher's probabilities.

    Args:
        logits: student logits, (B,).
        teacher_logits: teacher logits, (B,).
        temperature: ``T > 0``.
    Returns:
        A scalar tensor.
    """
    targets = torch.sigmoid(teacher_logits / temperature)
    return F.binary_cross_entropy_with_logits(logits / temperature, targets) * temperature**2


def _teacher_loss(teacher: nn.Module, temperature: float) -> LossFn:
    """The loss against a frozen teacher's logits; the batch's labels are never read."""

    def loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            target = forward_logits(teacher, batch).to(logits)
        return distillation_loss(logits, target, temperature)

    return loss


class _LossWindow:
    """Training loss and throughput since the last record.

    The loss is summed on the model's device and read back only when reported, so that
    the step loop does not wait for the device at every step.
    """

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self.reset()

    def reset(self) -> None:
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        self._samples = 0
        self._start = time.perf_counter()

    def add(self, loss: torch.Tensor, num_samples: int) -> None:
        self._loss_sum += loss.detach().double() * num_samples
        self._samples += num_samples

    def mean_loss(self) -> float:
        if self._samples == 0:
            return math.nan  # a record before any step (eval_at_start)
        mean = self._loss_sum.item() / self._samples
        if not math.isfinite(mean):
            raise InputError(f"training diverged: the training loss is {mean}; {_LOWER_RATES}")
        return mean

    def samples_per_s(self) -> float:
        return self._samples / max(time.perf_counter() - self._start, 1e-9)


class _BestState:
    """Lowest validation logloss seen, the model state that had it, and patience.

    The snapshot is a full copy of ``model.state_dict()`` on the model's device: it
    doubles the model's memory while training with validation batches.
    """

    def __init__(self, patience: int | None) -> None:
        self.patience = patience
        self.record: TrainRecord | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._evaluations_without_gain = 0

    def update(self, model: nn.Module, record: TrainRecord) -> None:
        assert record.val_logloss is not None
        if self.record is None or record.val_logloss < self.record.val_logloss:
            self.record = record
            self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._evaluations_without_gain = 0
        else:
            self._evaluations_without_gain += 1

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self._evaluations_without_gain >= self.patience

    def restore_(self, model: nn.Module, current: TrainRecord) -> None:
        if self._state is not None and self.record is not current:
            model.load_state_dict(self._state)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seeds torch's RNG inside the block and restores the caller's RNG state after: the
    CPU's and ``device``'s (every visible GPU's when ``device`` is None)."""
    cuda_devices = None
    if device is not None:
        cuda_devices = []
        if device.type == "cuda":
            cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def _total_steps(batches: Iterable[Batch], config: TrainConfig) -> int | None:
    """Steps the run will take at most (for the progress bar), if the source has a length."""
    try:
        total = len(batches) * config.epochs  # type: ignore[arg-type]
    except TypeError:
        return config.max_steps
    return min(total, config.max_steps) if config.max_steps is not None else total


def _train_step(
    model: nn.Module, batch: Batch, optimizer: KeyedOptimizer, loss_fn: LossFn
) -> torch.Tensor:
    """One optimizer step; returns the batch's loss (still on the device)."""
    optimizer.zero_grad()
    loss = loss_fn(forward_logits(model, batch), batch)
    loss.backward()
    optimizer.step()
    return loss


def train_(
    model: nn.Module,
    train_batches: Iterable[Batch],
    config: TrainConfig,
    *,
    val_batches: Iterable[Batch] | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains ``model`` in place.

    At the end of every epoch (and every ``config.eval_every`` steps) a record is added
    to the history, with the validation metrics when ``val_batches`` are given. With
    validation batches the model is returned in the state that had the lowest
    validation logloss, and ``config.patience`` can end training early.

    Without a teacher the loss is BCE against the labels. With one, it is
    :func:`distillation_loss` against the teacher's logits, and the training labels are
    not used (validation still scores against the validation labels).

    Args:
        model: the model to train; left in the train/eval mode it had on entry.
        train_batches: re-iterable batches, one pass per epoch; ``set_epoch(epoch)`` is
            called before each pass when the source has it (to reshuffle).
        config: the training configuration.
        val_batches: re-iterable labelled batches for evaluation and early stopping.
        teacher: a frozen model in eval mode whose logits the model learns to mimic.
        progress: show a tqdm progress bar (pass ``rank == 0`` under torch.distributed).
    Returns:
        The history, the number of steps and the record of the restored state.
    Raises:
        InputError: patience without validation batches, a teacher in train mode, an
            epoch without any batch, or training that diverged (:func:`check_converged`).

    Example::

        result = train_(model, train_batches, TrainConfig(epochs=3, patience=1),
                        val_batches=val_batches)
        print(result.best.val_auc)
    """
    if config.patience is not None and val_batches is None:
        raise InputError("train_: patience needs val_batches to judge progress")
    if teacher is not None and teacher.training:
        raise InputError("train_: the teacher must be in eval mode (call teacher.eval())")
    loss_fn = label_loss if teacher is None else _teacher_loss(teacher, config.distill_temperature)
    device = model_device(model)
    was_training = model.training
    total = _total_steps(train_batches, config)
    bar = tqdm(total=total, disable=not progress, desc="train", unit="step")
    fused = fused_tables(model, config.sparse_lr) if config.fused_sparse else contextlib.nullcontext()
    try:
        with fused, seeded(config.seed, device):
            model.train()
            result = _run(model, train_batches, config, val_batches, loss_fn, bar)
        check_converged(result, config.distill_temperature**2 if teacher is not None else 1.0)
        return result
    finally:
        bar.close()
        model.train(was_training)


def _run(
    model: nn.Module,
    train_batches: Iterable[Batch],
    config: TrainConfig,
    val_batches: Iterable[Batch] | None,
    loss_fn: LossFn,
    bar: tqdm,
) -> TrainResult:
    """The epoch and step loops of :func:`train_` (model already in train mode)."""
    optimizer = make_optimizer(model, config)
    result = TrainResult()
    best = _BestState(config.patience)
    device = model_device(model)
    window = _LossWindow(device)

    def add_record(epoch: int) -> None:
        record = _make_record(model, epoch, result.steps, window, val_batches)
        result.history.append(record)
        if record.val_logloss is not None:
            best.update(model, record)
        logger.info("%s", record.summary())
        window.reset()

    if config.eval_at_start and val_batches is not None:
        add_record(0)
    for epoch in range(config.epochs):
        if hasattr(train_batches, "set_epoch"):
            train_batches.set_epoch(epoch)
        epoch_start = result.steps
        for batch in prefetched(train_batches, device):
            window.add(_train_step(model, batch, optimizer, loss_fn), batch.labels.numel())
            result.steps += 1
            bar.update()
            if result.steps % config.log_every == 0:
                bar.set_postfix(loss=f"{window.mean_loss():.4f}")
            if config.eval_every is not None and result.steps % config.eval_every == 0:
                add_record(epoch)
            if best.should_stop or result.steps == config.max_steps:
                break
        if result.steps == epoch_start:
            raise InputError(f"train_: train_batches yielded no batch in epoch {epoch}")
        if not result.history or result.history[-1].step != result.steps:
            add_record(epoch)
        if best.should_stop or result.steps == config.max_steps:
            break
    result.stopped_early = best.should_stop
    if best.record is not None:
        best.restore_(model, result.history[-1])
        result.best = best.record
    (logger.warning if result.improved is False else logger.info)("%s", result.summary())
    return result


def check_converged(result: TrainResult, loss_scale: float = 1.0) -> None:
    """Refuses a diverged run: the kept state's validation logloss (the last training
    loss, divided by ``loss_scale``, without validation) is above :data:`DIVERGED_LOGLOSS`.

    Collective under a process group (every rank raises, or none): the training loss is
    each rank's own.

    Raises:
        InputError: the training diverged.
    """
    from afmrec.sharding.env import raise_on_any_rank

    kept = result.best or result.history[-1]
    if kept.val_logloss is not None:
        what, loss = "validation logloss", kept.val_logloss
    else:
        what, loss = "training loss", kept.train_loss / loss_scale
    problem = None
    if not loss <= DIVERGED_LOGLOSS:  # also NaN
        problem = (f"training diverged: {what} {loss:.4g} at step {kept.step} (a coin flip "
                   f"scores {math.log(2):.3f}); {_LOWER_RATES}")
    raise_on_any_rank(problem)


def _make_record(
    model: nn.Module,
    epoch: int,
    step: int,
    window: _LossWindow,
    val_batches: Iterable[Batch] | None,
) -> TrainRecord:
    """Reads the training window, then evaluates (so evaluation time is not counted)."""
    train_loss, speed = window.mean_loss(), window.samples_per_s()
    val: EvalResult | None = evaluate(model, val_batches) if val_batches is not None else None
    return TrainRecord(
        epoch=epoch,
        step=step,
        train_loss=train_loss,
        samples_per_s=speed,
        val_auc=val.auc if val is not None else None,
        val_logloss=val.logloss if val is not None else None,
    )
