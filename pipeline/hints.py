"""The type a config dataclass's field is parsed as, from its type hint.

Torch-free on purpose: the CLI builds its options from these types for ``--help``
(:func:`afmrec.launch.args.add_dataclass_options`), without importing torch, and the
batch manifest (:mod:`afmrec.pipeline.batch`) parses its cells with them.
"""

from __future__ import annotations

import types
import typing
from typing import Any


def scalar_type(hint: Any) -> Any:
    """``X`` of a hint ``X | None`` (or ``Optional[X]``); any other hint itself.

    ``int | None`` -> ``int``; ``Path`` -> ``Path``; ``tuple[str, ...]`` stays itself
    (its elements' type is the caller's to read).
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint
