"""Final failures that were the url's or the server's fault, not the rows': kept pending, or retried on demand.

A route that does not exist stops the job with its rows pending; `batchrun run --retry-failed` sends the final
failures of earlier runs again, and each one's new record replaces its old failure exactly once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from jobkit import NS, TOKEN, data_requests, emulator, read_ids, run, running_endpoint, write_spec, write_topics

from batchrun.cli import main

ALL = [f"row-{i:05d}" for i in range(30)]


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def _job(tmp_path: Path, url: str) -> Path:
    input_path = tmp_path / "in" / "topics.parquet"
    if not input_path.exists():
        write_topics(input_path, len(ALL))
    return write_spec(tmp_path, endpoint={"url": url}, input_path=input_path)


def _records(out: Path) -> tuple[list[str], list[str]]:
    return read_ids(out / "data"), read_ids(out / "failed")


def test_a_wrong_url_path_stops_the_job_with_rows_pending_and_the_fixed_url_finishes_it(tmp_path):
    out = tmp_path / "out" / "job"
    with emulator(running_endpoint(latency_base_s=0.002)) as emu:
        wrong = emu.endpoint_url(NS, "gen").rstrip("/") + "/no/such/route"
        outcome, lines = run(_job(tmp_path, wrong))
        assert outcome.exit_code == 3, lines
        assert "has no such route" in "\n".join(lines)
        assert _records(out) == ([], [])  # no row written off: every one is pending
        outcome, _ = run(_job(tmp_path, emu.endpoint_url(NS, "gen")))
    assert outcome.exit_code == 0
    ok, failed = _records(out)
    assert sorted(ok) == ALL and failed == []


def test_retry_failed_sends_final_failures_again_and_each_row_ends_in_exactly_one_record(tmp_path, capsys):
    out = tmp_path / "out" / "job"
    # A server whose limit refuses every prompt (422, final): the rows fail for good in a plain run.
    with emulator(running_endpoint(max_input_tokens=2, latency_base_s=0.002)) as strict:
        spec = _job(tmp_path, strict.endpoint_url(NS, "gen"))
        outcome, _ = run(spec)
        assert outcome.exit_code == 1
        ok, failed = _records(out)
        assert ok == [] and sorted(failed) == ALL
        _, lines = run(spec)
        assert any("nothing to do" in line for line in lines)  # final: a plain rerun leaves them
    # The server's limit is raised; --retry-failed sends those rows again.
    with emulator(running_endpoint(latency_base_s=0.002)) as fixed:
        spec = _job(tmp_path, fixed.endpoint_url(NS, "gen"))
        assert main(["run", str(spec), "--retry-failed", "--progress", "off"]) == 0
        sent = data_requests(fixed)
    ok, failed = _records(out)
    assert sorted(ok) == ALL and failed == []
    assert not [row for row, n in Counter(ok + failed).items() if n > 1]
    assert sent == len(ALL)  # each failed row sent once more, nothing else
    capsys.readouterr()
    assert main(["status", str(spec)]) == 0
    status = capsys.readouterr().out
    assert f"ok: {len(ALL)} rows" in status and "failed: 0 final, 0 retryable" in status
    assert "remaining: 0 of 30" in status
    # Done: a plain rerun, and another --retry-failed, send nothing (the endpoint is gone: not even asked).
    _, lines = run(spec)
    assert any("nothing to do" in line for line in lines)
    _, lines = run(spec, retry_failed=True)
    assert any("nothing to do" in line for line in lines)
    assert sorted(_records(out)[0]) == ALL and _records(out)[1] == []


def test_retry_failed_keeps_good_rows_and_a_row_that_fails_again_has_one_failure_record(tmp_path):
    out = tmp_path / "out" / "job"
    with emulator(running_endpoint(latency_base_s=0.002)) as emu:
        input_path = write_topics(tmp_path / "in" / "topics.parquet", 30, empty_every=10)  # 3 null topics: final
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path)
        outcome, _ = run(spec)
        assert outcome.exit_code == 1
        ok_before, failed_before = _records(out)
        assert len(ok_before) == 27 and len(failed_before) == 3
        outcome, _ = run(spec, retry_failed=True)
        assert data_requests(emu) == 27  # the good rows were not sent again; the null ones need no request
    assert outcome.exit_code == 1  # they fail again, for the same reason
    ok, failed = _records(out)
    assert sorted(ok) == sorted(ok_before)  # good rows were not paid for again
    assert sorted(failed) == sorted(failed_before)  # one failure record each: the old ones stopped counting
    assert outcome.summary["rows"]["total_failed"] == 3 and outcome.summary["rows"]["total_ok"] == 27
