"""Exit codes decided mid-run, against the emulator: a token refused after rows were saved stops with 3, not 2."""

from __future__ import annotations

import asyncio
import json
import threading

from jobkit import NS, TOKEN, emulator, read_rows, running_endpoint, wait_for_committed, write_spec, write_topics

from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec

# --------------------------------------------------------------------------- a token refused mid-run


def test_a_token_refused_after_rows_were_saved_stops_with_exit_3_not_2(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    input_path = write_topics(tmp_path / "topics.parquet", 60)
    with emulator(running_endpoint(latency_base_s=0.02)) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          concurrency={"max": 2, "initial": 2}, output={"shard_rows": 5})
        result: dict = {}
        options = RunOptions(progress="off", handle_signals=False, echo=lambda _: None, poll_interval_s=0.02)

        def job() -> None:
            try:
                result["outcome"] = asyncio.run(run_job(load_spec(spec), options))
            except Exception as exc:  # the test reports what was raised
                result["error"] = exc

        thread = threading.Thread(target=job)
        thread.start()
        wait_for_committed(tmp_path / "out" / "job", 10)  # rows saved: requests sent are not yet rows written
        server = emu.call(lambda: emu.emulator.find(NS, "gen"))
        emu.call(lambda: setattr(server, "_expected_auth", "Bearer a-rotated-token"))  # the token is revoked
        thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    outcome = result["outcome"]
    assert outcome.exit_code == 3 and outcome.summary["stop_kind"] == "auth"
    saved = read_rows(tmp_path / "out" / "job" / "data")
    assert 10 <= len(saved) < 60 and outcome.summary["rows"]["ok"] == len(saved)
    assert json.loads((tmp_path / "out" / "job" / "state" / "summary.json").read_text())["exit_code"] == 3
