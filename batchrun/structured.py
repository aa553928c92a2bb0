"""Structured output: a JSON Schema the answers must follow, checked on every answer.

The schema goes to the endpoint as a TGI grammar, so the model is constrained to it, and every
answer is still parsed and validated here: a grammar does not stop ``max_new_tokens`` from cutting a
document short, and an endpoint may ignore it. An answer that fails is drawn again with a fresh seed
(``retry.invalid_output`` more tries, apart from transport retries); one still invalid after that is
a failure row of type ``invalid_output`` that keeps the validator's message and the raw text.

The parsed value lands in the ``parsed`` column. When the schema maps cleanly onto Arrow types (an
object whose properties are typed, arrays of typed items, nested objects, strings, numbers,
booleans), the column has that type, so ``datasets`` shows its fields as features; otherwise (a
schema per row, ``anyOf``, free-form objects) it holds the value as a JSON string. Each value is
also checked against the column's type, so an answer that the schema allows but Arrow cannot hold
(an integer past 64 bits) fails as invalid output instead of breaking the shard after the money
was spent. ``generated_text`` keeps the raw answer either way, so properties a struct does not
declare are never lost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "PARSED_COLUMN",
    "InvalidAnswer",
    "OutputSchema",
    "SchemaProblem",
    "arrow_type_of",
    "check_schema",
    "load_schema",
]

#: The output column of the parsed value.
PARSED_COLUMN = "parsed"
# A failure row keeps this much of the raw answer in its message.
_MAX_RAW_CHARS = 2000
_ARROW_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


class InvalidAnswer(ValueError):
    """An answer that is not JSON, does not follow its schema, or does not fit the output column."""


class SchemaProblem(ValueError):
    """A schema that cannot be used: unreadable, not an object, or not valid JSON Schema."""


def load_schema(value: Any) -> dict[str, Any]:
    """The schema a spec gives inline (a mapping) or as the path of a ``.json`` file (relative to the
    working directory, like every path in a spec); SchemaProblem if unusable."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SchemaProblem(f"the schema file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SchemaProblem(f"the schema file {str(path)!r} is not readable JSON: {error}") from None
    if not isinstance(value, dict):
        raise SchemaProblem("expected a JSON Schema (a mapping), or the path of a .json file holding one")
    check_schema(value)
    return value


def check_schema(schema: Any) -> None:
    """SchemaProblem unless ``schema`` is a valid JSON Schema (against its own draft's metaschema)."""
    from jsonschema import exceptions, validators  # imported here: validate and --help need none of it

    if not isinstance(schema, dict):
        raise SchemaProblem(f"a JSON Schema must be an object, got {type(schema).__name__}")
    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as error:
        at = "/".join(str(p) for p in error.absolute_path) or "the top level"
        raise SchemaProblem(f"not a valid JSON Schema ({error.message}, at {at})") from None


def arrow_type_of(schema: Any) -> pa.DataType | None:
    """The Arrow type a value of ``schema`` maps onto cleanly, or None (the value is stored as JSON text)."""
    if not isinstance(schema, dict) or "$ref" in schema:
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"] and all(isinstance(v, str) for v in schema["enum"]):
        return pa.string()
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: every column is nullable already
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if len(kinds) == 1 else None
    if kind in _ARROW_SCALARS:
        return _ARROW_SCALARS[kind]
    if kind == "array":
        item = arrow_type_of(schema.get("items"))
        return None if item is None else pa.list_(item)
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            return None  # a free-form object has no fixed fields
        fields = []
        for name, sub in properties.items():
            child = arrow_type_of(sub)
            if child is None:
                return None
            fields.append(pa.field(name, child))
        return pa.struct(fields)
    return None


@dataclass(frozen=True)
class OutputSchema:
    """One job's output schema, or a schema per row (``per_row``, from ``prompt.schema_column``)."""

    schema: dict[str, Any] | None = None
    per_row: str | None = None  # the input column holding each row's schema

    @cached_property
    def arrow_type(self) -> pa.DataType | None:
        """The ``parsed`` column's type when it is a struct/list/scalar; None for JSON text."""
        return None if self.schema is None else arrow_type_of(self.schema)

    @property
    def column(self) -> pa.Field:
        return pa.field(PARSED_COLUMN, self.arrow_type or pa.string())

    def schema_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The schema a row's answer must follow; InvalidAnswer when a row's own schema is unusable."""
        if self.per_row is None:
            assert self.schema is not None
            return self.schema
        value = row.get(self.per_row)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise InvalidAnswer(f"the row's schema in {self.per_row!r} is not JSON: {error}") from None
        try:
            check_schema(value)
        except SchemaProblem as error:
            raise InvalidAnswer(f"the row's schema in {self.per_row!r} is unusable: {error}") from None
        return value  # type: ignore[return-value]  # check_schema proved it a dict

    def parse(self, text: str, schema: dict[str, Any]) -> Any:
        """The value of ``text`` in the ``parsed`` column's form; InvalidAnswer naming what is wrong."""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidAnswer(f"the answer is not valid JSON ({error}); answer: {_clip(text)}") from None
        problem = _first_error(value, schema)
        if problem is not None:
            raise InvalidAnswer(f"the answer does not follow the schema ({problem}); answer: {_clip(text)}")
        arrow_type = self.arrow_type
        if arrow_type is None:
            return json.dumps(value, ensure_ascii=False)
        try:
            pa.scalar(value, type=arrow_type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as error:
            raise InvalidAnswer(
                f"the answer follows the schema but does not fit the column type {arrow_type} ({error}); "
                f"answer: {_clip(text)}"
            ) from None
        return value


_VALIDATORS: dict[str, Any] = {}


def _first_error(value: Any, schema: dict[str, Any]) -> str | None:
    """The most relevant validation error of ``value``, as ``message at path``, or None when it is valid."""
    from jsonschema import exceptions, validators

    key = json.dumps(schema, sort_keys=True)
    validator = _VALIDATORS.get(key)
    if validator is None:
        if len(_VALIDATORS) > 1024:  # per-row schemas: keep the cache bounded
            _VALIDATORS.clear()
        validator = _VALIDATORS[key] = validators.validator_for(schema)(schema)
    error = exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    at = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message} at {at}" if at else error.message


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_RAW_CHARS else text[:_MAX_RAW_CHARS] + f"... ({len(text)} characters)"
