"""Jobs of several steps: generate two samples, judge each with a second model, keep what passed.

Each step writes its own folder once, resumably, under its own fingerprint: a rerun sends nothing for a
finished step, a kill in step 2 repeats no request of step 1, and an edit of step k reruns step k and
those after it only.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from jobkit import (
    NS,
    REPO,
    TOKEN,
    cli,
    committed_rows,
    data_requests,
    emulator,
    read_ids,
    running_endpoint,
    start_run,
    wait_until,
    write_topics,
)

import batchrun
from batchrun.errors import SpecError
from batchrun.spec import parse_spec

VERDICT = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5},
                                            "reason": {"type": "string"}},
           "required": ["score", "reason"]}


def _endpoint(emu: Any, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": NS, "api_url": emu.api_url, "ready_timeout": "10s"}


def three_steps(emu: Any, out: Path, *, keep: str = "score_judge >= 3", judge_prompt: str | None = None,
                **job: Any) -> dict[str, Any]:
    """Generate 2 samples per row on `gen`, judge each on `judge` with a structured verdict, keep what passed."""
    return {
        "name": "gj",
        "input": {"id_column": "id"},
        "concurrency": {"max": 8, "initial": 4},
        "retries": {"max_attempts": 3, "backoff_base": 0.01, "backoff_cap": 0.05},
        "output": {"path": str(out), "shard_rows": 10},
        "steps": [
            {"name": "generate", "task": "chat-completion", "endpoint": _endpoint(emu, "gen"), "samples": 2,
             "prompt": {"template": "Answer briefly: {topic}"}, "parameters": {"max_tokens": 16, "seed": 1}},
            {"name": "judge", "task": "chat-completion", "endpoint": _endpoint(emu, "judge"),
             "prompt": {"template": judge_prompt or "Question: {topic}\nAnswer: {generated_text_generate}\nRate it."},
             "output_schema": VERDICT, "parameters": {"max_tokens": 80, "seed": 1}},
            {"name": "keep", "filter": keep},
        ],
        **job,
    }


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"row-{i:05d}", "topic": f"topic number {i}"} for i in range(n)]


def _two_endpoints(**overrides: Any) -> Any:
    return emulator(running_endpoint("gen", **overrides), running_endpoint("judge", **overrides))


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _quiet(spec: dict[str, Any], rows: list[dict[str, Any]], lines: list[str] | None = None) -> batchrun.Result:
    return batchrun.run(spec, input=rows, progress=False, echo=(lines.append if lines is not None else lambda _: None))


def test_every_id_flows_through_each_step_exactly_once_and_the_last_keeps_what_passed(tmp_path, token):
    out = tmp_path / "out" / "gj"
    rows = _rows(12)
    with _two_endpoints() as emu:
        result = _quiet(three_steps(emu, out), rows)
        assert data_requests(emu, "gen") == 24 and data_requests(emu, "judge") == 24
    assert result.exit_code == 0
    assert list(result.steps) == ["generate", "judge", "keep"]
    pairs = sorted(f"{r['id']}/{s}" for r in rows for s in (0, 1))
    generated = read_ids(out / "steps" / "generate" / "data")
    assert len(generated) == 24 and len(set(zip(generated, read_ids(out / "steps" / "generate" / "data", "sample"),
                                                strict=True))) == 24
    assert sorted(read_ids(out / "steps" / "judge" / "data")) == pairs  # one verdict per (id, sample)
    judged = result.steps["judge"].dataset
    assert set(judged.column_names) >= {"id", "topic", "generated_text_generate", "parsed"}
    passed = sorted(f"{r['id']}" for r in judged if r["parsed"]["score"] >= 3)
    kept = result.dataset
    assert sorted(kept["id"]) == passed  # the filter kept exactly the rows whose verdict passed
    assert all(score >= 3 for score in kept["score_judge"]) and "reason_judge" in kept.column_names
    assert 0 < len(kept) < 24  # the emulator's verdicts vary: some rows are dropped
    assert len(result.steps["judge"].dataset) == 24  # a row the filter drops stays in the earlier step's output


def test_a_rerun_of_a_finished_job_sends_nothing(tmp_path, token):
    out = tmp_path / "out" / "gj"
    with _two_endpoints() as emu:
        _quiet(three_steps(emu, out), _rows(8))
        again = _quiet(three_steps(emu, out), _rows(8))
        assert data_requests(emu, "gen") == 16 and data_requests(emu, "judge") == 16
    assert again.exit_code == 0


def test_editing_the_filter_reruns_only_the_filter_step(tmp_path, token):
    out = tmp_path / "out" / "gj"
    with _two_endpoints() as emu:
        first = _quiet(three_steps(emu, out, keep="score_judge >= 3"), _rows(10))
        lines: list[str] = []
        second = _quiet(three_steps(emu, out, keep="score_judge >= 5"), _rows(10), lines)
        assert data_requests(emu, "gen") == 20 and data_requests(emu, "judge") == 20  # nothing paid again
    assert all(score >= 5 for score in second.dataset["score_judge"])
    assert len(second.dataset) <= len(first.dataset)
    assert not any("step generate: its settings" in line or "step judge: its settings" in line for line in lines)


def test_editing_the_judge_prompt_reruns_the_judge_and_what_follows_never_the_generation(tmp_path, token):
    out = tmp_path / "out" / "gj"
    with _two_endpoints() as emu:
        _quiet(three_steps(emu, out), _rows(10))
        lines: list[str] = []
        result = _quiet(three_steps(emu, out, judge_prompt="Grade: {generated_text_generate}"), _rows(10), lines)
        assert data_requests(emu, "gen") == 20  # step 1 untouched
        assert data_requests(emu, "judge") == 40  # step 2 started over
    assert any("step judge: its settings or its input changed" in line for line in lines)
    assert result.exit_code == 0
    assert len(result.steps["judge"].dataset) == 20
    set_aside = [p.name for p in (out / "steps").iterdir() if p.name.startswith("judge.previous-")]
    assert len(set_aside) == 1  # the old verdicts are kept, never deleted


def test_killed_in_step_two_the_rerun_repeats_no_request_of_step_one(tmp_path):
    input_path = write_topics(tmp_path / "in" / "t.parquet", 60)
    out = tmp_path / "out" / "gj"
    with emulator(running_endpoint("gen"), running_endpoint("judge", latency_base_s=0.1)) as emu:
        spec = three_steps(emu, out)
        spec["input"] = {"parquet": str(input_path), "id_column": "id"}
        spec["concurrency"] = {"max": 2, "initial": 2}
        path = tmp_path / "gj.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        proc = start_run(path, log=tmp_path / "run.log")
        generate = out / "steps" / "generate"
        wait_until(lambda: (generate / "state" / "summary.json").exists()
                   and committed_rows(out / "steps" / "judge") >= 10, timeout=120, proc=proc,
                   what="step 1 ended and step 2 committing rows")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert data_requests(emu, "gen") == 120
        judged_before = data_requests(emu, "judge")
        committed = committed_rows(out / "steps" / "judge")
        assert 10 <= committed < 120
        result = cli("run", str(path), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert result.returncode == 0, result.stderr
        assert data_requests(emu, "gen") == 120  # no paid request of step 1 again
        # Step 2 resumes: only its rows not committed at the kill are asked again.
        assert data_requests(emu, "judge") == judged_before + (120 - committed)
    assert len(read_ids(out / "steps" / "generate" / "data")) == 120
    judged = read_ids(out / "steps" / "judge" / "data")
    assert len(judged) == 120 and len(set(judged)) == 120  # every (id, sample) once


def test_steps_stream_the_judge_works_while_the_generation_still_runs(tmp_path, token):
    import threading
    import time

    out = tmp_path / "out" / "gj"
    seen: list[tuple[int, int]] = []
    with emulator(running_endpoint("gen", latency_base_s=0.05), running_endpoint("judge")) as emu:
        finished = threading.Event()

        def watch() -> None:
            while not finished.is_set():
                seen.append((data_requests(emu, "gen"), data_requests(emu, "judge")))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        spec = three_steps(emu, out, concurrency={"max": 2, "initial": 2})
        result = _quiet(spec, _rows(40))
        finished.set()
        watcher.join()
    assert result.exit_code == 0
    assert any(judged > 0 and generated < 80 for generated, judged in seen)  # both endpoints at work at once
    assert len(read_ids(out / "steps" / "judge" / "data")) == 80


def test_status_reads_each_step(tmp_path, token):
    out = tmp_path / "out" / "gj"
    with _two_endpoints() as emu:
        _quiet(three_steps(emu, out), _rows(5))
    status = cli("status", str(out))
    assert status.returncode == 0, status.stderr
    for name in ("generate", "judge", "keep"):
        assert f"step {name}" in status.stdout


def test_a_step_spec_names_its_problems_by_step():
    base = {"name": "gj", "input": {"parquet": "x.parquet"}, "endpoint": {"url": "http://127.0.0.1:9"},
            "task": "chat-completion", "prompt": {"template": "{q}"}}
    with pytest.raises(SpecError, match=r"steps\.judge\.retries\.max_atempts"):
        parse_spec({**base, "steps": [{"name": "gen"}, {"name": "judge", "retries": {"max_atempts": 3}}]})
    with pytest.raises(SpecError, match=r"steps\.keep\.filter"):
        parse_spec({**base, "steps": [{"name": "gen"}, {"name": "keep", "filter": "__import__('os')"}]})
    with pytest.raises(SpecError, match=r"steps\.gen\.output"):
        parse_spec({**base, "steps": [{"name": "gen", "output": {"path": "x"}}]})
    with pytest.raises(SpecError, match="two steps"):
        parse_spec({**base, "steps": [{"name": "gen"}, {"name": "gen"}]})
    spec = parse_spec({**base, "concurrency": {"max": 7},
                       "steps": [{"name": "gen"}, {"name": "judge", "concurrency": {"max": 3}}]})
    assert [s.job.concurrency.max for s in spec.steps] == [7, 3]  # job-level keys apply unless a step sets its own
    assert spec.steps[1].job.input.kind == "step"


def test_compare_of_two_runs_reads_the_judges_scores(tmp_path, token):
    import json

    with _two_endpoints() as emu:
        for night in ("night-1", "night-2"):
            _quiet(three_steps(emu, tmp_path / "nightly" / night), _rows(6))
    report = cli("compare", str(tmp_path / "nightly" / "night-1"), str(tmp_path / "nightly" / "night-2"), "--json",
                 "--fail-if", "score_judge<1")
    assert report.returncode == 0, report.stderr
    figures = json.loads(report.stdout)
    assert "score_judge" in json.dumps(figures)
    assert figures["common"] == 12  # the judge's rows: one per (id, sample)
    generation = cli("compare", str(tmp_path / "nightly" / "night-1"), str(tmp_path / "nightly" / "night-2"),
                     "--step", "generate")
    assert generation.returncode == 0, generation.stderr
    unknown = cli("compare", str(tmp_path / "nightly" / "night-1"), str(tmp_path / "nightly" / "night-2"),
                  "--step", "nope")
    assert unknown.returncode == 2 and "its steps: generate, judge, keep" in unknown.stderr
    runs = cli("runs", str(tmp_path / "nightly"))
    assert runs.returncode == 0, runs.stderr


def test_the_shipped_judge_job_runs_on_the_emulator_with_no_setup(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = batchrun.run("jobs/judge.yaml", output=tmp_path / "judge", progress=False, echo=lambda _: None)
    assert result.exit_code == 0
    judged = result.steps["judge"].dataset
    assert len(judged) == 48  # 24 questions, 2 answers each, each judged
    assert all(1 <= row["parsed"]["score"] <= 5 and row["parsed"]["reason"] for row in judged)
    assert all(score >= 4 for score in result.dataset["score_judge"])


def test_push_publishes_the_last_step_by_default_or_every_step_as_its_own_config(tmp_path, token):
    import pyarrow.parquet as pq

    out = tmp_path / "out" / "gj"
    env = {"HF_TOKEN": TOKEN}
    with _two_endpoints() as emu:
        _quiet(three_steps(emu, out), _rows(4))
        last = cli("push", str(out), "--repo", "hub-test/judged", "--endpoint", emu.hub_url, env=env)
        assert last.returncode == 0, last.stderr
        files = emu.hub.files("hub-test/judged")
        pushed = [name for name in files if name.startswith("default/") and name.endswith(".parquet")]
        assert pushed and "score_judge" in pq.read_schema(__import__("io").BytesIO(files[pushed[0]])).names
        every = cli("push", str(out), "--repo", "hub-test/steps", "--endpoint", emu.hub_url, "--all-steps", env=env)
        assert every.returncode == 0, every.stderr
        configs = {name.split("/")[0] for name in emu.hub.files("hub-test/steps") if name.endswith(".parquet")}
    assert configs == {"generate", "judge", "keep"}


def test_a_filter_may_be_a_python_function_and_a_missing_column_is_named(tmp_path, token, monkeypatch):
    (tmp_path / "my_filters.py").write_text("def short(row):\n    return len(row['generated_text_generate']) % 2 == 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with _two_endpoints() as emu:
        spec = three_steps(emu, tmp_path / "out" / "fn", keep="my_filters:short")
        result = _quiet(spec, _rows(6))
        assert result.exit_code == 0
        judged = result.steps["judge"].dataset
        assert sorted(result.dataset["id"]) == sorted(r["id"] for r in judged if len(r["generated_text_generate"]) % 2 == 0)
        wrong = three_steps(emu, tmp_path / "out" / "typo", keep="score_judgee >= 4")
        with pytest.raises(batchrun.InputError, match="no column 'score_judgee'"):
            _quiet(wrong, _rows(6))


def test_an_interrupt_in_step_two_pauses_its_endpoint_and_the_rerun_finishes_it(tmp_path, token):
    import _thread
    import threading

    out = tmp_path / "out" / "gj"
    rows = _rows(60)
    with emulator(running_endpoint("gen"), running_endpoint("judge", initial_state="paused",
                                                                latency_base_s=0.05)) as emu:
        spec = three_steps(emu, out, concurrency={"max": 2, "initial": 2})

        def interrupt_in_step_two() -> None:
            wait_until(lambda: committed_rows(out / "steps" / "judge") >= 10, timeout=120, what="step 2 rows")
            _thread.interrupt_main()

        threading.Thread(target=interrupt_in_step_two, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _quiet(spec, rows)
        assert emu.state(NS, "judge").state == "paused"
        assert not (out / "steps" / "keep").exists()  # the job ended in step 2
        stopped = batchrun.Result.from_output(out)
        assert stopped.exit_code == 3 and [s["name"] for s in stopped.summary["steps"]] == ["generate", "judge"]
        generated = data_requests(emu, "gen")
        result = _quiet(spec, rows)
        assert data_requests(emu, "gen") == generated
    assert result.exit_code == 0
    judged = read_ids(out / "steps" / "judge" / "data")
    assert len(judged) == 120 and len(set(judged)) == 120


def test_a_later_step_naming_a_column_that_does_not_exist_is_said_and_nothing_of_it_runs(tmp_path, token):
    out = tmp_path / "out" / "gj"
    lines: list[str] = []
    with _two_endpoints() as emu:
        spec = three_steps(emu, out, judge_prompt="Grade: {answer}")
        with pytest.raises(SpecError, match="answer"):
            _quiet(spec, _rows(5), lines)
        assert data_requests(emu, "judge") == 0
        assert data_requests(emu, "gen") == 10  # the step before finished: a fixed rerun reuses it
    assert any(line.startswith("step judge: error:") for line in lines)


def test_two_steps_on_one_dedicated_endpoint_take_turns_and_leave_it_paused(tmp_path, token):
    out = tmp_path / "out" / "gj"
    with emulator(running_endpoint("gen", initial_state="paused")) as emu:
        spec = three_steps(emu, out)
        spec["steps"][1]["endpoint"] = _endpoint(emu, "gen")
        lines: list[str] = []
        result = _quiet(spec, _rows(10), lines)
        assert emu.state(NS, "gen").state == "paused"
        pauses = [e for e in emu.control_log if e["path"].endswith("/pause")]
        resumes = [e for e in emu.control_log if e["path"].endswith("/resume")]
        assert len(pauses) == 2 and len(resumes) == 2
        assert resumes[0]["t"] < pauses[0]["t"] < resumes[1]["t"] < pauses[1]["t"]  # one step after the other
        assert data_requests(emu, "gen") == 40
    assert result.exit_code == 0
    assert any("step judge: waits for step generate" in line for line in lines)
