"""Each spec key declared once, on its config field: its YAML shape, its default and what it is for.

A config class's field is a spec key when it was made with :func:`key`. The parser reads the key's
shape and default from there (:func:`spec_keys`, :func:`shape_of`, :func:`default_of`), the JSON
Schema is derived from the same fields (:mod:`batchrun.spec._schema`), and a test holds the README's
key table to them. Fields made without :func:`key` (``JobSpec.file``, ``raw``...) are not keys.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchrun.spec._units import parse_duration, parse_size

#: Returned by :meth:`Shape.convert` for a value of the wrong shape.
INVALID: Any = object()

#: What a duration or a size may look like as a string, for the JSON Schema (parse_duration, parse_size).
_NUMBER = r"[0-9]+(\.[0-9]+)?"
DURATION_PATTERN = rf"^ *{_NUMBER} *$|^( *{_NUMBER} *([mM][sS]|[sSmMhHdD]))+ *$"
SIZE_PATTERN = rf"^ *{_NUMBER} *([kKmMgGtT][iI]?[bB]|[bB])? *$"


@dataclass(frozen=True)
class Shape:
    """What a key's YAML value must be.

    ``kind`` is one of the scalar kinds the parser checks itself (``string``, ``integer``, ``number``,
    ``fraction``, ``duration``, ``size``, ``boolean``, ``choice``), ``section`` (a mapping read into
    the config class ``section``), or ``custom`` (a value the parser checks with code of its own;
    ``json`` states its JSON Schema). ``required`` keys must be given; ``nullable`` says whether an
    explicit ``null`` stands for the default (the parser's rule for every optional key but booleans).
    """

    kind: str
    minimum: float | None = None
    strict: bool = False  # number: above minimum, not at it
    allow_empty: bool = False  # string: "" is a value
    choices: tuple[str, ...] = ()
    section: type | None = None
    json: Mapping[str, Any] | None = None
    required: bool = False
    nullable: bool | None = None

    @property
    def accepts_null(self) -> bool:
        if self.nullable is not None:
            return self.nullable
        return not self.required and self.kind != "boolean"

    @property
    def expected(self) -> str:
        """The words a message uses for what was expected: ``expected a positive integer, got 0``."""
        if self.kind == "string":
            return "a non-empty string"
        if self.kind == "integer":
            return ("a positive integer" if self.minimum == 1 else "a non-negative integer" if self.minimum == 0
                    else "an integer")
        if self.kind == "number":
            return "a positive number" if self.strict else "a non-negative number" if self.minimum == 0 else "a number"
        if self.kind == "fraction":
            return "a share between 0 and 1 (like 0.5)"
        if self.kind == "duration":
            return "a positive duration in seconds or like '90s', '20m', '6h', '1h30m'"
        if self.kind == "size":
            return "a positive size in bytes or like '64MB', '1GiB'"
        if self.kind == "boolean":
            return "true or false"
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        raise ValueError(f"a {self.kind} key is checked by its own code")

    def convert(self, value: Any) -> Any:
        """``value`` as the config object holds it, or :data:`INVALID`. ``value`` is not null."""
        kind = self.kind
        if kind == "string":
            ok = isinstance(value, str) and (bool(value) or self.allow_empty)
            return value if ok else INVALID
        if kind == "boolean":
            return value if isinstance(value, bool) else INVALID
        if kind == "choice":
            return value if value in self.choices else INVALID
        if kind == "duration":
            seconds = parse_duration(value)
            return seconds if seconds is not None and seconds > 0 else INVALID
        if kind == "size":
            size = parse_size(value)
            return size if size is not None and size > 0 else INVALID
        # bool is an int in Python; `limit: yes` is a mistake, not 1.
        if isinstance(value, bool):
            return INVALID
        if kind == "integer":
            ok = isinstance(value, int) and (self.minimum is None or value >= self.minimum)
            return value if ok else INVALID
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return INVALID
        if kind == "fraction":
            return float(value) if 0 < value <= 1 else INVALID
        if kind == "number":
            low = self.minimum
            ok = low is None or (value > low if self.strict else value >= low)
            return float(value) if ok else INVALID
        raise ValueError(f"a {kind} key is checked by its own code")

    def json_schema(self) -> dict[str, Any]:
        """This shape as JSON Schema (sections are expanded by the schema module, which knows them all)."""
        kind = self.kind
        schema: dict[str, Any]
        if kind == "string":
            schema = {"type": "string"} if self.allow_empty else {"type": "string", "minLength": 1}
        elif kind == "integer":
            schema = {"type": "integer"}
            if self.minimum is not None:
                schema["minimum"] = int(self.minimum)
        elif kind == "number":
            schema = {"type": "number"}
            if self.minimum is not None:
                schema["exclusiveMinimum" if self.strict else "minimum"] = self.minimum
        elif kind == "fraction":
            schema = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}
        elif kind == "duration":
            schema = {"anyOf": [{"type": "number", "exclusiveMinimum": 0},
                                {"type": "string", "pattern": DURATION_PATTERN}]}
        elif kind == "size":
            schema = {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": SIZE_PATTERN}]}
        elif kind == "boolean":
            schema = {"type": "boolean"}
        elif kind == "choice":
            schema = {"enum": list(self.choices)}
        elif self.json is not None:
            schema = dict(self.json)
        else:
            raise ValueError(f"a {kind} key has no JSON Schema of its own")
        return schema


def key(shape: Shape, doc: str, default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
        **meta: Any) -> Any:
    """A config field that is a spec key: its YAML ``shape``, its default, and ``doc``, what it is for."""
    metadata = {"shape": shape, "doc": doc, **meta}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@functools.cache
def spec_fields(spec_class: type) -> tuple[dataclasses.Field[Any], ...]:
    """The fields of ``spec_class`` that are spec keys, in declaration order."""
    return tuple(f for f in dataclasses.fields(spec_class) if "shape" in f.metadata)


@functools.cache
def declared(spec_class: type) -> dict[str, tuple[Shape, Any]]:
    """Each spec key of ``spec_class``: its shape, and its default (``dataclasses.MISSING`` if it has none)."""
    return {f.name: (f.metadata["shape"], f.default) for f in spec_fields(spec_class)}


def spec_keys(spec_class: type) -> tuple[str, ...]:
    """The spec keys of a section, in the order its messages list them."""
    return tuple(f.name for f in spec_fields(spec_class))


def shape_of(spec_class: type, name: str) -> Shape:
    """The declared shape of key ``name`` of ``spec_class``."""
    try:
        return declared(spec_class)[name][0]
    except KeyError:
        raise KeyError(f"{spec_class.__name__}.{name} is not a spec key") from None


def default_of(spec_class: type, name: str) -> Any:
    """The default ``spec_class`` declares for field ``name``: the parser's only source of defaults."""
    for f in dataclasses.fields(spec_class):
        if f.name == name and f.default is not dataclasses.MISSING:
            return f.default
    raise KeyError(f"{spec_class.__name__}.{name} has no plain default")

