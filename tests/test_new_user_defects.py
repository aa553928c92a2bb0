"""What a new user ran into, each fixed at its depth: errors that say what is wrong, and no surprises.

Each test reproduces a defect found by trying batchrun on a fresh clone, and fails without its fix.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobkit import NS, TOKEN, cli, emulator, read_ids, run, running_endpoint, write_spec, write_topics

from batchrun.errors import EndpointUnusableError, OutputError
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_url_is_found_in_preflight_and_costs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    port = _free_port()  # nobody listens here
    spec = write_spec(tmp_path, endpoint={"url": f"http://127.0.0.1:{port}"},
                      input_path=write_topics(tmp_path / "in.parquet", 20))
    with pytest.raises(EndpointUnusableError, match="cannot reach the endpoint") as refused:
        run(spec)
    assert refused.value.exit_code == 2
    assert not (tmp_path / "out" / "job" / "failed").exists()  # no row was written off


def test_a_busy_port_for_the_built_in_emulator_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = write_spec(tmp_path, endpoint={"local": {"port": port}},
                          input_path=write_topics(tmp_path / "in.parquet", 5))
        result = cli("run", str(spec), "--progress", "off")
    assert result.returncode == 2, result.stderr
    assert "already in use" in result.stderr and "Traceback" not in result.stderr
    assert "internal error" not in result.stderr


def test_the_summary_is_shown_when_summary_json_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    from batchrun.output import OutputStore

    def disk_full(self, summary):
        raise OutputError(f"No space left on the disk holding {self.root}: could not write state/summary.json")

    monkeypatch.setattr(OutputStore, "write_summary", disk_full)
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", 10))
        outcome, lines = run(spec)
    assert outcome.exit_code == 3  # the output is complete, but its record is not: run again
    assert any("No space left on the disk holding" in line for line in lines)
    assert any(line.startswith("job job:") for line in lines)  # the summary, on the console all the same
    assert len(read_ids(tmp_path / "out" / "job" / "data")) == 10


def test_a_list_column_as_the_prompt_is_refused_by_validate(tmp_path):
    path = tmp_path / "in.parquet"
    messages = [[{"role": "user", "content": f"hi {i}"}] for i in range(3)]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "messages": messages}), path)
    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=path,
                      prompt={"column": "messages", "template": None, "system": None})
    result = cli("validate", str(spec))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "prompt.column" in result.stderr and "messages" in result.stderr
    assert "[{" not in result.stdout  # nothing was rendered as a Python repr


def test_progress_lines_say_when_a_short_job_starts(tmp_path):
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", 10))
        result = cli("run", str(spec), "--progress", "lines", env={"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert "progress: started on 10 rows" in result.stderr
    assert "finished, every row succeeded" in result.stderr


def test_running_a_local_job_again_meets_other_faults_so_retryable_failures_make_progress(tmp_path):
    local = {"faults": {"rate_500": 0.3}, "latency_base_s": 0.005, "pending_s": 0.01, "initializing_s": 0.01}
    spec = write_spec(tmp_path, endpoint={"local": local}, input_path=write_topics(tmp_path / "in.parquet", 40),
                      retries={"max_attempts": 1, "budget_ratio": 1.0})
    failed_after = []
    for _ in range(3):
        outcome, _ = run(spec)
        failed_after.append(outcome.summary["rows"]["total_failed"])
    # Replaying the same draws would fail the same rows every time; a new seed per run lets them through.
    assert failed_after[0] > 0
    assert failed_after[2] < failed_after[0]
    job = json.loads((tmp_path / "out" / "job" / "state" / "job.json").read_text())
    assert job["runs"] == 3


def test_a_job_on_the_built_in_emulator_reaches_for_nothing_beyond_loopback(tmp_path, monkeypatch):
    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in ("127.0.0.1", "localhost", "::1"):
            looked_up.append(name)
            raise OSError("this test allows loopback only")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    spec = write_spec(tmp_path, endpoint={"local": {"pending_s": 0.01, "initializing_s": 0.01}},
                      input_path=write_topics(tmp_path / "in.parquet", 10))
    outcome = asyncio.run(run_job(load_spec(spec), RunOptions(progress="off", handle_signals=False,
                                                              echo=lambda line: None, poll_interval_s=0.02)))
    assert outcome.exit_code == 0
    assert looked_up == []


def test_emulate_refuses_a_job_spec_as_its_config_in_one_line(tmp_path):
    spec = Path("jobs/quickstart.yaml")
    result = cli("emulate", "--config", str(spec), timeout=60)
    assert result.returncode == 2
    assert "job spec" in result.stderr and "Traceback" not in result.stderr
