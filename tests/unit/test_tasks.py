"""Tasks: rows become TGI requests, and 200 answers become output columns (protocols.md §1)."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from batchrun.errors import RequestFailed
from batchrun.images import derive_seed
from batchrun.records import Row
from batchrun.spec import ImageSpec, parse_spec
from batchrun.tasks import (
    OUTPUT_SCHEMA,
    TASK_KINDS,
    VISION_OUTPUT_SCHEMA,
    PreparedRequest,
    build_task,
    join_url,
    make_task,
    placeholder_column_problem,
    prompt_column_problem,
    render_prompt,
    task_kind,
)


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


_ODD = type("Odd", (), {"__format__": lambda self, spec: (_ for _ in ()).throw(TypeError("no format"))})


@pytest.mark.parametrize("template", [
    "Write about {topic}.", "{topic}{n}", "{{literal}} {topic} {{", "n={n:>4} x={x!r} {topic}", "{my col} and {topic}",
])
def test_templates_render_as_format_map_does_for_every_kind_of_value(template: str) -> None:
    """Bare placeholders take a quicker path than format_map (worked out once per template): what it
    writes must be what format_map writes, for every type a column can hold."""
    import datetime
    import decimal

    import numpy as np

    values = ["owls", 5, 2.5, True, decimal.Decimal("1.10"), datetime.date(2026, 1, 2), np.float32(0.5),
              np.int64(7), "é {x}"]
    for value in values:
        columns = {"topic": value, "n": 3, "x": "y", "my col": value}
        assert render_prompt(template=template, column=None, columns=columns) == template.format_map(columns)


def test_a_value_whose_format_fails_is_a_template_failure() -> None:
    with pytest.raises(RequestFailed) as caught:
        render_prompt(template="About {topic}", column=None, columns={"topic": _ODD()})
    assert caught.value.error_type == "template"
    assert "no format" in str(caught.value)


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
        build_task(task, column="text").prepare(row(text=value))
    assert info.value.error_type == "empty_prompt" and not info.value.retryable


def test_text_generation_posts_to_root_with_details_on_and_parameters_unchanged() -> None:
    task = build_task("text-generation", template="Q: {q}", parameters={"max_new_tokens": 20, "stop": ["\n"]})
    request = task.prepare(row(q="why?"))
    assert request.path == "/"
    assert request.payload == {"inputs": "Q: why?", "parameters": {"max_new_tokens": 20, "stop": ["\n"], "details": True}}


def test_text_generation_reads_the_list_answer_with_header_prompt_tokens() -> None:
    body = json.dumps([{"generated_text": "because", "details": {"finish_reason": "eos_token", "generated_tokens": 2}}])
    out = build_task("text-generation", column="q").parse(200, {"X-Prompt-Tokens": "7"}, body.encode())
    assert out == {"generated_text": "because", "finish_reason": "eos_token", "prompt_tokens": 7, "completion_tokens": 2}


def test_text_generation_without_details_or_headers_gives_nulls() -> None:
    out = build_task("text-generation", column="q").parse(200, {}, b'[{"generated_text": "x"}]')
    assert out == {"generated_text": "x", "finish_reason": None, "prompt_tokens": None, "completion_tokens": None}


def test_chat_builds_system_and_user_messages() -> None:
    task = build_task("chat-completion", template="Hi {name}", system="Be brief.", parameters={"max_tokens": 9})
    request = task.prepare(row(name="Ada"))
    assert request.path == "/v1/chat/completions"
    assert request.payload == {
        "model": "tgi",
        "max_tokens": 9,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi Ada"}],
    }


def test_chat_without_system_sends_only_the_user_message() -> None:
    request = build_task("chat-completion", column="q").prepare(row(q="hello"))
    assert request.payload["messages"] == [{"role": "user", "content": "hello"}]


def test_chat_reads_content_finish_reason_and_usage() -> None:
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    }
    out = build_task("chat-completion", column="q").parse(200, {}, json.dumps(body).encode())
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
        build_task(task, column="q").parse(200, {}, body)
    assert info.value.error_type == "bad_body" and info.value.retryable


def test_output_columns_match_the_schema() -> None:
    out = build_task("text-generation", column="q").parse(200, {"x-prompt-tokens": "1"}, b'[{"generated_text": "x"}]')
    table = pa.Table.from_pylist([out], schema=OUTPUT_SCHEMA)
    assert table.schema == build_task("chat-completion", column="q").output_schema
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
        build_task("text-generation", **kwargs)


def test_unknown_task_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="text-to-image"):
        build_task("image-to-video", column="a")


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


# ---------------------------------------------------------------------------------------- images


def picture(pil_format: str = "PNG", size: tuple[int, int] = (32, 24)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(out, format=pil_format)
    return out.getvalue()


def text_to_image(**image: object):
    return build_task(
        "text-to-image", column="prompt", parameters={"width": 64, "height": 64, "num_inference_steps": 4},
        image=ImageSpec(**image),
    )


def test_text_to_image_asks_for_the_format_with_accept_and_sends_the_row_seed() -> None:
    task = text_to_image(format="webp", seed_column="seed")
    request = task.prepare(Row(position=3, id=7, columns={"prompt": "a fox", "seed": 42}))
    assert request.path == "/" and request.headers == {"Accept": "image/webp"}
    assert request.payload == {"inputs": "a fox", "parameters": {"width": 64, "height": 64, "num_inference_steps": 4,
                                                                 "seed": 42}}
    assert request.outputs == {"seed": 42}


def test_a_row_without_a_seed_gets_one_derived_from_its_id_and_the_job_seed() -> None:
    task = text_to_image(seed_column="seed", seed=5)
    no_column = text_to_image(seed=5)
    null_seed = task.prepare(Row(position=0, id="r1", columns={"prompt": "x", "seed": None}))
    derived = no_column.prepare(Row(position=9, id="r1", columns={"prompt": "x"}))
    assert null_seed.outputs["seed"] == derived.outputs["seed"] == derive_seed("r1", 5)
    assert derived.payload["parameters"]["seed"] == derive_seed("r1", 5) != derive_seed("r1", 0)


@pytest.mark.parametrize("seed", ["12", -1, 2**63, True])
def test_a_seed_that_is_not_a_usable_integer_fails_the_row_before_sending(seed) -> None:
    with pytest.raises(RequestFailed) as info:
        text_to_image(seed_column="seed").prepare(row(prompt="x", seed=seed))
    assert info.value.error_type == "bad_seed" and not info.value.retryable


def test_text_to_image_stores_the_bytes_unchanged_with_size_and_format() -> None:
    data = picture("PNG", (48, 40))
    out = text_to_image().parse(200, {"Content-Type": "image/png"}, data)
    assert out == {"image": {"bytes": data, "path": None}, "width": 48, "height": 40, "format": "png"}
    assert set(out) | {"seed"} == set(text_to_image().output_schema.names)


def test_a_json_answer_with_a_base64_png_is_accepted_when_png_was_asked() -> None:
    data = picture("PNG")
    body = json.dumps(base64.b64encode(data).decode()).encode()
    out = text_to_image().parse(200, {"content-type": "application/json"}, body)
    assert out["image"]["bytes"] == data


@pytest.mark.parametrize(
    ("content_type", "body", "error_type"),
    [
        ("text/html", b"<html><body>Bad gateway</body></html>", "not_an_image"),
        ("application/json", b'{"error":"CUDA out of memory"}', "not_an_image"),
        ("image/png", picture("PNG")[:60], "not_an_image"),
        ("image/png", picture("JPEG"), "wrong_image_format"),
    ],
)
def test_a_200_that_is_not_the_asked_image_is_a_retryable_failure(content_type, body, error_type) -> None:
    with pytest.raises(RequestFailed) as info:
        text_to_image().parse(200, {"Content-Type": content_type}, body)
    assert info.value.error_type == error_type and info.value.retryable


def test_text_to_image_refuses_a_seed_parameter_and_a_system_prompt() -> None:
    with pytest.raises(ValueError, match="seed"):
        build_task("text-to-image", column="p", parameters={"seed": 1})
    with pytest.raises(ValueError, match="system"):
        build_task("text-to-image", column="p", system="be nice")


def vision(**image: object):
    return build_task("image-text-to-text", template="Q: {q}", image_column="img", system="Be brief.",
                     parameters={"max_tokens": 20}, image=ImageSpec(**image))


def test_vision_sends_the_text_and_the_image_as_chat_content_parts() -> None:
    data = picture("JPEG")
    request = vision().prepare(row(q="colour?", img={"bytes": data, "path": "a.jpg"}))
    assert request.path == "/v1/chat/completions"
    system, user = request.payload["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    text, image = user["content"]
    assert text == {"type": "text", "text": "Q: colour?"}
    assert image == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}}
    assert request.payload["max_tokens"] == 20 and request.outputs == {"image_downsized": False}


def test_vision_downsizes_an_image_over_max_side_and_says_so() -> None:
    request = vision(max_side=16).prepare(row(q="x", img=picture("PNG", (64, 32))))
    url = request.payload["messages"][1]["content"][1]["image_url"]["url"]
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.size == (16, 8) and request.outputs == {"image_downsized": True}


def test_vision_passes_an_http_url_through_and_cannot_say_whether_it_was_downsized() -> None:
    request = vision(max_side=16).prepare(row(q="x", img="https://example.org/cat.png"))
    assert request.payload["messages"][1]["content"][1]["image_url"]["url"] == "https://example.org/cat.png"
    assert request.outputs == {"image_downsized": None}


@pytest.mark.parametrize("value", [b"not an image", None, {"bytes": None, "path": None}, "/no/such/file.png"])
def test_an_input_image_that_cannot_be_read_fails_the_row_before_sending(value) -> None:
    with pytest.raises(RequestFailed) as info:
        vision().prepare(row(q="x", img=value))
    assert info.value.error_type == "bad_image" and not info.value.retryable


def test_vision_reads_answers_like_chat_and_declares_the_downsized_column() -> None:
    body = json.dumps({"choices": [{"message": {"content": "red"}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 70, "completion_tokens": 1}}).encode()
    out = vision().parse(200, {}, body)
    assert out == {"generated_text": "red", "finish_reason": "stop", "prompt_tokens": 70, "completion_tokens": 1}
    assert VISION_OUTPUT_SCHEMA.names == [*OUTPUT_SCHEMA.names, "image_downsized"]


def test_vision_needs_an_image_column_and_only_vision_takes_one() -> None:
    with pytest.raises(ValueError, match="image_column"):
        build_task("image-text-to-text", column="q")
    with pytest.raises(ValueError, match="image_column"):
        build_task("chat-completion", column="q", image_column="img")


def test_text_tasks_send_no_extra_headers_and_know_no_outputs_in_advance() -> None:
    request = build_task("chat-completion", column="q").prepare(row(q="hi"))
    assert request == PreparedRequest("/v1/chat/completions", request.payload)
    assert request.headers == {} and request.outputs == {}


# ---------------------------------------------------------------------------------------- registry


def spec_for(task: str, **extra: object):
    data = {"task": task, "input": {"parquet": "in.parquet"}, "prompt": {"column": "q"},
            "endpoint": {"url": "http://127.0.0.1:8080"}}
    if task == "image-text-to-text":
        data["prompt"] = {"column": "q", "image_column": "img"}
    if task == "rerank":
        data["prompt"] = {"column": "q", "texts_column": "texts"}
    if task == "openai-batch":  # the input names this task; the request lines carry their prompts
        data = {"input": {"openai_batch": "requests.jsonl"}, "endpoint": data["endpoint"]}
    data.update(extra)
    return parse_spec(data)


@pytest.mark.parametrize("name", list(TASK_KINDS))
def test_make_task_builds_the_registered_task_for_a_spec_and_sends_to_its_route(name: str) -> None:
    task = make_task(spec_for(name))
    assert task.name == name
    body = '{"messages": [{"role": "user", "content": "hello"}]}'
    request = task.prepare(row(q="hello", img=picture("PNG"), method="POST", url="/v1/chat/completions", body=body,
                               texts=["a", "b"]))
    assert request.path == task_kind(name).route


def test_the_registry_lists_every_task_once_in_the_documented_order() -> None:
    assert list(TASK_KINDS) == ["text-generation", "chat-completion", "text-to-image", "image-text-to-text",
                                "openai-batch", "feature-extraction", "rerank", "text-classification"]
    assert task_kind("chat-completion").endpoint_tasks == (
        "text-generation", "text2text-generation", "image-text-to-text", "conversational")
    assert {k.name: k.emulator_task for k in TASK_KINDS.values()} == {
        "text-generation": "text-generation", "chat-completion": "text-generation",
        "text-to-image": "text-to-image", "image-text-to-text": "image-text-to-text",
        "openai-batch": "text-generation", "feature-extraction": "feature-extraction", "rerank": "text-ranking",
        "text-classification": "text-classification"}
    with pytest.raises(ValueError, match="chat-completion"):
        task_kind("chat")


def test_describe_shows_the_prompt_a_text_request_sends() -> None:
    task = build_task("text-generation", template="Q: {q}")
    assert task.describe(task.prepare(row(q="why?"))) == "Q: why?"


def test_describe_summarises_an_image_part_and_never_prints_its_base64() -> None:
    task = vision()
    data = picture("PNG")
    text = task.describe(task.prepare(row(q="colour?", img=data)))
    assert text == "system: Be brief. | user: Q: colour? <image data:image/png>"
    assert base64.b64encode(data).decode()[:20] not in text


# ---------------------------------------------------------------------------------- prompt values


@pytest.mark.parametrize("value", [[{"role": "user", "content": "hi"}], {"a": 1}, b"bytes", 7, 1.5, True])
def test_a_prompt_column_value_that_is_not_a_string_fails_the_row_instead_of_sending_its_repr(value) -> None:
    with pytest.raises(RequestFailed) as info:
        render_prompt(template=None, column="messages", columns={"messages": value})
    assert info.value.error_type == "bad_prompt" and not info.value.retryable
    assert "'messages'" in info.value.message and type(value).__name__ in info.value.message.replace("binary", "bytes")


@pytest.mark.parametrize("value", [[1, 2], {"a": 1}, b"\x00\x01"])
def test_a_placeholder_holding_a_list_a_mapping_or_bytes_is_a_template_failure_naming_the_column(value) -> None:
    with pytest.raises(RequestFailed) as info:
        render_prompt(template="About {topic}", column=None, columns={"topic": value})
    assert info.value.error_type == "template" and not info.value.retryable and "'topic'" in info.value.message


def test_placeholders_format_numbers() -> None:
    assert render_prompt(template="{n} and {x}", column=None, columns={"n": 3, "x": 0.5}) == "3 and 0.5"


@pytest.mark.parametrize(
    ("kind", "accepted"),
    [
        (pa.string(), True),
        (pa.large_string(), True),
        (pa.int64(), False),
        (pa.float64(), False),
        (pa.binary(), False),
        (pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])), False),
        (pa.struct([("bytes", pa.binary()), ("path", pa.string())]), False),
    ],
)
def test_only_a_string_column_can_be_the_prompt_column(kind: pa.DataType, accepted: bool) -> None:
    problem = prompt_column_problem(pa.field("q", kind))
    assert (problem is None) == accepted
    if problem is not None:
        assert "'q'" in problem and str(kind) in problem


@pytest.mark.parametrize(
    ("kind", "accepted"),
    [(pa.string(), True), (pa.int32(), True), (pa.float64(), True), (pa.bool_(), True), (pa.timestamp("s"), True),
     (pa.binary(), False), (pa.list_(pa.string()), False), (pa.struct([("a", pa.int8())]), False)],
)
def test_a_placeholder_column_takes_scalars_but_not_lists_structs_or_binary(kind: pa.DataType, accepted: bool) -> None:
    assert (placeholder_column_problem(pa.field("topic", kind)) is None) == accepted


def test_request_bodies_read_back_as_the_payload_even_where_orjson_cannot_write_them() -> None:
    from batchrun.tasks.base import dump_json

    for payload in (
        {"model": "tgi", "messages": [{"role": "user", "content": "héllo \u2028 ✓ \"quoted\""}], "max_tokens": 8},
        {"logit_bias": {123: 5}},  # a key that is not a string: written as json writes it
        {"seed": 2**70},  # beyond 64 bits: orjson refuses, json writes it
    ):
        assert json.loads(dump_json(payload)) == json.loads(json.dumps(payload))


def test_answers_read_the_same_values_as_json_where_orjson_refuses_them() -> None:
    from batchrun.tasks.base import load_json

    for body in (b'{"a": 1, "b": [true, null, 0.1, "\\u00e9"]}', b'{"a": NaN}', b'[1e400]', b'{"s": "\\ud800"}'):
        assert repr(load_json(body)) == repr(json.loads(body))
    with pytest.raises(RequestFailed) as failure:
        load_json(b'{"generated_text": "cut sh')
    assert failure.value.error_type == "bad_body" and failure.value.retryable
