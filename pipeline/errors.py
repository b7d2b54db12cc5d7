"""The one exception type the CLI turns into a clean one-line error.

It is defined in :mod:`afmrec.common.errors`, which every folder may import (``sharding``
among them); the pipeline's modules import it from here.
"""

from afmrec.common.errors import InputError

__all__ = ["InputError"]
