"""The schemas of the shards, fixed before the first row so that every shard of a job agrees.

Each schema carries ``huggingface`` metadata: the ``datasets`` features of its columns, so that
``load_dataset("parquet", ...)`` decodes an ``Image`` column as images and not as structs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from batchrun.errors import OutputError
from batchrun.facts import ID_COLUMN

__all__ = [
    "BOOKKEEPING_COLUMNS",
    "FAILED_COLUMNS",
    "build_data_schema",
    "build_failed_schema",
    "kept_columns_of",
    "with_hf_metadata",
]

#: The columns of a failed shard after its id column and the kept input columns.
FAILED_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("error_type", pa.string()),
    pa.field("error", pa.string()),
    pa.field("status", pa.int32()),
    pa.field("attempts", pa.int32()),
    pa.field("retryable", pa.bool_()),
)

#: The columns every data shard ends with, after the task's output columns.
BOOKKEEPING_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("latency_s", pa.float64()),
    pa.field("attempts", pa.int32()),
)


#: The features of the fixed columns, as ``datasets`` derives them (a test checks that it still does):
#: written out so that a schema made only of them, or a schema that already declares the features of
#: every column, needs no ``datasets`` import (a second or more before a resumed run's first request).
_FIXED_FEATURES: dict[str, dict[str, Any]] = {
    "error_type": {"dtype": "string", "_type": "Value"},
    "error": {"dtype": "string", "_type": "Value"},
    "status": {"dtype": "int32", "_type": "Value"},
    "attempts": {"dtype": "int32", "_type": "Value"},
    "retryable": {"dtype": "bool", "_type": "Value"},
    "latency_s": {"dtype": "float64", "_type": "Value"},
}


#: Arrow's scalar types and the ``Value`` dtype ``datasets`` derives for each (a test checks that it still
#: does): a schema made only of these (most text jobs') needs no ``datasets`` import, which with pandas
#: under it is a third to half a second of every run's start.
_VALUE_DTYPES: dict[pa.DataType, str] = {
    pa.null(): "null", pa.bool_(): "bool",
    pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
    pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64",
    pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary", pa.large_binary(): "large_binary",
}  # fmt: skip


def features_dict(schema: pa.Schema) -> dict[str, Any]:
    """The ``datasets`` features of ``schema``, honouring any ``huggingface`` metadata it carries."""
    declared = _declared_features(schema)
    if declared is not None:
        return declared
    scalar = _scalar_features(schema)
    if scalar is not None:
        return scalar
    # Imported here: datasets is heavy, and only a schema with nested, dated or declared columns needs it.
    from datasets import Features

    return Features.from_arrow_schema(schema).to_dict()


def _scalar_features(schema: pa.Schema) -> dict[str, Any] | None:
    """``Value`` features when every column is one of :data:`_VALUE_DTYPES` and none is declared, else None."""
    if b"huggingface" in (schema.metadata or {}):
        return None  # datasets merges the declared features with the derived ones
    features: dict[str, Any] = {}
    for field in schema:
        dtype = _VALUE_DTYPES.get(field.type)
        if dtype is None:
            return None
        features[field.name] = {"dtype": dtype, "_type": "Value"}
    return features


def _declared_features(schema: pa.Schema) -> dict[str, Any] | None:
    """The features ``schema``'s own metadata declares for every one of its columns, else None."""
    if schema.names and all(_fixed_type(field) for field in schema):
        return {field.name: _FIXED_FEATURES[field.name] for field in schema}
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw is None:
        return None
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(features, dict) or set(features) != set(schema.names):
        return None
    return {name: features[name] for name in schema.names}


def _fixed_type(field: pa.Field) -> bool:
    """Whether ``field`` is the fixed column of its name, with that column's type."""
    for fixed in (*FAILED_COLUMNS, *BOOKKEEPING_COLUMNS):
        if fixed.name == field.name:
            return fixed.type == field.type
    return False


