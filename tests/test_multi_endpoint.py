"""Whole jobs across several endpoints (`endpoint:` as a list), on emulated endpoints of one emulator.

Each test reads what the emulator saw (requests per endpoint, control-plane calls, states) and what the
job wrote (ids, the summary's per-endpoint shares).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import pytest
from jobkit import (
    NS,
    REPO,
    STATE_CHANGING,
    TOKEN,
    data_requests,
    emulator,
    paused_endpoint,
    read_ids,
    run,
    running_endpoint,
    wait_for_requests,
    wait_until,
    write_spec,
    write_topics,
)

from batchrun.errors import EndpointUnusableError, SpecError
from batchrun.spec import load_spec


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path, monkeypatch):
    """The endpoints' saved settings go to this test's folder, never to ~/.cache/batchrun."""
    monkeypatch.setenv("BATCHRUN_STATE_DIR", str(tmp_path / "batchrun-state"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def multi_job(tmp_path: Path, emu, names: list[str], *, n: int = 120, name: str = "job", **overrides: Any) -> Path:
    input_path = write_topics(tmp_path / "in" / f"{name}.parquet", n)
    items = [{"name": each, "namespace": NS, "api_url": emu.api_url, "ready_timeout": 20,
              "price_per_replica_hour": 1.0} for each in names]
    return write_spec(tmp_path, endpoint=items, input_path=input_path, name=name, **overrides)


def changes_to(emu, name: str) -> list[str]:
    """The state-changing control calls on one endpoint, by their last path segment."""
    return [e["path"].rsplit("/", 1)[-1] for e in emu.control_log
            if e["method"] in STATE_CHANGING and f"/{NS}/{name}" in e["path"]]


def shares(outcome) -> dict[str, dict[str, Any]]:
    return {share["name"]: share for share in outcome.summary["endpoint"]["endpoints"]}


def test_a_list_of_endpoints_is_parsed_with_job_level_defaults_and_a_single_mapping_keeps_its_identity(tmp_path):
    input_path = write_topics(tmp_path / "in.parquet", 3)
    one = load_spec(write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9/"}, input_path=input_path, name="one"))
    assert one.endpoints == () and one.all_endpoints == (one.endpoint,)
    assert one.identity()["endpoint"] == {"kind": "url"}  # what single-endpoint outputs always had
    spec = load_spec(write_spec(
        tmp_path, name="two", input_path=input_path,
        endpoint=[{"name": "a", "namespace": NS}, {"name": "b", "namespace": NS, "on_finish": "keep"}],
        endpoint_defaults={"on_finish": "scale-to-zero", "price_per_replica_hour": 2.5},
    ))
    assert [e.label for e in spec.endpoints] == ["a", "b"]
    assert [e.on_finish for e in spec.endpoints] == ["scale-to-zero", "keep"]  # an item's own key wins
    assert [e.price_per_replica_hour for e in spec.endpoints] == [2.5, 2.5]
    assert spec.identity()["endpoint"] == [{"namespace": NS, "name": "a"}, {"namespace": NS, "name": "b"}]


def test_the_faster_endpoint_gets_the_larger_share_every_row_once_both_paused_and_cost_summed(tmp_path):
    fast = paused_endpoint("fast", latency_base_s=0.005, max_concurrent_requests=16)
    slow = paused_endpoint("slow", latency_base_s=0.06, max_concurrent_requests=4)
    with emulator(fast, slow) as emu:
        outcome, lines = run(multi_job(tmp_path, emu, ["fast", "slow"], n=240, retries={"max_attempts": 10}))
        requests = {name: data_requests(emu, name) for name in ("fast", "slow")}
        states = {name: emu.state(NS, name).state for name in ("fast", "slow")}
    assert outcome.exit_code == 0
    ids = read_ids(tmp_path / "out" / "job" / "data")
    assert len(ids) == 240 and not [i for i, c in Counter(ids).items() if c > 1]
    share = shares(outcome)
    assert share["fast"]["rows_ok"] + share["slow"]["rows_ok"] == 240
    assert share["fast"]["rows_ok"] > share["slow"]["rows_ok"] > 0  # both used, the faster more
    # Each row records the endpoint that answered it, and the column is a datasets feature of the output.
    answered = Counter(read_ids(tmp_path / "out" / "job" / "data", column="endpoint"))
    assert answered == {"fast": share["fast"]["rows_ok"], "slow": share["slow"]["rows_ok"]}
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "job" / "data" / "*.parquet"),
                                   split="train")
    assert loaded.features["endpoint"] == datasets.Value("string")
    assert requests["fast"] > requests["slow"]
    assert states == {"fast": "paused", "slow": "paused"}
    # Each endpoint's own limit found its own capacity: the slow one never held the fast one's concurrency.
    assert share["slow"]["latency_mean_s"] > share["fast"]["latency_mean_s"]
    cost = outcome.summary["cost"]
    assert cost["usd"] == pytest.approx(share["fast"]["usd"] + share["slow"]["usd"])
    assert "  fast: " in "\n".join(lines)  # the summary shows each one's share


def test_each_endpoints_hidden_capacity_is_found_on_its_own_and_rows_follow_it(tmp_path):
    # The same speed, capacities of 12 and 3 (an instant 429 past them), the job told neither. Each
    # endpoint's own limit finds its capacity, and rows go where there is room: about 4 to 1.
    big = paused_endpoint("big", latency_base_s=0.04, max_concurrent_requests=12)
    small = paused_endpoint("small", latency_base_s=0.04, max_concurrent_requests=3)
    with emulator(big, small) as emu:
        outcome, _ = run(multi_job(tmp_path, emu, ["big", "small"], n=300, retries={"max_attempts": 10},
                                   concurrency={"max": 64, "initial": 8}))
    assert outcome.exit_code == 0
    share = shares(outcome)
    assert share["big"]["rows_ok"] + share["small"]["rows_ok"] == 300
    assert share["big"]["rows_ok"] > 2 * share["small"]["rows_ok"] > 0
    # Held near its own capacity, the small endpoint refused few requests: its limit was not the big one's.
    assert share["small"]["http_429"] < share["small"]["rows_ok"]


def test_an_endpoint_failing_mid_run_is_drained_its_rows_finish_on_the_other_and_it_is_released(tmp_path):
    steady = paused_endpoint("steady", latency_base_s=0.01)
    failing = paused_endpoint("failing", latency_base_s=0.01,
                     episodes=[{"kind": "fail_endpoint", "after_requests": 15}])
    with emulator(steady, failing) as emu:
        outcome, lines = run(multi_job(tmp_path, emu, ["steady", "failing"], n=200))
        pauses = {name: changes_to(emu, name) for name in ("steady", "failing")}
        paused_at = [e["t"] for e in emu.control_log
                     if e["method"] == "POST" and e["path"].endswith(f"/{NS}/failing/pause")]
        last_sent = emu.stats()["endpoints"][f"{NS}/failing"]["last_request_at"]
    assert outcome.exit_code == 0, lines
    assert paused_at and last_sent <= paused_at[0]  # nothing sent to the drained endpoint after its pause
    ids = read_ids(tmp_path / "out" / "job" / "data")
    assert sorted(ids) == sorted(f"row-{i:05d}" for i in range(200))  # every row once, none lost
    share = shares(outcome)
    assert "drained" in share["failing"] and "drained" not in share["steady"]
    assert share["steady"]["rows_ok"] > share["failing"]["rows_ok"]
    assert "resume" in pauses["failing"] and "pause" in pauses["failing"]  # released all the same
    assert pauses["steady"][-2:] == ["pause", "update"] or "pause" in pauses["steady"]
    assert any("failing is drained" in line for line in lines)


def test_a_slow_cold_start_holds_nobody_back_and_the_slow_endpoint_joins_when_ready(tmp_path):
    quick = paused_endpoint("quick", latency_base_s=0.05)
    late = paused_endpoint("late", latency_base_s=0.05, initializing_s=0.5)
    with emulator(quick, late) as emu:
        outcome, lines = run(multi_job(tmp_path, emu, ["quick", "late"], n=300, concurrency={"max": 8, "initial": 4},
                                       retries={"max_attempts": 8}))
        stats = emu.stats()["endpoints"]
        late_resumed = next(e["t"] for e in emu.control_log if e["path"].endswith(f"{NS}/late/resume"))
    assert outcome.exit_code == 0
    share = shares(outcome)
    # The quick endpoint was sending before the late one had finished starting, and the late one joined.
    assert stats[f"{NS}/quick"]["first_request_at"] < late_resumed + share["late"]["ready_wait_s"]
    assert stats[f"{NS}/quick"]["first_request_at"] < stats[f"{NS}/late"]["first_request_at"]
    assert share["late"]["rows_ok"] > 0
    assert any("late is ready and joins the job" in line for line in lines)
    assert len(read_ids(tmp_path / "out" / "job" / "data")) == 300


def test_endpoints_serving_different_models_are_refused_before_anything_is_resumed(tmp_path):
    with emulator(paused_endpoint("a"), paused_endpoint("b", model_id="meta-llama/Llama-3.1-8B-Instruct")) as emu:
        with pytest.raises(EndpointUnusableError) as refused:
            run(multi_job(tmp_path, emu, ["a", "b"], n=10))
        untouched = [e for e in emu.control_log if e["method"] in STATE_CHANGING]
        requests = data_requests(emu, "a") + data_requests(emu, "b")
    assert "different models" in str(refused.value) and "mixed_models: true" in str(refused.value)
    assert untouched == [] and requests == 0


def test_mixed_models_true_lets_endpoints_serving_different_models_share_a_job(tmp_path):
    with emulator(paused_endpoint("a"), paused_endpoint("b", model_id="meta-llama/Llama-3.1-8B-Instruct")) as emu:
        outcome, _ = run(multi_job(tmp_path, emu, ["a", "b"], n=30, mixed_models=True))
        states = {name: emu.state(NS, name).state for name in ("a", "b")}
    assert outcome.exit_code == 0
    assert states == {"a": "paused", "b": "paused"}


def test_a_typo_costs_nothing_on_any_endpoint(tmp_path):
    with emulator(paused_endpoint("a"), paused_endpoint("b")) as emu:
        spec = multi_job(tmp_path, emu, ["a", "b"], n=10, prompt={"template": "Write about {topik}."})
        with pytest.raises(Exception, match="topik"):
            run(spec)
        assert [e for e in emu.control_log if e["method"] in STATE_CHANGING] == []


def test_an_endpoint_that_cannot_start_is_left_out_and_the_job_runs_on_the_others(tmp_path):
    with emulator(paused_endpoint("good", latency_base_s=0.005), paused_endpoint("broken", fail_on_deploy=True)) as emu:
        outcome, lines = run(multi_job(tmp_path, emu, ["good", "broken"], n=60))
        states = {name: emu.state(NS, name).state for name in ("good", "broken")}
    assert outcome.exit_code == 0
    assert len(read_ids(tmp_path / "out" / "job" / "data")) == 60
    assert shares(outcome)["broken"]["rows_ok"] == 0 and shares(outcome)["broken"].get("not_used")
    assert states["good"] == "paused" and states["broken"] in ("paused", "failed")


def test_when_every_endpoint_fails_the_job_stops_with_exit_3_and_both_are_released(tmp_path):
    episodes = [{"kind": "fail_endpoint", "after_requests": 10}]
    with emulator(paused_endpoint("a", latency_base_s=0.01, episodes=episodes),
                  paused_endpoint("b", latency_base_s=0.01, episodes=episodes)) as emu:
        outcome, _ = run(multi_job(tmp_path, emu, ["a", "b"], n=400))
        calls = {name: changes_to(emu, name) for name in ("a", "b")}
    assert outcome.exit_code == 3
    assert all("pause" in made for made in calls.values())


def test_sigterm_pauses_every_endpoint(tmp_path):
    with emulator(paused_endpoint("a", latency_base_s=0.05), paused_endpoint("b", latency_base_s=0.05)) as emu:
        spec = multi_job(tmp_path, emu, ["a", "b"], n=2000)
        env = {**os.environ, "HF_TOKEN": TOKEN, "BATCHRUN_STATE_DIR": str(tmp_path / "batchrun-state")}
        proc = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_requests(emu, 5, proc, name="a")
            wait_for_requests(emu, 5, proc, name="b")
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        states = {name: emu.state(NS, name).state for name in ("a", "b")}
        stats = emu.stats()["endpoints"]
        pause_at = {name: next(e["t"] for e in emu.control_log if e["path"].endswith(f"{NS}/{name}/pause"))
                    for name in ("a", "b")}
    assert proc.returncode == 3
    assert states == {"a": "paused", "b": "paused"}
    for name in ("a", "b"):  # nothing was sent to an endpoint after its pause
        assert stats[f"{NS}/{name}"]["last_request_at"] <= pause_at[name]
    assert 0 < len(read_ids(tmp_path / "out" / "job" / "data")) < 2000


def test_progress_lines_show_each_endpoints_rows_beside_the_summed_figures(tmp_path):
    # A long job: the test reads its progress lines until both endpoints have answered rows in one of
    # them, then stops it.
    with emulator(paused_endpoint("a", latency_base_s=0.05), paused_endpoint("b", latency_base_s=0.05)) as emu:
        spec = multi_job(tmp_path, emu, ["a", "b"], n=4000)
        env = {**os.environ, "HF_TOKEN": TOKEN, "BATCHRUN_STATE_DIR": str(tmp_path / "batchrun-state")}
        log = tmp_path / "stderr.log"
        with log.open("w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "lines",
                                     "--summary-every", "0.1"],
                                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            def both_answered() -> tuple[str, dict[str, int]] | None:
                for line in log.read_text(errors="replace").splitlines():
                    summed, *parts = line.split(" | ")
                    rows = {}
                    for part in parts:
                        found = re.fullmatch(r"(\w+): (\d+) rows \d+% inflight \d+/\d+( 429s \d+)?", part)
                        if found:
                            rows[found[1]] = int(found[2])
                    if summed.startswith("progress: ") and rows.keys() == {"a", "b"} and all(rows.values()):
                        return summed, rows
                return None

            summed, rows = wait_until(both_answered, proc=proc, log=log, timeout=120,
                                      what="a progress line where both endpoints have answered rows")
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    done = re.match(r"progress: (\d+)/4000 rows, ", summed)
    failed = re.search(r", failed (\d+)(,|$)", summed)
    assert done and failed, summed
    assert rows["a"] + rows["b"] == int(done[1]) - int(failed[1])  # the endpoints' rows add up to the rows answered


def test_two_urls_on_one_host_and_port_get_distinct_labels_the_shortest_that_tells_them_apart(tmp_path):
    # Two url endpoints behind one host and port, told apart only by their paths, and no label given.
    input_path = write_topics(tmp_path / "in.parquet", 3)
    spec = load_spec(write_spec(tmp_path, input_path=input_path, endpoint=[
        {"url": "http://10.0.0.1:8080/models/a/"}, {"url": "http://10.0.0.1:8080/models/b"},
        {"url": "https://10.0.0.2/v1"}, {"url": "http://10.0.0.1:8080/models/a?x=1"}]))
    assert [e.label for e in spec.endpoints] == [
        "10.0.0.1:8080/models/a", "10.0.0.1:8080/models/b", "10.0.0.2:443", "10.0.0.1:8080/models/a?x=1"]


def test_labels_given_by_the_spec_are_kept_and_the_same_url_twice_is_still_refused(tmp_path):
    input_path = write_topics(tmp_path / "in.parquet", 3)
    spec = load_spec(write_spec(tmp_path, name="given", input_path=input_path, endpoint=[
        {"url": "http://10.0.0.1:8080/a"}, {"url": "http://10.0.0.1:8080/b", "label": "bee"},
        {"url": "http://10.0.0.2:8080/a"}]))
    assert [e.label for e in spec.endpoints] == ["10.0.0.1:8080", "bee", "10.0.0.2:8080"]
    with pytest.raises(SpecError, match="names two endpoints"):
        load_spec(write_spec(tmp_path, name="twice", input_path=input_path,
                             endpoint=[{"url": "http://10.0.0.1:8080/a"}, {"url": "http://10.0.0.1:8080/a/"}]))


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_endpoint_down_at_the_start_is_left_out_and_the_job_runs_on_those_that_answer(tmp_path):
    down = f"http://127.0.0.1:{_unused_port()}"  # nobody listens here
    input_path = write_topics(tmp_path / "in" / "job.parquet", 40)
    with emulator(running_endpoint("up", latency_base_s=0.005)) as emu:
        spec = write_spec(tmp_path, input_path=input_path,
                          endpoint=[{"url": down, "label": "down"}, {"url": emu.endpoint_url(NS, "up"), "label": "up"}])
        outcome, lines = run(spec)
    assert outcome.exit_code == 0
    assert sorted(read_ids(tmp_path / "out" / "job" / "data")) == [f"row-{i:05d}" for i in range(40)]
    said = "\n".join(lines)
    assert "down is left out" in said and "cannot reach" in said
    assert shares(outcome)["up"]["rows_ok"] == 40 and shares(outcome)["down"]["rows_ok"] == 0


def test_when_no_endpoint_answers_at_the_start_nothing_runs_and_the_exit_is_2(tmp_path):
    input_path = write_topics(tmp_path / "in" / "job.parquet", 5)
    spec = write_spec(tmp_path, input_path=input_path, endpoint=[
        {"url": f"http://127.0.0.1:{_unused_port()}", "label": "a"},
        {"url": f"http://127.0.0.1:{_unused_port()}", "label": "b"}])
    with pytest.raises(EndpointUnusableError, match="cannot reach") as refused:
        run(spec)
    assert refused.value.exit_code == 2
    assert not (tmp_path / "out" / "job" / "failed").exists()
