"""What a training run did: one record per evaluation, and which state was kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainRecord:
    """One point of the training history (written at every evaluation).

    Attributes:
        epoch: 0-based epoch in which the record was taken.
        step: optimizer steps done so far.
        train_loss: sample-weighted mean training loss since the previous record.
        samples_per_s: training throughput since the previous record (this process's
            samples; evaluation time excluded).
        val_auc / val_logloss: validation metrics, ``None`` without validation batches.
    """

    epoch: int
    step: int
    train_loss: float
    samples_per_s: float
    val_auc: float | None = None
    val_logloss: float | None = None

    def summary(self) -> str:
        """One log line: ``epoch 0 step 30: loss 0.6702, 60,512 samples/s, val ...``; a
        record with no training behind it (the one before the first step) says so instead
        of a NaN loss."""
        text = f"epoch {self.epoch} step {self.step}: "
        if math.isnan(self.train_loss):
            text += "before training"
        else:
            text += f"loss {self.train_loss:.4f}, {self.samples_per_s:,.0f} samples/s"
        if self.val_logloss is not None:
            text += f", val auc {self.val_auc:.4f} logloss {self.val_logloss:.4f}"
        return text


@dataclass
class TrainResult:
    """What :func:`train_` did.

    Attributes:
        history: one record per evaluation, in order.
        steps: optimizer steps done.
        best: the record whose state the model holds on return (lowest validation
            logloss), ``None`` without validation batches (the model keeps its last state).
        stopped_early: whether ``patience`` ended training.
    """

    history: list[TrainRecord] = field(default_factory=list)
    steps: int = 0
    best: TrainRecord | None = None
    stopped_early: bool = False

    @property
    def start(self) -> TrainRecord | None:
        """The record taken before the first step (``eval_at_start``), if any."""
        first = self.history[0] if self.history else None
        return first if first is not None and first.step == 0 else None

    @property
    def improved(self) -> bool | None:
        """Whether training beat its starting state on the validation rows (``None``
        without a record of the start)."""
        if self.start is None or self.best is None:
            return None
        return self.best is not self.start

    def summary(self) -> str:
        """One line: which state was kept, and why."""
        last = self.history[-1] if self.history else None
        if self.best is None:
            where = f"epoch {last.epoch}, step {last.step}" if last else "no step"
            return f"kept the last state ({where}): no validation rows to choose by"
        if self.improved is False:
            after = min((r for r in self.history[1:]), key=lambda r: r.val_logloss, default=None)
            best_after = f" (best after it {after.val_logloss:.4f} at step {after.step})" if after else ""
            return (f"kept the starting model unchanged: no step lowered its validation "
                    f"logloss {self.start.val_logloss:.4f}{best_after}")
        text = (f"kept epoch {self.best.epoch}, step {self.best.step} of {self.steps}: val auc "
                f"{self.best.val_auc:.4f} logloss {self.best.val_logloss:.4f}")
        if self.improved:
            text += f", {self.best.val_logloss - self.start.val_logloss:+.4f} logloss vs the start"
        if self.stopped_early:
            text += "; stopped early (patience)"
        return text
