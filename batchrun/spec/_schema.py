"""The job spec as JSON Schema, derived from the config fields' declared shapes (``batchrun schema``).

Editors that speak the YAML language server complete and check a job file that names it on its first
line (``# yaml-language-server: $schema=batchrun.schema.json``). The schema states the shape: keys,
types, ranges, defaults, and unknown keys refused at every level. What depends on other keys or on
the world (a template's columns, image keys by task, tokens and hosts) is left to ``batchrun validate``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from batchrun.spec._model import ENDPOINT_KINDS, INPUT_KINDS, LIFECYCLE_KEYS, EndpointSpec, InputSpec, JobSpec
from batchrun.spec._shape import spec_fields

__all__ = ["json_schema"]

# Draft 7: the draft editors' YAML and JSON tooling supports most widely (SchemaStore's schemas use it).
DRAFT = "http://json-schema.org/draft-07/schema#"

# Where each input kind's rows come from (the dataset kind is InputSpec's ``dataset`` field).
_INPUT_KIND_DOCS = {
    "parquet": "a Parquet file, folder or glob",
    "jsonl": "a JSON Lines file, folder or glob",
    "openai_batch": "an OpenAI Batch input file (JSON Lines of custom_id, method, url, body)",
}


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 7) of a job spec file."""
    endpoint = _object(EndpointSpec)
    endpoint["oneOf"] = [{"required": [kind]} for kind in ENDPOINT_KINDS]
    schema: dict[str, Any] = {
        "$schema": DRAFT,
        "title": "batchrun job spec",
        "description": "A batchrun job (README: The job spec). `batchrun validate JOB.yaml` checks the rest.",
        **_object(JobSpec),
        "definitions": {"endpoint": endpoint},
    }
    properties = schema["properties"]
    one = {"$ref": "#/definitions/endpoint"}
    properties["input"] = _described(_input(), JobSpec, "input")
    properties["endpoint"] = _described(
        {"anyOf": [one, {"type": "array", "minItems": 1, "items": one}]},
        JobSpec, "endpoint",
    )
    lifecycle = {name: endpoint["properties"][name] for name in LIFECYCLE_KEYS}
    properties["endpoint_defaults"] = _described(
        _nullable({"type": "object", "properties": lifecycle, "additionalProperties": False}), JobSpec,
        "endpoint_defaults",
    )
    # A job on an OpenAI batch file takes neither task nor prompt (its request lines carry both); any other needs both.
    schema["if"] = {"properties": {"input": {"required": ["openai_batch"]}}, "required": ["input"]}
    schema["then"] = {"not": {"required": ["prompt"]}}
    schema["else"] = {"required": ["task", "prompt"]}
    return schema


def _input() -> dict[str, Any]:
    schema = _object(InputSpec)
    kinds = {name: {"type": "string", "minLength": 1, "description": doc} for name, doc in _INPUT_KIND_DOCS.items()}
    properties = {**kinds, **schema["properties"]}
    schema["properties"] = {name: properties[name] for name in (*INPUT_KINDS, *schema["properties"])}
    schema["oneOf"] = [{"required": [kind]} for kind in INPUT_KINDS]
    return schema


def _object(spec_class: type) -> dict[str, Any]:
    """A section as a JSON Schema object: its keys, none other, the required ones required."""
    properties = {f.name: _property(f) for f in spec_fields(spec_class)}
    required = [f.name for f in spec_fields(spec_class) if f.metadata["shape"].required]
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def _property(f: dataclasses.Field[Any]) -> dict[str, Any]:
    shape = f.metadata["shape"]
    if shape.kind == "section":
        assert shape.section is not None
        schema = _object(shape.section)
        if shape.json is not None:  # another way to write it (``dataset: user/name``)
            schema = {"anyOf": [schema, dict(shape.json)]}
    elif shape.kind == "custom" and shape.json is None:
        schema = {}  # built by json_schema(), which knows the whole spec
    else:
        schema = shape.json_schema()
    if shape.accepts_null:
        schema = _nullable(schema)
    schema = {"description": f.metadata["doc"], **schema}
    if isinstance(f.default, (str, int, float, bool)):  # None and the containers say nothing an editor can show
        schema["default"] = f.default
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema``, or null: the parser reads an explicit null as the key's default."""
    return {"anyOf": [schema, {"type": "null"}]}


def _described(schema: dict[str, Any], spec_class: type, name: str) -> dict[str, Any]:
    field = next(f for f in spec_fields(spec_class) if f.name == name)
    return {"description": field.metadata["doc"], **schema}
