"""Typed values of the emulator's YAML configs: a value checked against its field's type hint."""

from __future__ import annotations

import types
import typing
from typing import Any

__all__ = ["checked_value"]


def checked_value(key: str, hint: Any, value: Any) -> Any:
    """``value`` as the hint allows it (an int where a float is wanted becomes one); ValueError naming ``key``."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
