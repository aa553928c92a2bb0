"""OpenAI batch files in (input.openai_batch) and out (batchrun export), end to end on the emulator."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from jobkit import NS, REPO, TOKEN, cli, data_requests, emulator, read_rows, run, running_endpoint

from batchrun.errors import InputError, OutputError, SpecError
from batchrun.export import export_output
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec, parse_spec


def chat_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "my-model", "messages": [{"role": "user", "content": text}], **body}}


def completion_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "gpt2", "prompt": text, **body}}


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def batch_job(tmp_path: Path, emu, requests: Path, **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "name": "batch",
        "input": {"openai_batch": str(requests)},
        "parameters": {"max_tokens": 40, "seed": 3},
        "endpoint": {"url": emu.endpoint_url(NS, "gen")},
        "retries": {"max_attempts": 2, "backoff_base": 0.01, "backoff_cap": 0.05},
        "request_timeout": "5s",
        "output": {"path": str(tmp_path / "out"), "shard_rows": 4},
        **overrides,
    }
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_batch_output_line(line: dict[str, Any]) -> None:
    """What vLLM's BatchRequestOutput (and code written for OpenAI's output files) reads from a line."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert isinstance(line["id"], str) and line["id"].startswith("batch_req_")
    assert isinstance(line["custom_id"], str)
    response = line["response"]
    if response is not None:
        assert set(response) == {"status_code", "request_id", "body"}
        assert isinstance(response["status_code"], int) and isinstance(response["request_id"], str)
    if line["error"] is not None:
        assert set(line["error"]) == {"code", "message"}


# ------------------------------------------------------------------------------------------------- spec


def test_an_openai_batch_input_implies_its_task_and_takes_no_prompt():
    spec = parse_spec({"input": {"openai_batch": "r.jsonl"}, "endpoint": {"url": "http://127.0.0.1:1"}})
    assert spec.task == "openai-batch" and spec.input.id_column == "custom_id"
    with pytest.raises(SpecError, match="prompt: does not apply"):
        parse_spec({"input": {"openai_batch": "r.jsonl"}, "prompt": {"column": "x"}, "endpoint": {"url": "http://a"}})
    with pytest.raises(SpecError, match="task: is chat-completion"):
        parse_spec({"task": "chat-completion", "input": {"openai_batch": "r.jsonl"}, "endpoint": {"url": "http://a"}})
    with pytest.raises(SpecError, match="set input.openai_batch"):
        parse_spec({"task": "openai-batch", "input": {"jsonl": "r.jsonl"}, "endpoint": {"url": "http://a"}})


# ------------------------------------------------------------------------------------------ whole jobs


