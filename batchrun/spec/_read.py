"""Reading a spec's keys: the shape and default each config field declares, unknown keys refused with a
"did you mean", and every problem a :class:`SpecError` naming the file, the key path and what was expected."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from typing import Any

from batchrun.errors import SpecError
from batchrun.spec._shape import INVALID, Shape, declared

_REQUIRED: Any = object()  # a key with no default: missing is an error
_DECLARED: Any = object()  # the default the key's config field declares
# The shapes of the values a key's config field does not hold as read (the field's own shape is for the
# JSON Schema): an input's path under its kind's key, a url checked further, a seed checked against 2**63.
_STRING = Shape("string")
_COUNT = Shape("integer", minimum=1)
_NATURAL = Shape("integer", minimum=0)


class _KeyReader:
    """Reads the keys of one spec's sections; every check reports against ``file``."""

    def __init__(self, file: str | None, *, in_memory: bool = False) -> None:
        self.file = file
        self.in_memory = in_memory

    def error(self, key: str, problem: str) -> SpecError:
        return SpecError(self.file, key, problem)

    def section(self, data: Any, key: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.error(key, f"expected a mapping with keys among {', '.join(allowed)}, got {_describe(data)}")
        self.keys(data, key + ".", allowed)
        return data

    def keys(self, data: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for key in data:
            if key not in allowed:
                label = key if isinstance(key, str) else repr(key)
                hint = _suggest(key, allowed) if isinstance(key, str) else ""
                raise self.error(
                    prefix + label, f"unknown key{hint or ''}; expected one of {', '.join(allowed)}"
                )

    def exactly_one(self, data: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
        present = [c for c in choices if c in data]
        if len(present) != 1:
            got = "none" if not present else " and ".join(present)
            raise self.error(key, f"expected exactly one of {', '.join(choices)}, got {got}")
        return present[0]

    # -- scalars -------------------------------------------------------------------------------
    # A missing key (or an explicit null, but for a boolean) gets the default; a missing key with no
    # default is "required". Every message names the full key path and the value it got.

    def key(
        self, spec_class: type, data: Mapping[str, Any], key: str, *, prefix: str = "", default: Any = _DECLARED,
    ) -> Any:
        """Key ``key`` of ``data``, read as ``spec_class`` declares it: its shape, and its default unless given."""
        shape, declared_default = declared(spec_class)[key]
        if default is _DECLARED:
            default = _REQUIRED if declared_default is dataclasses.MISSING else declared_default
        return self.read(data, key, shape, prefix=prefix, default=default)

    def read(
        self, data: Mapping[str, Any], key: str, shape: Shape, *, prefix: str = "", default: Any = _REQUIRED,
    ) -> Any:
        """Key ``key`` of ``data`` in ``shape``, ``default`` if it is missing or null."""
        value = data.get(key)
        if value is None:
            if shape.kind == "boolean" and key in data:
                raise self.error(prefix + key, "expected true or false, got null")
            if default is _REQUIRED:
                null = shape.kind == "string" and key in data
                raise self.error(prefix + key, "expected a string, got null" if null else "is required")
            return default
        converted = shape.convert(value)
        if converted is INVALID:
            raise self.error(prefix + key, f"expected {shape.expected}, got {_describe(value)}")
        return converted


def _no_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@``, for messages."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", url)


def _suggest(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{value!r} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)
