"""Structured output: schemas checked in the spec, sent the way each route takes them, answers read strictly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batchrun.errors import RequestFailed, SpecError
from batchrun.records import Row
from batchrun.spec import parse_spec
from batchrun.structured import InvalidAnswer, OutputSchema, arrow_type_of
from batchrun.tasks import make_task
from batchrun.tasks.structured import StructuredTask

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "home": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    "required": ["name", "age"],
}


def spec(**top: Any) -> dict[str, Any]:
    prompt = top.pop("prompt", {"column": "prompt"})
    return {
        "task": top.pop("task", "text-generation"),
        "input": {"parquet": "in.parquet"},
        "prompt": prompt,
        "endpoint": {"url": "http://127.0.0.1:1"},
        **top,
    }


def row(**columns: Any) -> Row:
    return Row(position=0, id="r1", columns={"prompt": "describe someone", **columns})


def test_a_schema_that_is_not_json_schema_is_a_spec_error_naming_the_key() -> None:
    with pytest.raises(SpecError, match=r"output_schema: not a valid JSON Schema .*'strnig'"):
        parse_spec(spec(output_schema={"type": "strnig"}))


def test_a_schema_file_is_read_and_a_missing_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON))
    assert parse_spec(spec(output_schema=str(path))).output_schema == PERSON
    with pytest.raises(SpecError, match="does not exist"):
        parse_spec(spec(output_schema=str(tmp_path / "nope.json")))


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"task": "text-to-image", "output_schema": PERSON}, "structured output applies to tasks"),
        ({"output_schema": PERSON, "prompt": {"column": "prompt", "schema_column": "s"}}, "not both"),
        ({"output_schema": PERSON, "parameters": {"grammar": {"type": "json", "value": {}}}}, "set by batchrun"),
        ({"task": "chat-completion", "output_schema": PERSON, "parameters": {"response_format": {}}}, "set by"),
    ],
)
def test_structured_output_keys_that_cannot_work_are_refused(top: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec(**top))


def test_the_schema_is_part_of_the_jobs_identity_only_when_set() -> None:
    plain = parse_spec(spec())
    assert "output_schema" not in plain.identity()
    assert parse_spec(spec(output_schema=PERSON)).identity()["output_schema"] == PERSON


def test_text_generation_sends_the_schema_as_a_tgi_json_grammar() -> None:
    task = make_task(parse_spec(spec(output_schema=PERSON, parameters={"max_new_tokens": 50})))
    request = task.prepare(row())
    assert request.payload["parameters"]["grammar"] == {"type": "json", "value": PERSON}
    assert request.payload["parameters"]["max_new_tokens"] == 50


def test_chat_sends_the_schema_as_response_format() -> None:
    task = make_task(parse_spec(spec(task="chat-completion", output_schema=PERSON)))
    request = task.prepare(row())
    assert request.payload["response_format"] == {"type": "json_object", "value": PERSON}
    assert request.answer_schema == PERSON


def test_a_redraw_changes_only_the_seed_and_is_reproducible() -> None:
    task = make_task(parse_spec(spec(output_schema=PERSON, parameters={"seed": 5})))
    assert isinstance(task, StructuredTask)
    first = task.prepare(row())
    again = [task.redraw(first, row(), n).payload["parameters"]["seed"] for n in (1, 2, 1)]
    assert again[0] == again[2] != again[1] != 5
    assert {k: v for k, v in task.redraw(first, row(), 1).payload["parameters"].items() if k != "seed"} == {
        k: v for k, v in first.payload["parameters"].items() if k != "seed"
    }


def test_a_valid_answer_lands_parsed_as_a_struct_beside_the_raw_text() -> None:
    task = make_task(parse_spec(spec(output_schema=PERSON)))
    assert isinstance(task, StructuredTask)
    assert task.output_schema.field("parsed").type == arrow_type_of(PERSON)
    assert task.output_schema.names[0] == "generated_text"
    text = json.dumps({"name": "Ada", "age": 36, "tags": ["x"], "home": {"city": "London"}, "extra": 1})
    outcome = task.read(task.prepare(row()), {"generated_text": text})
    assert outcome["parsed"]["home"] == {"city": "London"} and outcome["generated_text"] == text
    pa.array([outcome["parsed"]], type=task.output_schema.field("parsed").type)  # fits the column


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"name": "Ada", "age": ', "not valid JSON"),
        ('{"name": "Ada"}', "'age' is a required property"),
        ('{"name": "Ada", "age": "old"}', "'old' is not of type 'integer' at age"),
        ('{"name": "Ada", "age": 100000000000000000000000}', "does not fit the column type"),
    ],
)
def test_an_invalid_answer_says_what_is_wrong_and_keeps_the_raw_text(text: str, message: str) -> None:
    task = make_task(parse_spec(spec(output_schema=PERSON)))
    assert isinstance(task, StructuredTask)
    with pytest.raises(InvalidAnswer, match=message) as caught:
        task.read(task.prepare(row()), {"generated_text": text})
    assert text in str(caught.value)


def test_schemas_that_do_not_map_cleanly_are_stored_as_json_text() -> None:
    assert arrow_type_of({"type": "object"}) is None
    assert arrow_type_of({"anyOf": [{"type": "string"}, {"type": "integer"}]}) is None
    assert arrow_type_of({"type": "array", "items": {"enum": ["a", "b"]}}) == pa.list_(pa.string())
    free = OutputSchema(schema={"type": "object"})
    assert free.column.type == pa.string()
    assert json.loads(free.parse('{"b": [1, {"c": null}]}', {"type": "object"})) == {"b": [1, {"c": None}]}


def test_a_schema_per_row_comes_from_its_column_and_a_bad_one_fails_that_row_unsent() -> None:
    task = make_task(parse_spec(spec(task="chat-completion", prompt={"column": "prompt", "schema_column": "s"})))
    request = task.prepare(row(s=json.dumps(PERSON)))
    assert request.payload["response_format"]["value"] == PERSON
    assert task.output_schema.field("parsed").type == pa.string()
    with pytest.raises(RequestFailed, match="not a valid JSON Schema") as caught:
        task.prepare(row(s={"type": 12}))
    assert caught.value.error_type == "bad_schema" and not caught.value.retryable


# ---------------------------------------------------------------------------------------------- whole jobs

from jobkit import read_rows, run, write_spec, write_topics  # noqa: E402

LOCAL = {"latency_base_s": 0.001, "pending_s": 0.01, "initializing_s": 0.01}


def structured_job(tmp_path: Path, *, faults: dict[str, Any] | None = None, **overrides: Any) -> Path:
    input_path = write_topics(tmp_path / "in" / "t.parquet", 30)
    local = {**LOCAL, **({"faults": faults} if faults else {})}
    overrides.setdefault("parameters", {"max_tokens": 400, "seed": 1})
    return write_spec(tmp_path, endpoint={"local": local}, input_path=input_path, output_schema=PERSON, **overrides)


def test_a_structured_job_writes_each_answer_parsed_into_a_struct_column_that_datasets_reads(tmp_path: Path) -> None:
    outcome, _ = run(structured_job(tmp_path))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 30
    for record in rows:
        assert record["parsed"] == json.loads(record["generated_text"])  # the emulator fills every property
    from datasets import load_dataset

    features = load_dataset("parquet", data_dir=str(tmp_path / "out" / "job" / "data"), split="train").features
    assert set(features["parsed"]) == {"name", "age", "tags", "home"}


def test_invalid_answers_are_drawn_again_and_the_rest_fail_as_invalid_output_with_the_raw_text(tmp_path: Path) -> None:
    # Half of all structured answers are spoilt: with 2 more tries, most rows end valid; a few
    # (about 1 in 8) stay invalid and become failure rows that keep the validator's message and the text.
    spec = structured_job(tmp_path, faults={"rate_invalid_json": 0.5, "seed": 3})
    outcome, _ = run(spec)
    ok = read_rows(tmp_path / "out" / "job" / "data")
    failed = read_rows(tmp_path / "out" / "job" / "failed")
    assert len(ok) + len(failed) == 30 and {r["id"] for r in ok}.isdisjoint(r["id"] for r in failed)
    assert any(r["attempts"] > 1 for r in ok)  # some were drawn again and then passed
    assert failed, "with half the answers spoilt, some row should stay invalid after 3 tries"
    for record in failed:
        assert record["error_type"] == "invalid_output" and record["attempts"] == 3 and not record["retryable"]
        assert "answer:" in record["error"]
    assert outcome.exit_code == 1  # finished, some rows failed


def test_a_token_limit_too_small_for_the_document_fails_rows_as_invalid_output(tmp_path: Path) -> None:
    outcome, _ = run(structured_job(tmp_path, parameters={"max_tokens": 4, "seed": 1}))
    failed = read_rows(tmp_path / "out" / "job" / "failed")
    assert len(failed) == 30 and {r["error_type"] for r in failed} == {"invalid_output"}
    assert "not valid JSON" in failed[0]["error"]
    assert outcome.exit_code == 1


def test_a_job_killed_amid_invalid_answer_retries_resumes_with_nothing_lost_or_twice(tmp_path: Path) -> None:
    import signal

    from jobkit import (
        NS,
        TOKEN,
        cli,
        committed_rows,
        emulator,
        read_ids,
        running_endpoint,
        start_run,
        wait_for_committed,
    )

    rows = 300
    # Half the answers spoilt, so at any moment many rows are between tries; the latency and the
    # concurrency bound the pace, so the kill (after an observed commit) lands mid-work on any machine.
    endpoint = running_endpoint(latency_base_s=0.03, faults={"rate_invalid_json": 0.5, "seed": 5})
    with emulator(endpoint) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", rows)
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          output_schema=PERSON, parameters={"max_tokens": 400, "seed": 1},
                          concurrency={"max": 8, "initial": 8}, output={"shard_rows": 20})
        out = tmp_path / "out" / "job"
        log = tmp_path / "killed.stderr"
        proc = start_run(spec, log=log)
        try:
            wait_for_committed(out, 40, proc, log=log)
            assert proc.poll() is None, "the job finished before its kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert 0 < committed_rows(out) < rows
        finished = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert finished.returncode == 1, finished.stderr  # finished; some rows stayed invalid
    ok, failed = read_ids(out / "data"), read_ids(out / "failed")
    assert sorted(ok + failed) == sorted(f"row-{i:05d}" for i in range(rows))  # each id exactly once
    assert ok and failed


def test_answers_are_still_read_against_the_schema_when_scorers_wrap_the_task(tmp_path: Path) -> None:
    # Scorers wrap the structured task; the dispatcher must still find it and parse every answer.
    outcome, _ = run(structured_job(tmp_path, score=[{"regex": {"pattern": "name"}}]))
    assert outcome.exit_code == 0
    rows = read_rows(tmp_path / "out" / "job" / "data")
    assert len(rows) == 30
    assert all(r["parsed"] == json.loads(r["generated_text"]) and r["score_regex"] == 1.0 for r in rows)
