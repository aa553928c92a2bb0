"""Whole jobs against the emulator: the promises of reliability.md, end to end."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobkit import (
    NS,
    REPO,
    TOKEN,
    cli,
    data_requests,
    emulator,
    read_ids,
    read_rows,
    run,
    running_endpoint,
    wait_for_committed,
    wait_until,
    write_spec,
    write_topics,
)

from batchrun.errors import AuthError, ConfigMismatchError, EndpointUnusableError, InputError, OutputError
from batchrun.progress import ProgressReporter
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec


def _url_job(tmp_path: Path, emu, n: int = 60, name: str = "job", **overrides):
    input_path = write_topics(tmp_path / "in" / "topics.parquet", n, empty_every=overrides.pop("empty_every", None))
    return write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path, name=name, **overrides)


def test_every_input_id_ends_in_exactly_one_record(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(latency_base_s=0.002)) as emu:
        spec = _url_job(tmp_path, emu, n=90, empty_every=10)
        outcome, _ = run(spec)
    out = tmp_path / "out" / "job"
    ok, failed = read_ids(out / "data"), read_ids(out / "failed")
    assert len(ok) == 81 and len(failed) == 9
    assert sorted(ok + failed) == [f"row-{i:05d}" for i in range(90)]
    failures = read_rows(out / "failed")
    assert {f["error_type"] for f in failures} == {"template"}  # a null topic: no request was sent
    assert all(f["attempts"] == 0 and f["status"] is None for f in failures)
    assert not any(f["retryable"] for f in failures)
    assert outcome.exit_code == 1  # finished, some rows failed


def test_results_load_with_datasets_as_one_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        outcome, _ = run(_url_job(tmp_path, emu, n=100))  # shard_rows 40: three shards
    assert outcome.exit_code == 0
    files = str(tmp_path / "out" / "job" / "data" / "*.parquet")
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert len(ds) == 100
    for column in ("id", "topic", "generated_text", "finish_reason", "prompt_tokens", "completion_tokens",
                   "latency_s", "attempts"):
        assert column in ds.column_names
    assert all(text for text in ds["generated_text"])


def test_rerunning_a_finished_job_sends_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        spec = _url_job(tmp_path, emu, n=50)
        first, _ = run(spec)
        sent = data_requests(emu)
        second, lines = run(spec)
        assert data_requests(emu) == sent
    assert first.exit_code == second.exit_code == 0
    assert second.summary["rows"]["skipped"] == 50
    assert any("nothing to do" in line for line in lines)
    assert sorted(read_ids(tmp_path / "out" / "job" / "data")) == [f"row-{i:05d}" for i in range(50)]


def test_rerunning_a_finished_job_does_not_ask_the_endpoint_anything(tmp_path, monkeypatch):
    # Not even GET /info: a url in front of a scaled-to-zero endpoint would wake up and bill for it.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(model_id="org/model-a")) as emu:
        spec = _url_job(tmp_path, emu, n=20)
        first, _ = run(spec)
    assert first.exit_code == 0
    again, lines = run(spec)  # the server is gone now: any request would fail
    assert again.exit_code == 0 and any("nothing to do" in line for line in lines)
    job = json.loads((tmp_path / "out" / "job" / "state" / "job.json").read_text())
    assert job["identity"]["model"] == "org/model-a"  # what the first run learned is kept


def test_a_changed_template_is_refused_and_fresh_sets_the_old_output_aside(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        run(_url_job(tmp_path, emu, n=20))
        changed = _url_job(tmp_path, emu, n=20, prompt={"template": "Another {topic}."})
        with pytest.raises(ConfigMismatchError) as refused:
            run(changed)
        assert "prompt" in str(refused.value) and "--fresh" in str(refused.value)
        outcome, lines = run(changed, fresh=True)
    assert outcome.exit_code == 0
    aside = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("job.previous-")]
    assert len(aside) == 1 and len(read_ids(aside[0] / "data")) == 20  # kept, not deleted
    assert len(read_ids(tmp_path / "out" / "job" / "data")) == 20


def test_retryable_failures_are_tried_again_on_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # One in five requests fails with a 500 (too few for an outage), and each row has one attempt: the
    # draws are seeded, so the same rows fail on every run of this test.
    retries = {"max_attempts": 1, "budget_ratio": 1.0}
    with emulator(running_endpoint(faults={"rate_500": 0.2})) as flaky:
        outcome, _ = run(_url_job(tmp_path, flaky, n=60, retries=retries))
    out = tmp_path / "out" / "job"
    assert outcome.exit_code == 1
    failures = read_rows(out / "failed")
    assert 0 < len(failures) < 60
    assert all(f["retryable"] and f["status"] == 500 and f["attempts"] == 1 for f in failures)
    assert all(f["topic"] == f"topic number {int(f['id'][4:])}" for f in failures)  # kept columns, as in data
    with emulator(running_endpoint()) as healthy:  # the server moved and healed: same job, new url
        outcome, _ = run(_url_job(tmp_path, healthy, n=60, retries=retries))
        assert data_requests(healthy) == len(failures)
    assert outcome.exit_code == 0
    assert read_ids(out / "failed") == []  # the retryable failures were reopened...
    assert sorted(read_ids(out / "data")) == [f"row-{i:05d}" for i in range(60)]  # ...and succeeded, once each
    assert list((out / "state" / "retired").glob("*.parquet"))  # the old failure shard was kept aside


def test_a_retry_budget_makes_an_outage_wait_instead_of_burning_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        emu.inject(NS, "gen", "outage_503", seconds=1.5)
        outcome, _ = run(_url_job(tmp_path, emu, n=300, retries={"max_attempts": 2, "budget_ratio": 0.1}))
        sent = data_requests(emu)
    ok = len(read_ids(tmp_path / "out" / "job" / "data"))
    # Without a budget, every row reaching the outage would spend both attempts inside it. With it,
    # retries are held back until requests succeed again, so most rows survive the outage.
    assert ok > 150
    assert sent < 2 * 300


def test_a_422_becomes_a_failure_row_and_is_never_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(max_input_tokens=2, max_total_tokens=200)) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", 10)
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          prompt={"template": "{topic}", "system": None}, name="v")
        outcome, _ = run(spec)
        failures = read_rows(tmp_path / "out" / "v" / "failed")
        assert failures and all(f["status"] == 422 and not f["retryable"] and f["attempts"] == 1 for f in failures)
        assert all("Input validation error" in f["error"] for f in failures)
        sent = data_requests(emu)
        run(spec)  # permanent failures are not tried again
        assert data_requests(emu) == sent


def test_a_refused_token_stops_the_job_with_exit_code_2(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_for_this_test")
    with emulator(running_endpoint()) as emu:
        spec = _url_job(tmp_path, emu, n=40)
        with pytest.raises(AuthError) as refused:
            run(spec)
        assert "HF_TOKEN" in str(refused.value)
        result = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": "hf_wrong_token_for_this_test"})
    assert result.returncode == 2, result.stderr
    assert "hf_wrong_token_for_this_test" not in result.stderr + result.stdout


def test_the_token_appears_nowhere(tmp_path, monkeypatch, caplog):
    canary = "hf_CANARY_not_a_real_token_0123456789"
    forms = [canary, base64.b64encode(canary.encode()).decode(), urllib.parse.quote(canary, safe="")]
    monkeypatch.setenv("HF_TOKEN", canary)
    caplog.set_level(logging.DEBUG)
    with emulator(running_endpoint(faults={"rate_429": 0.1, "rate_500": 0.1}), token=canary) as emu:
        spec = _url_job(tmp_path, emu, n=60, empty_every=7)
        outcome, lines = run(spec)
        result = cli("run", str(spec), "--progress", "lines", "-vv", env={"HF_TOKEN": canary})
    assert outcome.exit_code in (0, 1)
    texts = ["\n".join(lines), caplog.text, result.stdout, result.stderr]
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    for text in texts:
        for form in forms:
            assert form not in text


def test_validate_and_a_spec_typo_cost_nothing(tmp_path):
    with emulator(running_endpoint(initial_state="paused")) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", 10)
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": "5s"}
        good = write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name="good")
        result = cli("validate", str(good), env={"HF_TOKEN": TOKEN})
        assert result.returncode == 0, result.stderr
        assert "nothing was sent" in result.stdout
        assert "Write about topic number 0." in result.stdout
        typo = write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name="typo", retries={"max_atempts": 3})
        result = cli("run", str(typo), env={"HF_TOKEN": TOKEN})
        assert result.returncode == 2
        assert "retries.max_atempts" in result.stderr and "max_attempts" in result.stderr
        assert emu.control_log == []
        assert data_requests(emu) == 0


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_commits_pauses_and_exits_3_then_resume_finishes(tmp_path, signame):
    with emulator(running_endpoint(initial_state="paused", latency_base_s=0.05)) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", 200)
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": "10s"}
        spec = write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name="sig",
                          concurrency={"max": 4, "initial": 4}, output={"shard_rows": 10})
        env = {**os.environ, "HF_TOKEN": TOKEN}
        proc = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = tmp_path / "out" / "sig"
        wait_for_committed(out, 10, proc)
        proc.send_signal(getattr(signal, signame))
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 3, stderr
        assert emu.state(NS, "gen").state == "paused"
        pauses = [e for e in emu.control_log if e["path"].endswith("/pause")]
        assert len(pauses) == 1
        last_request = emu.stats()["endpoints"][f"{NS}/gen"]["last_request_at"]
        assert last_request <= pauses[0]["t"]  # nothing reached the endpoint after the pause
        partial = read_ids(out / "data")
        assert 0 < len(partial) < 200
        result = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert result.returncode == 0, result.stderr
    ids = read_ids(out / "data")
    assert sorted(ids) == [f"row-{i:05d}" for i in range(200)]  # none lost, none twice


@pytest.mark.parametrize(
    "faults",
    [
        {"rate_429": 0.3, "retry_after_s": 0.05},
        {"rate_429_no_retry_after": 0.3},
        {"rate_500": 0.1, "rate_502": 0.1, "rate_503": 0.1, "rate_504": 0.1},
        {"rate_reset": 0.2},
        {"rate_hang": 0.1, "hang_s": 30.0},
        {"rate_error_body": 0.2},
        {"rate_truncated": 0.2},
    ],
    ids=["429-retry-after", "429-bare", "5xx", "resets", "hangs", "error-bodies", "truncated-bodies"],
)
def test_every_fault_kind_ends_each_row_exactly_once_and_mostly_in_success(tmp_path, monkeypatch, faults):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(faults={"seed": 3, **faults})) as emu:
        spec = _url_job(tmp_path, emu, n=80, request_timeout="1s",
                        retries={"max_attempts": 5, "budget_ratio": 1.0, "max_retry_after": 0.2})
        outcome, _ = run(spec)
    out = tmp_path / "out" / "job"
    ok, failed = read_ids(out / "data"), read_ids(out / "failed")
    assert sorted(ok + failed) == [f"row-{i:05d}" for i in range(80)]
    assert len(ok) >= 76, read_rows(out / "failed")  # five attempts get nearly every row through
    assert outcome.summary["retries"] > 0  # the faults did fire, and were retried
    assert outcome.exit_code in (0, 1)
    rows = read_rows(out / "data")
    assert all(r["generated_text"] for r in rows)  # a 200 with an error or cut body never counts as a result
    assert max(r["attempts"] for r in rows) > 1


def test_status_reports_done_failed_and_remaining_from_the_output_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        spec = _url_job(tmp_path, emu, n=50, empty_every=10, input={"limit": 30})
        before = cli("status", str(spec))
        assert before.returncode == 0 and "no run yet" in before.stdout
        run(spec)
    result = cli("status", str(spec))
    assert result.returncode == 0, result.stderr
    assert "ok: 27 rows" in result.stdout
    assert "failed: 3 final, 0 retryable" in result.stdout
    assert "remaining: 0 of 30" in result.stdout


def test_a_template_that_fails_on_every_previewed_row_is_a_spec_error_before_anything_runs(tmp_path):
    with emulator(running_endpoint(initial_state="paused")) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", 10)
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url}
        spec = write_spec(tmp_path, endpoint=endpoint, input_path=input_path, prompt={"template": "{topic:d}"})
        result = cli("run", str(spec), env={"HF_TOKEN": TOKEN})
        assert result.returncode == 2, result.stderr
        assert "prompt.template" in result.stderr and "cannot render" in result.stderr
        assert [e for e in emu.control_log if e["method"] != "GET"] == []  # nothing resumed


def test_parameters_the_route_cannot_take_are_a_spec_error_not_a_traceback(tmp_path):
    input_path = write_topics(tmp_path / "in" / "t.parquet", 5)
    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=input_path,
                      parameters={"max_tokens": 5, "stream": True})
    result = cli("validate", str(spec))
    assert result.returncode == 2
    assert "parameters" in result.stderr and "Traceback" not in result.stderr


def test_the_preflight_record_never_shows_the_token(tmp_path, monkeypatch):
    import asyncio

    from batchrun.runner import preflight
    from batchrun.spec import load_spec

    canary = "hf_CANARY_preflight_repr_NOT_REAL"
    monkeypatch.setenv("HF_TOKEN", canary)
    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"},
                      input_path=write_topics(tmp_path / "in" / "t.parquet", 5))
    pre = asyncio.run(preflight(load_spec(spec)))
    assert pre.token == canary
    assert canary not in repr(pre)


def test_an_endpoint_serving_another_model_is_refused_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from huggingface_hub import HfApi, constants

    with emulator(running_endpoint(initial_state="paused")) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", 10)
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url}
        # The first run does half the rows (a limit is not part of the job's identity); the second resumes.
        first, _ = run(write_spec(tmp_path, endpoint=endpoint, input_path=input_path, input={"limit": 5}))
        assert first.exit_code == 0
        spec = write_spec(tmp_path, endpoint=endpoint, input_path=input_path)
        monkeypatch.setattr(constants, "INFERENCE_ENDPOINTS_ENDPOINT", emu.api_url)
        HfApi().update_inference_endpoint("gen", namespace=NS, repository="other/model", token=TOKEN)
        with pytest.raises(ConfigMismatchError) as refused:
            run(spec)
    assert "model" in str(refused.value)


def test_two_signals_in_the_same_instant_still_stop_gracefully(tmp_path):
    with emulator(running_endpoint(initial_state="paused", latency_base_s=0.05)) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", 400)
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": "10s"}
        spec = write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name="twice",
                          concurrency={"max": 4, "initial": 4}, output={"shard_rows": 10})
        proc = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                                cwd=REPO, env={**os.environ, "HF_TOKEN": TOKEN},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_committed(tmp_path / "out" / "twice", 10, proc)
        proc.send_signal(signal.SIGINT)  # what `timeout -s INT` does: the process, then its group
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 3, stderr
        assert "abandoning" not in stderr and "finishing requests in flight" in stderr
        assert emu.state(NS, "gen").state == "paused"


def test_a_resume_does_not_scan_the_same_input_for_duplicate_ids_again(tmp_path, monkeypatch):
    from batchrun.sources import ParquetSource

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    scans = []
    original = ParquetSource.find_duplicate_ids
    monkeypatch.setattr(ParquetSource, "find_duplicate_ids", lambda self: scans.append(1) or original(self))
    with emulator(running_endpoint()) as emu:
        spec = _url_job(tmp_path, emu, n=20)
        run(spec)
        run(spec)
        assert len(scans) == 1
        write_topics(tmp_path / "in" / "topics.parquet", 25)  # the input changed: scanned again (and refused)
        with pytest.raises(ConfigMismatchError):
            run(spec)
        assert len(scans) == 2


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        ({"prompt": {"template": "About {subject}."}}, "prompt.template", "{subject}"),
        ({"prompt": {"template": None, "column": "text", "system": None}}, "prompt.column", "'text'"),
        ({"input": {"keep_columns": ["topic", "nope"]}}, "input.keep_columns", "nope"),
    ],
    ids=["template", "column", "keep_columns"],
)
def test_a_column_the_input_lacks_is_named_with_the_columns_it_has(tmp_path, overrides, key, words):
    input_path = write_topics(tmp_path / "in" / "t.parquet", 5)
    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=input_path, **overrides)
    result = cli("validate", str(spec))
    assert result.returncode == 2
    assert key in result.stderr and words in result.stderr and "columns: id, topic" in result.stderr
    assert not (tmp_path / "out").exists()  # validate changed nothing


def test_a_paused_url_endpoint_is_refused_before_anything_is_sent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(initial_state="paused")) as emu:
        spec = _url_job(tmp_path, emu, n=30)
        with pytest.raises(EndpointUnusableError, match="paused") as refused:
            run(spec)
        assert refused.value.exit_code == 2
        assert data_requests(emu) == 0


def test_a_url_endpoint_paused_mid_run_stops_the_job_without_losing_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(latency_base_s=0.02)) as emu:
        spec = _url_job(tmp_path, emu, n=300, concurrency={"max": 4, "initial": 4})
        pauser = threading.Thread(target=_pause_after, args=(emu, 20), daemon=True)
        pauser.start()
        stopped, _ = run(spec)
        pauser.join(timeout=30)
        assert stopped.exit_code == 3 and "paused" in stopped.summary["stop_reason"]
        assert read_ids(tmp_path / "out" / "job" / "failed") == []  # no row was written off
        emu.call(lambda: emu.emulator.state(NS, "gen").resume())
        wait_until(lambda: emu.state(NS, "gen").state == "running", what="the endpoint running again")
        resumed, _ = run(spec)
    assert resumed.exit_code == 0
    assert sorted(read_ids(tmp_path / "out" / "job" / "data")) == [f"row-{i:05d}" for i in range(300)]


def _pause_after(emu, requests: int) -> None:
    """Pause the endpoint once it has served ``requests`` requests (an observed event, not a delay)."""
    wait_until(lambda: data_requests(emu) >= requests, timeout=60, what=f"{requests} requests served")
    emu.call(lambda: emu.emulator.state(NS, "gen").pause())


def test_a_typo_under_endpoint_local_is_found_by_validate(tmp_path):
    input_path = write_topics(tmp_path / "in" / "t.parquet", 5)
    spec = write_spec(tmp_path, endpoint={"local": {"latncy_base_s": 0.1}}, input_path=input_path)
    result = cli("validate", str(spec))
    assert result.returncode == 2
    assert "endpoint.local" in result.stderr and "latncy_base_s" in result.stderr


def test_validate_says_when_the_output_holds_another_configuration(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint()) as emu:
        run(_url_job(tmp_path, emu, n=10))
        changed = _url_job(tmp_path, emu, n=10, parameters={"max_tokens": 12, "seed": 2})
        result = cli("validate", str(changed))
    assert result.returncode == 2
    assert "seed: 1 -> 2" in result.stderr and "--fresh" in result.stderr


def test_a_failure_rate_past_the_threshold_stops_the_job_and_pauses_the_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    endpoint_config = running_endpoint(initial_state="paused", max_input_tokens=2, max_total_tokens=200,
                                       latency_base_s=0.005)
    with emulator(endpoint_config) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", 600)
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url}
        spec = write_spec(tmp_path, endpoint=endpoint, input_path=input_path, name="bad",
                          prompt={"template": "{topic}", "system": None}, failure_threshold=0.5,
                          concurrency={"max": 4, "initial": 4})
        outcome, _ = run(spec)  # every prompt is over the endpoint's input limit: 422 for each row
        assert emu.state(NS, "gen").state == "paused"
        pause = [e for e in emu.control_log if e["path"].endswith("/pause")][0]
        assert emu.stats()["endpoints"][f"{NS}/gen"]["last_request_at"] <= pause["t"]
    assert outcome.exit_code == 3
    assert "failure_threshold" in outcome.summary["stop_reason"]
    assert 50 <= len(read_ids(tmp_path / "out" / "bad" / "failed")) < 600  # it stopped early


def test_a_progress_display_that_fails_is_said_once_and_the_job_finishes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def broken_refresh(self):
        raise ValueError("a bug in the progress line")

    monkeypatch.setattr(ProgressReporter, "refresh", broken_refresh)
    with emulator(running_endpoint(latency_base_s=0.01)) as emu:
        spec = _url_job(tmp_path, emu, n=200, concurrency={"max": 2, "initial": 2})
        options = RunOptions(progress="lines", summary_interval_s=0.01, handle_signals=False, echo=lambda _: None)
        with caplog.at_level(logging.WARNING, logger="batchrun.runner"):
            outcome = asyncio.run(run_job(load_spec(spec), options))
    assert outcome.exit_code == 0
    assert len(read_ids(tmp_path / "out" / "job" / "data")) == 200
    said = [r.getMessage() for r in caplog.records if r.name == "batchrun.runner"]
    assert said == ["background_step_failed: the progress display stopped working "
                    "(ValueError: a bug in the progress line); the job goes on"]


def _empty_input(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("topic", pa.string())])
    pq.write_table(pa.table({"id": [], "topic": []}, schema=schema), path)
    return path


def test_an_empty_input_is_refused_unless_the_spec_allows_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    empty = _empty_input(tmp_path / "in" / "empty.parquet")
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=empty)
        with pytest.raises(InputError, match="the input has no rows") as refused:
            run(spec)
        assert refused.value.exit_code == 2
        allowed = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=empty,
                             name="allowed", input={"allow_empty": True})
        outcome, _ = run(allowed)
        assert outcome.exit_code == 0 and data_requests(emu) == 0


def test_a_folder_that_is_not_a_batchrun_output_is_refused_and_left_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = tmp_path / "out" / "job"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    with emulator(running_endpoint()) as emu:
        with pytest.raises(OutputError, match="not a batchrun output") as refused:
            run(_url_job(tmp_path, emu, n=10))
        assert refused.value.exit_code == 2 and data_requests(emu) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_second_run_on_the_same_output_is_refused_at_once_and_a_killed_holder_is_taken_over(tmp_path):
    with emulator(running_endpoint(latency_base_s=0.2)) as emu:
        spec = _url_job(tmp_path, emu, n=400, concurrency={"max": 4, "initial": 4})
        env = {**os.environ, "HF_TOKEN": TOKEN}
        first = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                                 cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: data_requests(emu) >= 8, timeout=60, proc=first, what="the first run sending")
            second = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": TOKEN})
            assert second.returncode == 2, second.stderr
            assert f"pid {first.pid} on host" in second.stderr and "since" in second.stderr
            assert "Traceback" not in second.stderr
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            first.kill()
            first.wait(timeout=30)
        # The same job with more room (concurrency is not part of its identity), so the rest goes quickly.
        spec = _url_job(tmp_path, emu, n=400, concurrency={"max": 64, "initial": 64})
        third = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert third.returncode == 0, third.stderr
        assert f"taking over the output's lock from pid {first.pid}" in third.stderr
    out = tmp_path / "out" / "job"
    assert sorted(read_ids(out / "data")) == [f"row-{i:05d}" for i in range(400)]  # once each


def test_a_server_that_stops_answering_mid_run_stops_the_job_with_its_rows_pending_not_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    emu = emulator(running_endpoint(latency_base_s=0.02))
    emu.__enter__()
    try:
        spec = _url_job(tmp_path, emu, n=400, concurrency={"max": 4, "initial": 4}, outage_timeout="2s")
        requests_before_shutdown = []

        def shut_down_after(n: int) -> None:
            wait_until(lambda: data_requests(emu) >= n, timeout=60, what=f"{n} requests served")
            requests_before_shutdown.append(data_requests(emu))
            emu.__exit__(None, None, None)  # the server is gone: connections are refused from now on

        killer = threading.Thread(target=shut_down_after, args=(40,), daemon=True)
        killer.start()
        outcome, _ = run(spec)
        killer.join(timeout=30)
    finally:
        emu.__exit__(None, None, None)
    assert outcome.exit_code == 3 and "has not answered" in outcome.summary["stop_reason"]
    assert outcome.summary["stop_kind"] == "endpoint"
    rows = outcome.summary["rows"]
    assert rows["failed"] == 0  # no row was written off because the server went away
    assert rows["pending"] > 0 and rows["ok"] + rows["pending"] == 400


def test_a_url_endpoint_serving_another_model_is_refused_on_resume_and_files_name_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(running_endpoint(model_id="org/model-a")) as first_server:
        # Half the rows now (a limit is not part of the job's identity), so that the next run resumes.
        spec = _url_job(tmp_path, first_server, n=20, output={"shard_rows": 5}, input={"limit": 10})
        outcome, _ = run(spec)
        assert outcome.exit_code == 0
    assert outcome.summary["endpoint"]["model"] == "org/model-a"
    shard = sorted((tmp_path / "out" / "job" / "data").glob("*.parquet"))[0]
    provenance = json.loads(pq.read_schema(shard).metadata[b"batchrun"])
    assert provenance["model"] == "org/model-a" and len(provenance["revision"]) == 40
    # The same job later finds another model behind its url: its answers must not join the output.
    with emulator(running_endpoint(model_id="org/model-b")) as second_server:
        spec = _url_job(tmp_path, second_server, n=20, output={"shard_rows": 5})
        with pytest.raises(ConfigMismatchError, match="model") as refused:
            run(spec)
        assert data_requests(second_server) == 0
    assert "org/model-a" in str(refused.value) and "org/model-b" in str(refused.value)


def test_status_shows_a_run_in_progress_a_lowered_limit_and_a_spec_that_no_longer_matches(tmp_path):
    with emulator(running_endpoint(latency_base_s=0.2)) as emu:
        spec = _url_job(tmp_path, emu, n=400, concurrency={"max": 4, "initial": 4}, output={"shard_rows": 10})
        env = {**os.environ, "HF_TOKEN": TOKEN}
        job = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_committed(tmp_path / "out" / "job", 40, job)
            during = cli("status", str(spec))
            assert during.returncode == 0, during.stderr
            assert f"running now: pid {job.pid} on host" in during.stdout
            job.send_signal(signal.SIGINT)
            job.communicate(timeout=60)
        finally:
            job.kill()
            job.wait(timeout=30)
        after = cli("status", str(spec))
        assert "running now" not in after.stdout
        lowered = _url_job(tmp_path, emu, n=400, input={"limit": 20}, output={"shard_rows": 10})
        shown = cli("status", str(lowered)).stdout
        assert "remaining: 0 of 20" in shown and "more rows than the input now gives" in shown
        changed = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                             input_path=tmp_path / "in" / "topics.parquet", prompt={"template": "Now about {topic}."})
    warned = cli("status", str(changed)).stdout
    assert "the spec no longer matches this output" in warned and "prompt" in warned
