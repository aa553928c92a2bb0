"""Conversations as prompts (prompt.messages_column): the spec, the checks of each turn, whole jobs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from jobkit import NS, REPO, TOKEN, data_requests, emulator, read_rows, run, running_endpoint, write_spec
from PIL import Image

from batchrun.errors import RequestFailed, SpecError
from batchrun.records import Row
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec, parse_spec
from batchrun.tasks import make_task

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def chat_spec(**prompt: Any) -> dict[str, Any]:
    return {"task": "chat-completion", "input": {"parquet": "in.parquet"}, "prompt": prompt,
            "endpoint": {"url": "http://127.0.0.1:1"}}


def chat_task(system: str | None = None):
    prompt = {"messages_column": "messages", **({"system": system} if system is not None else {})}
    return make_task(parse_spec(chat_spec(**prompt)))


def failure_of(task, conversation: Any) -> RequestFailed:
    with pytest.raises(RequestFailed) as info:
        task.prepare(Row(position=0, id=0, columns={"messages": conversation}))
    assert info.value.error_type == "bad_conversation" and not info.value.retryable
    return info.value


def write_conversations(path: Path, conversations: list[list[dict[str, Any]]]) -> Path:
    ids = [f"c{i:03d}" for i in range(len(conversations))]
    pq.write_table(pa.table({"id": ids, "messages": pa.array(conversations, pa.list_(MESSAGE))}), path)
    return path


# ------------------------------------------------------------------------------------------------- spec


def test_messages_column_with_a_template_or_a_column_is_a_spec_error_saying_which():
    for other in ({"template": "{a}"}, {"column": "a"}):
        with pytest.raises(SpecError, match="prompt.messages_column.*remove prompt"):
            parse_spec(chat_spec(messages_column="messages", **other))


@pytest.mark.parametrize("task", ["text-generation", "text-to-image"])
def test_messages_column_on_a_task_that_takes_no_messages_is_a_spec_error(task):
    with pytest.raises(SpecError, match=f"only applies to tasks chat-completion and image-text-to-text, not {task}"):
        parse_spec({**chat_spec(messages_column="messages"), "task": task})


def test_a_vision_conversation_needs_no_image_column_and_refuses_one():
    spec = {**chat_spec(messages_column="messages"), "task": "image-text-to-text"}
    assert parse_spec(spec).prompt.messages_column == "messages"
    with pytest.raises(SpecError, match="image parts"):
        parse_spec({**spec, "prompt": {"messages_column": "messages", "image_column": "image"}})


def test_the_messages_column_joins_the_identity_only_when_set():
    plain = parse_spec(chat_spec(template="{a}")).identity()
    assert "messages_column" not in plain["prompt"]  # older outputs resume as they did
    assert parse_spec(chat_spec(messages_column="m")).identity()["prompt"]["messages_column"] == "m"


# ------------------------------------------------------------------------------------------ each turn


def test_the_system_prompt_is_prepended_only_where_the_conversation_has_none():
    task = chat_task(system="Be brief.")
    bare = task.prepare(Row(0, 0, {"messages": [{"role": "user", "content": "hi"}]})).payload["messages"]
    assert bare == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "Be long."}, {"role": "user", "content": "hi"}]
    assert task.prepare(Row(0, 0, {"messages": own})).payload["messages"] == own


@pytest.mark.parametrize(
    ("conversation", "message"),
    [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistent", "content": "c"}],
         "turn 3: role 'assistent' is not one of system, user, assistant"),
        ([{"role": "user", "content": "a"}, {"content": "b"}], "turn 2: has no role"),
        ([{"role": "user", "content": "  "}], "turn 1: the content is empty"),
        ([{"role": "user", "content": [{"type": "text", "text": ""}]}], "turn 1: the content is empty"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "turn 2: the last turn is the assistant's"),
        ([], "no turns"),
        (None, "null"),
    ],
)
def test_a_malformed_conversation_fails_naming_the_turn(conversation, message):
    assert message in str(failure_of(chat_task(), conversation))


def test_an_image_part_in_a_text_chat_fails_and_points_to_the_vision_task():
    conversation = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert "image-text-to-text" in str(failure_of(chat_task(), conversation))


def test_a_conversation_given_as_json_text_is_read_as_its_messages():
    text = json.dumps([{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    messages = chat_task().prepare(Row(0, 0, {"messages": text})).payload["messages"]
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]


# ------------------------------------------------------------------------------------------ whole jobs


def conversation_job(tmp_path: Path, emu, input_path: Path, **overrides: Any) -> Path:
    return write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, overrides.pop("endpoint_name", "gen"))},
                      input_path=input_path, prompt={"messages_column": "messages", "system": "Be brief.", "template": None},
                      **overrides)


def test_a_conversation_job_answers_the_next_turn_and_keeps_the_conversation(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(5)]
    conversations.append([{"role": "system", "content": "Own system."}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}, {"role": "user", "content": "more"}])
    with emulator(running_endpoint()) as emu:
        outcome, _ = run(conversation_job(tmp_path, emu, write_conversations(tmp_path / "in.parquet", conversations)))
        assert data_requests(emu) == 6
    assert outcome.exit_code == 0
    rows = {r["id"]: r for r in read_rows(tmp_path / "out" / "job" / "data")}
    assert len(rows) == 6 and all(r["generated_text"] and r["finish_reason"] for r in rows.values())
    assert rows["c005"]["messages"] == conversations[5]  # the input conversation is kept as it was


def test_a_malformed_conversation_becomes_a_failure_row_naming_the_turn_without_a_request(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    good = [{"role": "user", "content": "hello"}]
    bad = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistent", "content": "c"}]
    ends_with_answer = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with emulator(running_endpoint()) as emu:
        spec = conversation_job(tmp_path, emu, write_conversations(tmp_path / "in.parquet", [good, bad, ends_with_answer]))
        outcome, _ = run(spec)
        assert data_requests(emu) == 1  # only the good conversation was sent
    assert outcome.exit_code == 1
    failures = {r["id"]: r for r in read_rows(tmp_path / "out" / "job" / "failed")}
    assert set(failures) == {"c001", "c002"}
    assert all(f["error_type"] == "bad_conversation" and f["attempts"] == 0 and not f["retryable"]
               for f in failures.values())
    assert "turn 3: role 'assistent' is not one of system, user, assistant" in failures["c001"]["error"]
    assert "turn 2" in failures["c002"]["error"]


def test_a_messages_column_missing_from_the_input_is_refused_before_anything_is_sent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"], "chat": pa.array([[{"role": "user", "content": "x"}]], pa.list_(MESSAGE))}), path)
    with emulator(running_endpoint()) as emu:
        with pytest.raises(SpecError, match="prompt.messages_column.*'messages' is not an input column"):
            run(conversation_job(tmp_path, emu, path))
        assert data_requests(emu) == 0


def test_a_messages_column_that_holds_numbers_is_refused_before_anything_is_sent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"], "messages": [3]}), path)
    with emulator(running_endpoint()) as emu:
        with pytest.raises(SpecError, match="conversations"):
            run(conversation_job(tmp_path, emu, path))
        assert data_requests(emu) == 0


def png_bytes(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_vision_conversation_sends_its_image_parts_as_a_vision_job_sends_images(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(64)).decode()
    big = {"bytes": png_bytes(300), "path": None}
    part = pa.struct([("type", pa.string()), ("text", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("image_url", pa.struct([("url", pa.string())]))])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}],
        [{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "And this?"}]}],
        [{"role": "user", "content": [{"type": "image", "image": {"bytes": b"not an image", "path": None}}]}],
    ]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["v0", "v1", "v2"], "messages": pa.array(conversations, pa.list_(message))}), path)
    with emulator(running_endpoint(name="vis", task="image-text-to-text")) as emu:
        spec = conversation_job(tmp_path, emu, path, endpoint_name="vis", task="image-text-to-text",
                                image={"max_side": 128})
        outcome, _ = run(spec)
        assert data_requests(emu, "vis") == 2
    assert outcome.exit_code == 1
    rows = {r["id"]: r for r in read_rows(tmp_path / "out" / "job" / "data")}
    assert rows["v0"]["image_downsized"] is False and rows["v1"]["image_downsized"] is True
    (failure,) = read_rows(tmp_path / "out" / "job" / "failed")
    assert failure["id"] == "v2" and failure["error_type"] == "bad_image" and failure["error"].startswith("turn 1:")


def test_the_shipped_conversations_job_runs_with_no_setup(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_spec(REPO / "jobs" / "conversations.yaml", output_override=str(tmp_path / "out"))
    assert yaml.safe_load((REPO / "jobs" / "conversations.yaml").read_text())["prompt"]["messages_column"]
    outcome = asyncio.run(run_job(spec, RunOptions(progress="off", handle_signals=False, echo=lambda line: None,
                                                   poll_interval_s=0.02)))
    assert outcome.exit_code == 0
    assert len(read_rows(tmp_path / "out" / "data")) == pq.read_metadata(REPO / "sample_data" / "conversations.parquet").num_rows