def _hf_metadata(features: dict[str, Any]) -> dict[bytes, bytes]:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def with_hf_metadata(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``huggingface`` metadata that tells ``datasets`` how to decode each column.

    Derived with ``Features.from_arrow_schema``, which keeps features already declared in the
    schema's metadata (an ``Image`` over ``struct<bytes, path>``) and infers the rest from the types.
    """
    metadata = dict(schema.metadata or {})
    metadata.update(_hf_metadata(features_dict(schema)))
    return schema.with_metadata(metadata)


def data_columns(
    input_schema: pa.Schema,
    *,
    id_column: str | None,
    keep_columns: Sequence[str] | None,
    output_schema: pa.Schema,
) -> tuple[pa.Field, list[str]]:
    """The id field and the kept input columns of the data shards; OutputError for a clash of names.

    Needs no ``datasets``: ``batchrun validate`` checks the output's columns with this alone.
    """
    if id_column is None:
        id_field = pa.field(ID_COLUMN, pa.int64())
    else:
        if id_column not in input_schema.names:
            raise OutputError(f"the id column {id_column!r} is not in the input (columns: {input_schema.names})")
        id_field = input_schema.field(id_column)
    if keep_columns is None:
        kept_names = [name for name in input_schema.names if name != id_column]
        if id_column is None and ID_COLUMN in kept_names:
            raise OutputError(
                "the input has a column named 'id', which clashes with the generated id column; "
                "set id_column: id to use it as the id, or list keep_columns without it"
            )
    else:
        wanted = set(keep_columns)
        kept_names = [name for name in input_schema.names if name in wanted and name != id_field.name]
    taken = {id_field.name: "the id column"}
    for name in kept_names:
        taken[name] = "a kept input column"
    for field in [*output_schema, *BOOKKEEPING_COLUMNS]:
        if field.name in taken:
            raise OutputError(
                f"the output column {field.name!r} clashes with {taken[field.name]} of the same name; "
                f"list keep_columns without {field.name!r}, or rename the input column"
            )
        taken[field.name] = "an output column"
    return id_field, kept_names


def build_data_schema(
    input_schema: pa.Schema,
    *,
    id_column: str | None,
    keep_columns: Sequence[str] | None,
    output_schema: pa.Schema,
) -> pa.Schema:
    """The schema of every data shard.

    The id column comes first (an int64 ``id`` holding the position when ``id_column`` is None),
    then the kept input columns in input order (all of them when ``keep_columns`` is None), then the
    task's output columns, then ``latency_s`` and ``attempts``. Features declared in either schema's
    ``huggingface`` metadata (such as ``Image``) are carried over.

    ``keep_columns`` is assumed to name input columns: preflight checks that once and reports it as
    ``input.keep_columns``. A name clash between the columns is refused here.
    """
    id_field, kept_names = data_columns(
        input_schema, id_column=id_column, keep_columns=keep_columns, output_schema=output_schema
    )
    input_features = features_dict(input_schema)
    output_features = features_dict(output_schema)
    id_feature: dict[str, Any] = (
        {"dtype": "int64", "_type": "Value"} if id_column is None else input_features[id_column]
    )
    fields = [id_field, *(input_schema.field(n) for n in kept_names), *output_schema, *BOOKKEEPING_COLUMNS]
    features = {id_field.name: id_feature}
    features.update({n: input_features[n] for n in kept_names})
    features.update(output_features)
    features.update(features_dict(pa.schema(list(BOOKKEEPING_COLUMNS))))
    # Field-level metadata from the input (pandas, ...) is not ours to carry into the output.
    schema = pa.schema([f.remove_metadata() for f in fields])
    return schema.with_metadata(_hf_metadata(features))


def build_failed_schema(data_schema: pa.Schema, id_column: str, kept_columns: Sequence[str] = ()) -> pa.Schema:
    """The schema of every failed shard: the id column, the kept input columns, then :data:`FAILED_COLUMNS`.

    ``kept_columns`` names the kept input columns of ``data_schema`` (the data schema alone cannot
    tell them from the task's output columns); they come in data-schema order, with the same types
    and ``datasets`` features, so that a failure can be read without joining it back to the input.
    Without them, the schema is the one of failed shards written before kept columns were recorded.
    """
    wanted = set(kept_columns)
    invalid = wanted - set(data_schema.names) | wanted & {id_column, *(f.name for f in BOOKKEEPING_COLUMNS)}
    if invalid:
        raise ValueError(f"kept_columns {sorted(invalid)} are not kept input columns of the data schema")
    names = [id_column, *(n for n in data_schema.names if n in wanted)]
    data_features = features_dict(data_schema)
    features = {name: data_features[name] for name in names}
    features.update(features_dict(pa.schema(list(FAILED_COLUMNS))))
    fields = [data_schema.field(n).remove_metadata() for n in names]
    return pa.schema([*fields, *FAILED_COLUMNS]).with_metadata(_hf_metadata(features))


def kept_columns_of(failed_schema: pa.Schema) -> list[str]:
    """The kept input columns of a failed shard's schema (between its id column and the failure columns)."""
    return failed_schema.names[1 : -len(FAILED_COLUMNS)]
