"""The emulated model under a json grammar: answers valid against the schema, and the invalid_json fault."""

from __future__ import annotations

import json
import random

import aiohttp
import jsonschema
import pytest
from emulator_helpers import AUTH, NS, config, endpoint, run

from batchrun.emulator import Emulator, Faults
from batchrun.emulator.schema_docs import document, violation

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 4},
        "address": {"$ref": "#/$defs/address"},
        "score": {"type": ["number", "null"]},
    },
    "required": ["name", "age", "tags", "address"],
    "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"const": "75001"}}}},
}


def post(faults: Faults | None, route: str, body: dict) -> list[tuple[int, dict]]:
    async def main() -> list[tuple[int, dict]]:
        answers = []
        async with Emulator(config(endpoint("gen", faults=faults or Faults()))) as emu:
            url = emu.endpoint_url(NS, "gen")
            async with aiohttp.ClientSession(headers=AUTH) as http:
                for _ in range(2):
                    async with http.post(url + route, json=body) as response:
                        text = await response.text()
                        answers.append((response.status, json.loads(text) if response.status == 200 else {"text": text}))
        return answers

    return run(main())


def test_drawn_documents_are_valid_against_their_schema_and_reproducible() -> None:
    for seed in range(50):
        value = document(PERSON, random.Random(seed))
        jsonschema.validate(value, PERSON)
        assert value == document(PERSON, random.Random(seed))


def test_a_violation_is_never_a_valid_document() -> None:
    for seed in range(50):
        text = violation(PERSON, random.Random(seed))
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(text), PERSON)


def test_generate_with_a_json_grammar_answers_a_valid_document_the_same_each_time() -> None:
    body = {"inputs": "describe someone", "parameters": {"max_new_tokens": 500, "seed": 7,
                                                         "grammar": {"type": "json", "value": PERSON}}}
    (status, first), (_, second) = post(None, "/generate", body)
    assert status == 200 and first == second
    jsonschema.validate(json.loads(first["generated_text"]), PERSON)


@pytest.mark.parametrize("response_format", [
    {"type": "json_object", "value": PERSON},  # TGI's shape
    {"type": "json_schema", "value": {"name": "person", "schema": PERSON}},
    {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},  # OpenAI's shape
])
def test_chat_with_a_response_format_answers_a_valid_document(response_format: dict) -> None:
    body = {"messages": [{"role": "user", "content": "describe someone"}], "max_tokens": 500,
            "response_format": response_format}
    (status, answer), _ = post(None, "/v1/chat/completions", body)
    assert status == 200
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), PERSON)


def test_a_small_max_new_tokens_cuts_the_document_as_a_real_model_would() -> None:
    body = {"inputs": "x", "parameters": {"max_new_tokens": 3, "grammar": {"type": "json", "value": PERSON}}}
    (status, answer), _ = post(None, "/generate", body)
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer["generated_text"])


def test_the_invalid_json_fault_spoils_structured_answers() -> None:
    body = {"inputs": "x", "parameters": {"max_new_tokens": 500, "grammar": {"type": "json", "value": PERSON}}}
    for (status, answer) in post(Faults(rate_invalid_json=1.0), "/generate", body):
        assert status == 200
        with pytest.raises((json.JSONDecodeError, jsonschema.ValidationError)):
            jsonschema.validate(json.loads(answer["generated_text"]), PERSON)


def test_an_unknown_grammar_type_is_refused_as_tgi_refuses_it() -> None:
    body = {"inputs": "x", "parameters": {"grammar": {"type": "yaml", "value": {}}}}
    (status, answer), _ = post(None, "/generate", body)
    assert status == 422 and "unknown variant `yaml`" in answer["text"]
