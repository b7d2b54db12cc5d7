"""Periodic saves of a statistics pass, so that a killed pass resumes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from afmrec.sharding.env import barrier, min_over_ranks

from ..artifacts import STATISTICS_SAVE_FORMAT, atomic_file, load_checked, save_checked
from ..errors import InputError
from .moments import Moments, moments_from_state, moments_state


@dataclass(frozen=True)
class StatsCheckpoint:
    """Periodic saves of a rank's moments, so that a killed statistics pass resumes.

    The moments are sums: resuming is loading them and skipping the batches they already
    count, and with a deterministic reader (no shuffling) the result is bitwise the
    uninterrupted pass's. Each rank saves ``folder/rank{r}-{batches}.pt`` atomically every
    ``every`` batches and keeps its last two. A barrier precedes every save, so a job
    killed while saving leaves its ranks at most one save apart; they resume from the
    latest save that all of them hold (or from the start).

    Attributes:
        folder: where the saves go (shared by the ranks of a job).
        every: batches between saves.
        key: identifies the pass (model, data, batching, world size, blocks); saves made
            with another key are ignored.
        rank: this process's rank.
    """

    folder: Path
    every: int
    key: str
    rank: int = 0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise InputError(f"checkpoint_every must be >= 1, got {self.every}")

    def _saves(self) -> dict[int, Path]:
        """This rank's saves by number of batches counted."""
        found = self.folder.glob(f"rank{self.rank}-*.pt") if self.folder.is_dir() else []
        return {int(p.stem.rpartition("-")[2]): p for p in found}

    def _load(self, path: Path) -> dict[str, Moments] | None:
        try:  # verified against the checksum it was saved with
            state = load_checked(path, STATISTICS_SAVE_FORMAT, "statistics pass save")
        except Exception:  # a save cut short by a crash, or damaged, counts as absent, never as data
            return None
        if state.get("key") != self.key:
            return None
        return moments_from_state(state["moments"])

    def save(self, moments: Mapping[str, Moments], batches: int) -> None:
        """Saves the sums over the first ``batches`` batches (collective in a job)."""
        barrier()
        state = {
            "key": self.key,
            "batches": batches,
            "moments": moments_state(moments),
        }
        with atomic_file(self.folder / f"rank{self.rank}-{batches:012d}.pt", overwrite=True) as tmp:
            save_checked(state, tmp, STATISTICS_SAVE_FORMAT)
        saves = self._saves()
        for old in sorted(saves)[:-2]:
            saves[old].unlink(missing_ok=True)

    def resume(self) -> tuple[int, dict[str, Moments]]:
        """``(batches already counted, their moments)``; ``(0, {})`` to start afresh.

        Collective in a job: every rank returns the same number of batches.
        """
        valid = {}
        for batches, path in self._saves().items():
            moments = self._load(path)
            if moments is not None:
                valid[batches] = moments
        batches = min_over_ranks(max(valid, default=0))
        if batches and min_over_ranks(int(batches in valid)) == 0:
            batches = 0  # some rank lacks that save: only a fresh pass is consistent
        # Other saves (later ones, or of another pass) would outrank this pass's next saves.
        for other, path in self._saves().items():
            if other != batches:
                path.unlink(missing_ok=True)
        return batches, valid.get(batches, {}) if batches else {}

    def clear(self) -> None:
        """Removes the saves once the pass's result is written (rank 0 only)."""
        if self.rank == 0:
            shutil.rmtree(self.folder, ignore_errors=True)
