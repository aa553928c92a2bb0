"""The circuit breaker against a server that goes down: an outage costs a few requests, not one per row."""

from __future__ import annotations

from jobkit import NS, TOKEN, emulator, run, running_endpoint, write_spec, write_topics


def test_an_outage_costs_a_few_requests_not_one_failed_attempt_per_row(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    outage = [{"kind": "outage_503", "after_requests": 50, "seconds": 2.0}]
    with emulator(running_endpoint(latency_base_s=0.03, episodes=outage)) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", 300),
                          retries={"max_attempts": 2, "backoff_base": 0.5, "backoff_cap": 5, "budget_ratio": 0.1})
        outcome, _ = run(spec)
    counts = outcome.summary["status_counts"]
    assert outcome.exit_code == 0, outcome.summary  # no row used up its 2 attempts on the outage
    assert outcome.summary["rows"]["ok"] == 300
    # Without the breaker every row sent during the outage fails once (about 250 of them); with it,
    # only the requests already on the wire when it opened, and one probe at a time.
    assert 0 < counts.get("503", 0) < 80, counts
