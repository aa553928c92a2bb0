"""Every way a job can end leaves the endpoint paused, its scaling restored, and nothing sent after the pause.

The exit-path matrix of reliability.md §3. Each job starts a paused endpoint (min 1, max 1, idle
timeout 15 min) with `scale: {min_replica: 2, max_replica: 3}` and a 2-minute idle backstop, so that
"restored" is visible: the emulator must end with (1, 1, 15) and state paused, and its last
data-plane request must be no later than the pause call.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jobkit import (
    NS,
    REPO,
    TOKEN,
    cli,
    data_requests,
    emulator,
    paused_endpoint,
    read_ids,
    run,
    wait_for_control_call,
    wait_for_requests,
    wait_until,
    write_spec,
    write_topics,
)

from batchrun import Result
from batchrun.cost import BudgetGuard
from batchrun.dispatch import Dispatcher
from batchrun.endpoints.saved_settings import endpoint_state_path
from batchrun.errors import BudgetSpentError
from batchrun.output import ParquetSink
from batchrun.sources import ParquetSource

SCALE = {"min_replica": 2, "max_replica": 3}
USER_SCALING = (1, 1, 15)


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path, monkeypatch):
    """The endpoints' saved settings go to this test's folder (subprocesses inherit it), never ~/.cache."""
    monkeypatch.setenv("BATCHRUN_STATE_DIR", str(tmp_path / "batchrun-state"))


def job(tmp_path: Path, emu, n: int = 60, name: str = "job", spec: dict | None = None, **endpoint: Any) -> Path:
    input_path = write_topics(tmp_path / "in" / f"{name}.parquet", n)
    spec_endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 10,
                     "scale": SCALE, "idle_backstop": "2m", **endpoint}
    return write_spec(tmp_path, endpoint=spec_endpoint, input_path=input_path, name=name, **(spec or {}))


def assert_put_back(emu, *, requests_expected: bool = True) -> None:
    """Paused, the user's scaling and idle timeout restored, and no data-plane request after the pause."""
    state = emu.state(NS, "gen")
    assert state.state == "paused"
    assert (state.min_replica, state.max_replica, state.scale_to_zero_timeout) == USER_SCALING
    log = emu.control_log
    pauses = [e for e in log if e["method"] == "POST" and e["path"].endswith("/pause")]
    assert len(pauses) == 1, log
    after = [e for e in log if e["t"] > pauses[0]["t"] and e["method"] == "POST"]
    assert after == []  # no resume or wake-up after the pause
    last_request = emu.stats()["endpoints"][f"{NS}/gen"]["last_request_at"]
    if requests_expected:
        assert last_request is not None
    if last_request is not None:
        assert last_request <= pauses[0]["t"]


# --------------------------------------------------------------------------- in-process exits


