"""``afmrec bench speed``: :func:`run_speed` (:mod:`.run`) over a :class:`SpeedShape`
(:mod:`.shape`); the served variants (:mod:`.variants`), their timing (:mod:`.infer`),
device-time breakdown (:mod:`.profile`) and provenance (:mod:`.record`)."""

from .run import run_speed
from .shape import SpeedShape, make_batches

__all__ = ["SpeedShape", "make_batches", "run_speed"]
