"""JSON documents drawn from a JSON Schema: what an emulated model answers under a TGI grammar.

TGI constrains generation with a grammar compiled from the schema, so a real model's answer is a
document valid against it (unless ``max_new_tokens`` cuts it short). The emulator draws one
deterministically from a ``random.Random`` seeded like its word stream (the prompt, the seed and the
sampling parameters), so the same request gets the same document and a new seed another one.

The keywords covered are the ones structured-output schemas use: ``type`` (one or a list),
``properties`` / ``required`` (every property is produced), ``items`` / ``minItems`` / ``maxItems``,
``enum``, ``const``, ``anyOf`` / ``oneOf`` (the first branch, so ``oneOf`` stays unambiguous),
``minimum`` / ``maximum``, ``minLength`` / ``maxLength``, and local ``$ref`` into ``$defs`` or
``definitions``. ``pattern`` and ``format`` are not honoured (TGI honours them; an emulated answer
is then a plain word).

:func:`violation` gives what a misbehaving model sends instead: JSON cut short, or a document of the
wrong shape, for the ``invalid_json`` fault.
"""

from __future__ import annotations

import json
import random
from typing import Any

_WORDS = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "juniper",
          "kestrel", "lumen", "meadow", "north", "orchid", "prairie", "quartz", "ridge", "sable", "tundra"]
_MAX_DEPTH = 8


def document(schema: Any, rng: random.Random) -> Any:
    """A value valid against ``schema`` (within the keywords the module docstring lists)."""
    return _draw(schema, rng, root=schema, depth=0)


def violation(schema: Any, rng: random.Random) -> str:
    """Text that is not a valid answer for ``schema``: broken JSON, or JSON of another type."""
    text = json.dumps(document(schema, rng))
    if rng.random() < 0.5 and len(text) > 1:
        return text[: len(text) // 2]  # cut short, as a model stopped mid-document
    kind = schema.get("type") if isinstance(schema, dict) else None
    return json.dumps(["not", "an", "object"] if kind == "object" else {"unexpected": True})


def _resolve(schema: dict, root: Any) -> dict:
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    target: Any = root
    for part in ref[2:].split("/"):
        target = target.get(part, {}) if isinstance(target, dict) else {}
    return target if isinstance(target, dict) else {}


def _draw(schema: Any, rng: random.Random, *, root: Any, depth: int) -> Any:
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None if depth > _MAX_DEPTH else rng.choice(_WORDS)
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            merged = {k: v for k, v in schema.items() if k != key}
            return _draw({**merged, **_resolve(branches[0], root)}, rng, root=root, depth=depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    return _BY_TYPE.get(kind, _string)(schema, rng, root, depth)


def _object(schema: dict, rng: random.Random, root: Any, depth: int) -> dict:
    properties = schema.get("properties") or {}
    return {name: _draw(sub, rng, root=root, depth=depth + 1) for name, sub in properties.items()}


def _array(schema: dict, rng: random.Random, root: Any, depth: int) -> list:
    low = int(schema.get("minItems", 1))
    high = int(schema.get("maxItems", max(low, 3)))
    items = schema.get("items", {"type": "string"})
    return [_draw(items, rng, root=root, depth=depth + 1) for _ in range(rng.randint(low, max(low, high)))]


def _string(schema: dict, rng: random.Random, root: Any, depth: int) -> str:
    low = int(schema.get("minLength", 0))
    high = int(schema.get("maxLength", 10_000))
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 4)))
    while len(text) < low:
        text += " " + rng.choice(_WORDS)
    return text[:high]


def _integer(schema: dict, rng: random.Random, root: Any, depth: int) -> int:
    low = int(schema.get("minimum", 0))
    high = int(schema.get("maximum", low + 100))
    return rng.randint(low, max(low, high))


def _number(schema: dict, rng: random.Random, root: Any, depth: int) -> float:
    low = float(schema.get("minimum", 0.0))
    high = float(schema.get("maximum", low + 100.0))
    return round(rng.uniform(low, max(low, high)), 3)


_BY_TYPE = {
    "object": _object,
    "array": _array,
    "string": _string,
    "integer": _integer,
    "number": _number,
    "boolean": lambda schema, rng, root, depth: rng.random() < 0.5,
    "null": lambda schema, rng, root, depth: None,
}
