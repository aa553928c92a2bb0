"""Tasks: rows become TGI requests, and 200 answers become output columns (protocols.md §1)."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from batchrun.errors import RequestFailed
from batchrun.records import Row
from batchrun.tasks import OUTPUT_SCHEMA, join_url, make_task, render_prompt, template_fields


def row(**columns) -> Row:
    return Row(position=0, id="a", columns=columns)


def test_template_fills_placeholders_from_columns() -> None:
    assert render_prompt(template="Tell me about {topic} in {n} words", column=None, columns={"topic": "owls", "n": 5}) == (
        "Tell me about owls in 5 words"
    )


def test_doubled_braces_are_literal() -> None:
    assert render_prompt(template='{{"q": "{q}"}}', column=None, columns={"q": "x"}) == '{"q": "x"}'


def test_a_missing_column_is_a_template_failure_naming_it() -> None:
    with pytest.raises(RequestFailed) as info:
        render_prompt(template="About {topic}", column=None, columns={"other": 1})
    assert info.value.error_type == "template" and not info.value.retryable and info.value.status is None
    assert "topic" in info.value.message


def test_a_null_value_is_a_template_failure_naming_the_column() -> None:
    with pytest.raises(RequestFailed) as info:
        render_prompt(template="About {topic}", column=None, columns={"topic": None})
    assert info.value.error_type == "template" and "topic" in info.value.message


@pytest.mark.parametrize("template", ["About {}", "About {0}", "About {topic:%%%}"])
def test_templates_that_cannot_render_are_template_failures(template: str) -> None:
    with pytest.raises(RequestFailed) as info:
        render_prompt(template=template, column=None, columns={"topic": "x"})
    assert info.value.error_type == "template" and not info.value.retryable


def test_template_fields_lists_the_columns_a_template_needs() -> None:
    assert template_fields("{a} and {b.x} and {a} {{c}} {d[0]}") == ["a", "b", "d"]
    with pytest.raises(ValueError):
        template_fields("unclosed {a")


def test_a_column_prompt_uses_the_value_as_it_is() -> None:
    assert render_prompt(template=None, column="text", columns={"text": "hello {not a field}"}) == "hello {not a field}"


def test_a_null_prompt_column_is_an_empty_prompt_failure() -> None:
    with pytest.raises(RequestFailed) as info:
        render_prompt(template=None, column="text", columns={"text": None})
    assert info.value.error_type == "empty_prompt"


@pytest.mark.parametrize("task", ["text-generation", "chat-completion"])
@pytest.mark.parametrize("value", ["", "   \n"])
def test_empty_prompts_fail_before_any_request(task: str, value: str) -> None:
    with pytest.raises(RequestFailed) as info:
        make_task(task, column="text").prepare(row(text=value))
    assert info.value.error_type == "empty_prompt" and not info.value.retryable


def test_text_generation_posts_to_root_with_details_on_and_parameters_unchanged() -> None:
    task = make_task("text-generation", template="Q: {q}", parameters={"max_new_tokens": 20, "stop": ["\n"]})
    request = task.prepare(row(q="why?"))
    assert request.path == "/"
    assert request.payload == {"inputs": "Q: why?", "parameters": {"max_new_tokens": 20, "stop": ["\n"], "details": True}}


def test_text_generation_reads_the_list_answer_with_header_prompt_tokens() -> None:
    body = json.dumps([{"generated_text": "because", "details": {"finish_reason": "eos_token", "generated_tokens": 2}}])
    out = make_task("text-generation", column="q").parse(200, {"X-Prompt-Tokens": "7"}, body.encode())
    assert out == {"generated_text": "because", "finish_reason": "eos_token", "prompt_tokens": 7, "completion_tokens": 2}


def test_text_generation_without_details_or_headers_gives_nulls() -> None:
    out = make_task("text-generation", column="q").parse(200, {}, b'[{"generated_text": "x"}]')
    assert out == {"generated_text": "x", "finish_reason": None, "prompt_tokens": None, "completion_tokens": None}


def test_chat_builds_system_and_user_messages() -> None:
    task = make_task("chat-completion", template="Hi {name}", system="Be brief.", parameters={"max_tokens": 9})
    request = task.prepare(row(name="Ada"))
    assert request.path == "/v1/chat/completions"
    assert request.payload == {
        "model": "tgi",
        "max_tokens": 9,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi Ada"}],
    }


def test_chat_without_system_sends_only_the_user_message() -> None:
    request = make_task("chat-completion", column="q").prepare(row(q="hello"))
    assert request.payload["messages"] == [{"role": "user", "content": "hello"}]


def test_chat_reads_content_finish_reason_and_usage() -> None:
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    }
    out = make_task("chat-completion", column="q").parse(200, {}, json.dumps(body).encode())
    assert out == {"generated_text": "Hello!", "finish_reason": "stop", "prompt_tokens": 20, "completion_tokens": 3}


@pytest.mark.parametrize("task", ["text-generation", "chat-completion"])
@pytest.mark.parametrize(
    "body",
    [
        b'{"error": "Incomplete generation", "error_type": "incomplete_generation"}',
        b'[{"generated_text": "cut off',
        b"",
        b"<html>502</html>",
        b"[]",
        b'{"choices": []}',
    ],
)
def test_a_200_with_an_error_or_a_broken_body_is_a_retryable_bad_body(task: str, body: bytes) -> None:
    with pytest.raises(RequestFailed) as info:
        make_task(task, column="q").parse(200, {}, body)
    assert info.value.error_type == "bad_body" and info.value.retryable


def test_output_columns_match_the_schema() -> None:
    out = make_task("text-generation", column="q").parse(200, {"x-prompt-tokens": "1"}, b'[{"generated_text": "x"}]')
    table = pa.Table.from_pylist([out], schema=OUTPUT_SCHEMA)
    assert table.schema == make_task("chat-completion", column="q").output_schema
    assert OUTPUT_SCHEMA.field("prompt_tokens").nullable and OUTPUT_SCHEMA.field("completion_tokens").type == pa.int64()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"template": "{a}", "column": "a"},
        {},
        {"template": "{a", "column": None},
        {"column": "a", "parameters": {"stream": True}},
        {"column": "a", "system": "hi"},  # text generation has no system message
    ],
)
def test_impossible_task_configurations_are_refused_up_front(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_task("text-generation", **kwargs)


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ValueError, match="text-to-image"):
        make_task("text-to-image", column="a")


@pytest.mark.parametrize(
    ("base", "path", "expected"),
    [
        ("http://h", "/", "http://h/"),
        ("http://h/", "/", "http://h/"),
        ("http://h", "/v1/chat/completions", "http://h/v1/chat/completions"),
        ("http://h/", "/v1/chat/completions", "http://h/v1/chat/completions"),
        ("http://h/proxy/ep", "/v1/chat/completions", "http://h/proxy/ep/v1/chat/completions"),
        ("http://h/proxy/ep/", "/", "http://h/proxy/ep/"),
        ("http://h/v1/chat/completions", "/v1/chat/completions", "http://h/v1/chat/completions"),
        ("http://h/v1/chat/completions/", "/v1/chat/completions", "http://h/v1/chat/completions"),
    ],
)
def test_join_url_puts_one_slash_between_base_and_path(base: str, path: str, expected: str) -> None:
    assert join_url(base, path) == expected
