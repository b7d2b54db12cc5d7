"""afmrec: low-rank compression (Atomic Feature Mimicking) of TorchRec CTR models.

The one-call API (as torchao's ``quantize_``)::

    import afmrec
    result = afmrec.compress_(model, calibration_batches, afmrec.AFMConfig(ratio=4))  # in place
    afmrec.export(model, "afm.pt")                                                    # serving file

``model`` is any ``nn.Module`` holding TorchRec ``EmbeddingBagCollection``\\ s and
``nn.Linear`` layers; see :func:`afmrec.core.compress_` and :func:`afmrec.serving.export`.
The stages underneath are in ``afmrec.pipeline``; the CLI is ``afmrec`` (``afmrec.launch``).

Importing this package imports nothing heavy (no torch): the names below load on first
use, so the CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the submodule of this package that defines it
_LAZY = {
    "AFMConfig": "config",
    "AFMResult": "core",
    "compress_": "core",
    "export": "serving",
}

__all__ = ["AFMConfig", "AFMResult", "compress_", "export", "__version__"]


_SUBPACKAGES = ("models", "pipeline", "sharding", "launch")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:  # `afmrec.pipeline` without importing it first
        return importlib.import_module(f"{__name__}.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'afmrec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBPACKAGES, *(k for k in globals() if k.startswith("__"))})