def test_success_pauses_the_endpoint_and_restores_its_scaling(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(paused_endpoint()) as emu:
        outcome, _ = run(job(tmp_path, emu))
        assert outcome.exit_code == 0
        assert_put_back(emu)
        assert data_requests(emu) == 60


def test_an_exception_while_reading_pauses_the_endpoint_and_nothing_is_sent_after_the_pause(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    original = ParquetSource.pending_batches

    def failing_batches(self, batch_size=1024, done=None):
        if batch_size <= 3:  # preflight's look at the first rows succeeds
            yield from original(self, batch_size, done)
            return
        skipped, first = next(iter(original(self, batch_size, done)))
        yield skipped, first[:25]
        raise OSError("the input disk went away")

    monkeypatch.setattr(ParquetSource, "pending_batches", failing_batches)
    with emulator(paused_endpoint(latency_base_s=0.01)) as emu:
        outcome, _ = run(job(tmp_path, emu, n=100))
        assert outcome.exit_code == 3  # stopped early: the rows read so far are kept, a rerun resumes
        assert "the input disk went away" in outcome.summary["stop_reason"]
        assert_put_back(emu)


def test_an_exception_while_writing_pauses_the_endpoint_and_nothing_is_sent_after_the_pause(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    original = ParquetSink._publish
    published = [0]

    def failing_publish(self, *args, **kwargs):
        # The disk fills up after the first shard; the sink turns the OSError into an OutputError.
        published[0] += 1
        if published[0] > 1:
            raise OSError(28, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ParquetSink, "_publish", failing_publish)
    with emulator(paused_endpoint(latency_base_s=0.02)) as emu:
        outcome, _ = run(job(tmp_path, emu, n=400, spec={"concurrency": {"max": 4, "initial": 4}}))
        assert outcome.exit_code == 3
        assert "No space left" in outcome.summary["stop_reason"]
        assert_put_back(emu)
        assert data_requests(emu) < 400  # it stopped early


def test_an_exception_while_sending_pauses_the_endpoint_and_nothing_is_sent_after_the_pause(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    original = Dispatcher._send
    sent = [0]

    async def failing_send(self, *args, **kwargs):
        sent[0] += 1
        if sent[0] > 15:
            raise RuntimeError("a bug in the request path")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Dispatcher, "_send", failing_send)
    with emulator(paused_endpoint(latency_base_s=0.01)) as emu:
        with pytest.raises(RuntimeError, match="a bug in the request path"):
            run(job(tmp_path, emu, n=200, spec={"concurrency": {"max": 4, "initial": 4}}))
        assert_put_back(emu)


def test_a_failure_during_the_wait_pauses_the_endpoint_and_exits_3(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(paused_endpoint(fail_on_deploy=True)) as emu:
        outcome, _ = run(job(tmp_path, emu))
        assert outcome.exit_code == 3
        assert "failed" in outcome.summary["stop_reason"]
        assert_put_back(emu, requests_expected=False)
        assert data_requests(emu) == 0


def test_a_ready_timeout_pauses_the_endpoint_and_exits_3(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(paused_endpoint(initializing_s=30)) as emu:
        started = time.monotonic()
        outcome, _ = run(job(tmp_path, emu, ready_timeout=0.5))
        # A generous limit, not a speed claim: the start takes 30 s, so this is the ready timeout at work.
        assert time.monotonic() - started < 20
        assert outcome.exit_code == 3 and "not ready after" in outcome.summary["stop_reason"]
        assert_put_back(emu, requests_expected=False)


def test_a_budget_stop_pauses_the_endpoint_and_exits_3(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # 2 replicas at $36/h cost $0.02/s; the guard stops a margin (request_timeout + 2 s) before $0.17,
    # so about 1.5 s into the job, long before 2,000 rows at ~200 rows/s are done.
    with emulator(paused_endpoint(latency_base_s=0.02)) as emu:
        started = time.monotonic()
        outcome, _ = run(job(tmp_path, emu, n=2000, price_per_replica_hour=36,
                             spec={"budget": {"max_usd": 0.17}, "concurrency": {"max": 4, "initial": 4}}))
        elapsed = time.monotonic() - started
        assert outcome.exit_code == 3 and "budget" in outcome.summary["stop_reason"]
        assert elapsed < 60  # a limit against a hang, not a speed claim
        assert 0 < len(read_ids(tmp_path / "out" / "job" / "data")) < 2000
        assert_put_back(emu)


def test_the_budget_is_per_job_so_a_second_run_is_refused_before_anything_is_touched(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with emulator(paused_endpoint(latency_base_s=0.02)) as emu:
        spec = job(tmp_path, emu, n=2000, price_per_replica_hour=36,
                   spec={"budget": {"max_usd": 0.17}, "concurrency": {"max": 4, "initial": 4}})
        first, _ = run(spec)
        assert first.exit_code == 3 and first.summary["stop_kind"] == "budget"
        spent = json.loads((tmp_path / "out" / "job" / "state" / "spend.json").read_text())
        assert 0.17 * 0.9 <= spent["usd"] < 0.17 and spent["runs"] == 1
        calls, requests = len(emu.control_log), data_requests(emu)
        with pytest.raises(BudgetSpentError, match=r"already spent \$0\.1"):
            run(spec)
        assert len(emu.control_log) == calls and data_requests(emu) == requests  # a refusal costs nothing


def test_a_budget_guard_that_fails_stops_sending_and_pauses_the_endpoint(tmp_path, monkeypatch):
    # The guard watches money: a guard that crashes must not leave the job sending unwatched.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    original, checks = BudgetGuard.check, [0]

    def failing_check(self, meter):
        checks[0] += 1
        if checks[0] > 2:  # once requests are on their way
            raise ZeroDivisionError("a bug in the budget check")
        return original(self, meter)

    monkeypatch.setattr(BudgetGuard, "check", failing_check)
    with emulator(paused_endpoint(latency_base_s=0.02)) as emu:
        outcome, lines = run(job(tmp_path, emu, n=2000, price_per_replica_hour=36,
                                 spec={"budget": {"max_usd": 100}, "concurrency": {"max": 4, "initial": 4}}))
        assert outcome.exit_code == 3
        assert outcome.summary["stop_reason"] == ("the budget and deadline guard failed, so sending stops: "
                                                  "ZeroDivisionError: a bug in the budget check")
        assert_put_back(emu)
        assert data_requests(emu) < 2000
    assert any("the budget and deadline guard failed" in line for line in lines)


def test_a_small_budget_keeps_only_a_tenth_of_it_as_the_stop_margin(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # $0.02/s with a 7 s margin (request_timeout + 2 s) would keep $0.14 back: more than the whole $0.05
    # budget, and the job would stop at once. The margin is capped at a tenth of the budget instead.
    with emulator(paused_endpoint(latency_base_s=0.02)) as emu:
        outcome, lines = run(job(tmp_path, emu, n=4000, price_per_replica_hour=36,
                                 spec={"budget": {"max_usd": 0.05}, "concurrency": {"max": 4, "initial": 4}}))
    assert outcome.exit_code == 3 and outcome.summary["stop_kind"] == "budget"
    assert 0.045 <= outcome.summary["cost"]["usd"] < 0.05 + 0.01
    assert any("stops with $0.0050 left" in line for line in lines)


def test_a_typo_in_the_lifecycle_keys_costs_nothing(tmp_path):
    with emulator(paused_endpoint()) as emu:
        spec = job(tmp_path, emu, on_finsh="pause")
        result = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert result.returncode == 2
        assert "endpoint.on_finsh" in result.stderr and "on_finish" in result.stderr
        bad_value = job(tmp_path, emu, name="bad", on_finish="pasue")
        result = cli("run", str(bad_value), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert result.returncode == 2 and "endpoint.on_finish" in result.stderr
        bad_scale = job(tmp_path, emu, name="scale", scale={"min_replica": 4, "max_replica": 2})
        result = cli("run", str(bad_scale), "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert result.returncode == 2 and "endpoint.scale.min_replica" in result.stderr
        assert [e for e in emu.control_log if e["method"] != "GET"] == []
        assert emu.control_log == []
        assert data_requests(emu) == 0


# --------------------------------------------------------------------------- real signals to a real process


def _start(spec: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_TOKEN": TOKEN}
    return subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_signal_pauses_the_endpoint_and_nothing_is_sent_after_the_pause(tmp_path, signame):
    with emulator(paused_endpoint(latency_base_s=0.05)) as emu:
        spec = job(tmp_path, emu, n=400, spec={"concurrency": {"max": 4, "initial": 4}})
        proc = _start(spec)
        try:
            wait_for_requests(emu, 20, proc)
            proc.send_signal(getattr(signal, signame))
            _, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
        assert proc.returncode == 3, stderr
        assert f"interrupted by {signame}" in stderr
        assert_put_back(emu)
        assert data_requests(emu) < 400


def test_sigterm_during_the_wait_pauses_the_endpoint_at_once(tmp_path):
    with emulator(paused_endpoint(initializing_s=30)) as emu:
        spec = job(tmp_path, emu, ready_timeout=60)
        proc = _start(spec)
        try:
            # In the wait: the resume was sent and the job has polled the endpoint's state after it.
            resumed = wait_for_control_call(emu, "POST", "/resume", proc)
            wait_until(lambda: any(e["method"] == "GET" and e["t"] > resumed["t"] for e in emu.control_log),
                       proc=proc, what="a state poll after the resume")
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
            stopped_in = time.monotonic() - sent_at
        finally:
            proc.kill()
        assert proc.returncode == 3, stderr
        # A generous limit, not a speed claim: the endpoint takes 30 s to start, and a job that waited for
        # it (or for the grace period) would take longer than this.
        assert stopped_in < 20
        assert_put_back(emu, requests_expected=False)


def test_sigkill_leaves_the_backstop_set_and_the_endpoint_command_pauses_it(tmp_path):
    with emulator(paused_endpoint(latency_base_s=0.05)) as emu:
        spec = job(tmp_path, emu, n=400, spec={"concurrency": {"max": 4, "initial": 4}})
        proc = _start(spec)
        try:
            wait_for_requests(emu, 20, proc)
            # What the control plane says while the job runs: the backstop is in place, server side.
            status = cli("endpoint", "status", "gen", "--namespace", NS, "--api-url", emu.api_url,
                         env={"HF_TOKEN": TOKEN})
            assert "scale-to-zero timeout: 2 min" in status.stdout, status.stdout + status.stderr
            from huggingface_hub import HfApi, constants

            previous, constants.INFERENCE_ENDPOINTS_ENDPOINT = constants.INFERENCE_ENDPOINTS_ENDPOINT, emu.api_url
            try:
                raw = HfApi().get_inference_endpoint("gen", namespace=NS, token=TOKEN).raw
            finally:
                constants.INFERENCE_ENDPOINTS_ENDPOINT = previous
            assert raw["compute"]["scaling"]["scaleToZeroTimeout"] == 2
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        finally:
            proc.kill()
        assert proc.returncode == -signal.SIGKILL
        # What SIGKILL leaves behind: a running endpoint with the job's settings and the backstop.
        state = emu.state(NS, "gen")
        assert state.state in ("running", "updating")
        assert (state.min_replica, state.max_replica, state.scale_to_zero_timeout) == (2, 3, 2)
        assert not any(e["path"].endswith("/pause") for e in emu.control_log)
        # The morning after: one command stops the bill.
        paused = cli("endpoint", "pause", "gen", "--namespace", NS, "--api-url", emu.api_url, env={"HF_TOKEN": TOKEN})
        assert paused.returncode == 0, paused.stderr
        assert emu.state(NS, "gen").state == "paused"


@pytest.mark.parametrize("rerun", ["same", "fresh", "other-output"])
def test_the_run_after_a_sigkill_restores_the_users_settings_not_the_killed_runs(tmp_path, rerun):
    # The user's settings are kept per endpoint in batchrun's state folder, not in the output folder, so
    # they survive `--fresh` (which moves the output aside) and a run into another output folder.
    with emulator(paused_endpoint(latency_base_s=0.05)) as emu:
        spec = job(tmp_path, emu, n=150, spec={"concurrency": {"max": 4, "initial": 4}})
        proc = _start(spec)
        try:
            wait_for_requests(emu, 20, proc)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=10)
        finally:
            proc.kill()
        state = emu.state(NS, "gen")
        assert (state.min_replica, state.max_replica, state.scale_to_zero_timeout) == (2, 3, 2)  # the job's
        saved = endpoint_state_path(emu.api_url, NS, "gen")
        assert saved.parent.parent == tmp_path / "batchrun-state" and saved.exists()
        # The job again: it finds the endpoint running with the killed run's settings, finishes the rows,
        # and puts back what the user had before the killed run, then pauses (the killed run brought it up).
        args, output = [str(spec)], "job"
        if rerun == "fresh":
            args.append("--fresh")
        elif rerun == "other-output":
            spec, output = job(tmp_path, emu, n=150, name="other"), "other"
            args = [str(spec)]
        finished = cli("run", *args, "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert finished.returncode == 0, finished.stderr
        assert "an earlier run left" in finished.stderr
        assert_put_back(emu)
        assert not saved.exists()
        assert list(saved.parent.iterdir()) == []
    assert len(read_ids(tmp_path / "out" / output / "data")) == 150


# --------------------------------------------------------------------------- signals to a script using the Python API

_SCRIPT = """\
import asyncio
import sys

import batchrun

spec, how = sys.argv[1], sys.argv[2]
result = batchrun.run(spec, progress=False) if how == "run" else asyncio.run(batchrun.arun(spec, progress=False))
print("returned", result.exit_code)
"""


@pytest.mark.parametrize(("how", "signame"), [("run", "SIGTERM"), ("run", "SIGHUP"), ("arun", "SIGTERM")])
def test_a_signal_to_a_script_of_the_python_api_pauses_the_endpoint_and_the_output_resumes(
    tmp_path, monkeypatch, how, signame
):
    # A script calling batchrun.run has no handler of its own: the job stops as `batchrun run` does, the
    # endpoint is paused, then the signal is delivered again and ends the script as it would have.
    script, out, log = tmp_path / "script.py", tmp_path / "script.out", tmp_path / "script.err"
    script.write_text(_SCRIPT)
    with emulator(paused_endpoint(latency_base_s=0.05)) as emu:
        spec = job(tmp_path, emu, n=120, spec={"concurrency": {"max": 4, "initial": 4}})
        with open(out, "w") as stdout, open(log, "w") as stderr:
            proc = subprocess.Popen([sys.executable, str(script), str(spec), how], cwd=REPO,
                                    env={**os.environ, "HF_TOKEN": TOKEN}, stdout=stdout, stderr=stderr)
        monkeypatch.setenv("HF_TOKEN", TOKEN)  # for the rerun, in this process
        try:
            wait_for_requests(emu, 20, proc)
            proc.send_signal(getattr(signal, signame))
            proc.wait(timeout=60)
        finally:
            proc.kill()
        printed = out.read_text()
        assert proc.returncode == -getattr(signal, signame), log.read_text()
        assert f"interrupted by {signame}" in printed and "returned" not in printed
        assert_put_back(emu)
        sent = data_requests(emu)
        assert sent < 120
        assert Result.from_output(tmp_path / "out" / "job").exit_code == 3
        # Resumable: the rerun sends only the rows left, and every row ends in one place.
        outcome, _ = run(spec)
        assert outcome.exit_code == 0
        assert data_requests(emu) - sent <= 120 - outcome.summary["rows"]["skipped"]
    ids = read_ids(tmp_path / "out" / "job" / "data")
    assert sorted(ids) == [f"row-{i:05d}" for i in range(120)]