def test_a_batch_file_runs_each_body_on_its_route_and_exports_openai_batch_output(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    requests = write_lines(tmp_path / "requests.jsonl", [
        chat_line("chat-1", "Why is the sky blue?"),
        chat_line("chat-2", "Why is the sea salty?", max_tokens=3),  # the body's own value wins
        completion_line("text-1", "Once upon a time"),
        "",  # a blank line is no request
        {"custom_id": "get-1", "method": "GET", "url": "/v1/models", "body": {}},
        {"custom_id": "embed-1", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
    ])
    with emulator(running_endpoint()) as emu:
        outcome, _ = run(batch_job(tmp_path, emu, requests))
        assert data_requests(emu) == 3  # the two lines batchrun cannot serve were never sent
    assert outcome.exit_code == 1
    rows = {r["custom_id"]: r for r in read_rows(tmp_path / "out" / "data")}
    assert set(rows) == {"chat-1", "chat-2", "text-1"}
    chat = json.loads(rows["chat-2"]["response_body"])
    assert chat["object"] == "chat.completion" and chat["model"] == "my-model"  # passed through
    assert chat["usage"]["completion_tokens"] <= 3 and rows["chat-2"]["generated_text"]
    text = json.loads(rows["text-1"]["response_body"])
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == rows["text-1"]["generated_text"]
    assert text["usage"]["completion_tokens"] <= 40  # the spec's max_tokens filled in what the body lacked
    failures = {r["custom_id"]: r for r in read_rows(tmp_path / "out" / "failed")}
    assert {f["error_type"] for f in failures.values()} == {"unsupported_request"}
    assert set(failures) == {"get-1", "embed-1"} and all(f["attempts"] == 0 for f in failures.values())

    result = cli("export", str(tmp_path / "out"), "--format", "openai-batch", "--to", str(tmp_path / "results.jsonl"),
                 "--errors", str(tmp_path / "errors.jsonl"))
    assert result.returncode == 0, result.stderr
    results, errors = read_jsonl(tmp_path / "results.jsonl"), read_jsonl(tmp_path / "errors.jsonl")
    for line in results + errors:
        check_batch_output_line(line)
    by_id = {line["custom_id"]: line for line in results}
    assert set(by_id) == {"chat-1", "chat-2", "text-1"}
    assert by_id["chat-2"]["response"]["status_code"] == 200 and by_id["chat-2"]["error"] is None
    assert by_id["chat-2"]["response"]["body"] == chat  # the endpoint's answer, as it came
    assert {line["custom_id"] for line in errors} == {"get-1", "embed-1"}
    assert all(line["response"] is None and line["error"]["code"] == "unsupported_request" for line in errors)
    assert "/v1/embeddings" in next(e for e in errors if e["custom_id"] == "embed-1")["error"]["message"]
    assert len({line["id"] for line in results + errors}) == 5


def test_a_failure_with_a_status_keeps_it_in_the_exported_response(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    requests = write_lines(tmp_path / "requests.jsonl", [chat_line("ok", "hi"), chat_line("too-long", "hi", max_tokens=10**6)])
    with emulator(running_endpoint()) as emu:
        outcome, _ = run(batch_job(tmp_path, emu, requests))
    assert outcome.exit_code == 1
    export_output(tmp_path / "out", fmt="openai-batch", to=tmp_path / "all.jsonl")  # failures in the same file
    lines = {line["custom_id"]: line for line in read_jsonl(tmp_path / "all.jsonl")}
    assert lines["ok"]["error"] is None
    failed = lines["too-long"]
    check_batch_output_line(failed)
    assert failed["response"]["status_code"] == 422 and failed["error"]["code"]
    assert failed["response"]["body"] is None and "max_new_tokens" in failed["error"]["message"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([chat_line("a", "x"), "{not json", chat_line("b", "y")], r"requests\.jsonl, line 2: not valid JSON"),
        ([chat_line("a", "x"), chat_line("b", "y"), chat_line("a", "z")],
         r"line 3: custom_id 'a' is used twice \(first on requests\.jsonl, line 1\)"),
        ([chat_line("a", "x"), {"method": "POST", "url": "/v1/completions", "body": {}}], "line 2: the request has no custom_id"),
        ([[1, 2]], "line 1: expected a JSON object"),
    ],
)
def test_a_bad_batch_line_stops_the_job_before_anything_is_sent_naming_the_line(tmp_path, monkeypatch, lines, message):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    requests = write_lines(tmp_path / "requests.jsonl", lines)
    with emulator(running_endpoint()) as emu:
        with pytest.raises(InputError, match=message):
            run(batch_job(tmp_path, emu, requests))
        assert data_requests(emu) == 0


def test_batchrun_validate_exits_2_with_the_line_number_of_a_duplicate_custom_id(tmp_path):
    requests = write_lines(tmp_path / "requests.jsonl", [chat_line("a", "x"), chat_line("a", "y")])
    spec = {"input": {"openai_batch": str(requests)}, "endpoint": {"local": {}}, "output": {"path": str(tmp_path / "o")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    result = cli("validate", str(tmp_path / "job.yaml"))
    assert result.returncode == 2
    assert "line 2: custom_id 'a' is used twice" in result.stderr and "Traceback" not in result.stderr


# -------------------------------------------------------------------------------------------------- export


def test_export_jsonl_writes_committed_rows_only_and_failures_where_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    requests = write_lines(tmp_path / "requests.jsonl",
                           [chat_line(f"r{i}", f"question {i}") for i in range(6)] + [chat_line("bad", "x", stream=True)])
    with emulator(running_endpoint()) as emu:
        run(batch_job(tmp_path, emu, requests))
    out = tmp_path / "out"
    # A Parquet file the manifest does not list (a crash's leftover) is not a committed result.
    stray = next((out / "data").glob("*.parquet"))
    shutil.copy(stray, out / "data" / "part-99999-stray.parquet")
    counts = export_output(out, fmt="jsonl", to=tmp_path / "rows.jsonl", errors=tmp_path / "failed.jsonl")
    assert (counts.results, counts.failures) == (6, 1)
    rows = read_jsonl(tmp_path / "rows.jsonl")
    assert sorted(r["custom_id"] for r in rows) == [f"r{i}" for i in range(6)]
    assert all(r["generated_text"] and "latency_s" in r for r in rows)
    (failure,) = read_jsonl(tmp_path / "failed.jsonl")
    assert failure["custom_id"] == "bad" and failure["error_type"] == "unsupported_request"


def test_export_openai_batch_of_a_job_that_kept_no_raw_answers_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "chat"
    (out / "state").mkdir(parents=True)
    (out / "state" / "job.json").write_text(json.dumps({"identity": {"task": "chat-completion"}}))
    with pytest.raises(OutputError, match="--format jsonl"):
        export_output(out, fmt="openai-batch", to=tmp_path / "r.jsonl")
    result = cli("export", str(out), "--format", "openai-batch", "--to", str(tmp_path / "r.jsonl"))
    assert result.returncode == 2 and not (tmp_path / "r.jsonl").exists()


def test_the_shipped_openai_batch_job_runs_with_no_setup_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = load_spec(REPO / "jobs" / "openai_batch.yaml", output_override=str(tmp_path / "out"))
    outcome = asyncio.run(run_job(spec, RunOptions(progress="off", handle_signals=False, echo=lambda line: None,
                                                   poll_interval_s=0.02)))
    assert outcome.exit_code == 0
    counts = export_output(tmp_path / "out", fmt="openai-batch", to=tmp_path / "results.jsonl")
    lines = (REPO / "sample_data" / "openai_batch.jsonl").read_text().splitlines()
    assert counts.results == len(lines) and counts.failures == 0
    for line in read_jsonl(tmp_path / "results.jsonl"):
        check_batch_output_line(line)
