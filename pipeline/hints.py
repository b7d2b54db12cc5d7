"""The type a config dataclass's field is parsed as, from its type hint; JSON objects read
as typed dataclasses (:func:`typed_dataclass`).

Torch-free on purpose: the CLI builds its options from these types for ``--help``
(:func:`afmrec.launch.args.add_dataclass_options`), without importing torch, and the
batch manifest (:mod:`afmrec.pipeline.batch`) parses its cells with them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from .errors import InputError


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


# --- JSON objects as typed dataclasses ------------------------------------------------------

_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


class _Mismatch(Exception):
    """A JSON value that is not of its field's type (``path``: where in the object)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def _describe(hint: Any) -> str:
    if hint in _NAMES:
        return _NAMES[hint]
    if typing.get_origin(hint) is tuple:
        element = _describe(typing.get_args(hint)[0]).split(" ", 1)[-1]
        return f"a list of {element}s"
    return "an object"


def _typed(hint: Any, value: Any, path: str) -> Any:
    """``value`` (parsed JSON) as ``hint``: lists become tuples, objects dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _typed(scalar_type(hint), value, path)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return _typed_fields(hint, value, path)
    if origin is tuple and isinstance(value, list):
        return tuple(_typed(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return {k: _typed(args[1], v, f"{path}.{k}") for k, v in value.items()}
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }.get(hint, False)
    if not ok:
        raise _Mismatch(path, f"must be {_describe(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _typed_fields(cls: type, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _Mismatch(path, f"must be an object, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise _Mismatch(path, f"has unknown field(s) {unknown}")
    missing = [n for n, f in fields.items() if n not in value
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise _Mismatch(path, f"lacks field(s) {missing}")
    kwargs = {n: _typed(hints[n], v, f"{path}.{n}".lstrip(".")) for n, v in value.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own checks (InputError is one)
        raise _Mismatch(path, f"is invalid: {e}") from None


def typed_dataclass(cls: type, value: Any, where: str) -> Any:
    """``cls(**value)`` for a parsed JSON object, every field checked against its type hint
    first (``int``, ``float``, ``str``, ``bool``, ``X | None``, ``tuple[X, ...]``,
    ``dict[str, X]``, nested dataclasses): a file of the right syntax and the wrong
    shape is an error naming the field, never a crash deep inside the code that uses it.

    Args:
        cls: the dataclass.
        value: the parsed JSON.
        where: what ``value`` is, for messages (a file name, ``"model.json, field model"``).

    Raises:
        InputError: ``value`` is not an object, lacks a field without default, has a field
            ``cls`` does not know or one of the wrong type, or ``cls`` refuses the values
            (its ``ValueError``); the message names the field.
    """
    try:
        return _typed_fields(cls, value, "")
    except _Mismatch as e:
        field = f"field {e.path} " if e.path else ""
        raise InputError(f"{where}: {field}{e.problem}") from None
