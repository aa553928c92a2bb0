"""A job whose output is on a GCS emulator (fake-gcs-server, on loopback): SIGKILLed once it has committed
parts, then run again: the rerun takes the dead run's lease over with a generation precondition, and the
union holds every id once. The proof is the server's own listing, read through the JSON API (tests/gcskit.py)."""

from __future__ import annotations

import io
import json
import signal
from collections import Counter

import pyarrow.parquet as pq
import pytest
from gcskit import GCSServer, committed, committed_rows
from jobkit import NS, TOKEN, cli, emulator, reaped, running_endpoint, start_run, wait_until, write_spec, write_topics

ROWS = 120


@pytest.fixture(scope="module")
def gcs():
    server = GCSServer.start()
    yield server
    server.stop()


def test_sigkill_on_gcs_then_a_rerun_loses_and_duplicates_nothing(tmp_path, gcs):
    url = gcs.bucket("jobs/kill")
    env = {**gcs.environ(), "BATCHRUN_CACHE_DIR": str(tmp_path / "cache"), "BATCHRUN_STATE_DIR": str(tmp_path / "st")}
    with emulator(running_endpoint(latency_base_s=0.03, latency_jitter_s=0.01)) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, name="gcs",
                          input_path=write_topics(tmp_path / "in.parquet", ROWS),
                          concurrency={"max": 2, "initial": 2}, output={"path": url, "shard_rows": 10})
        log = tmp_path / "killed.stderr"
        with reaped(start_run(spec, log=log, env=env)) as proc:
            wait_until(lambda: committed_rows(gcs, url) >= 20, proc=proc, log=log, interval=0.05,
                       what="parts committed to the GCS emulator")
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        before = committed_rows(gcs, url)
        assert 0 < before < ROWS and gcs.keys(url, "state/lease.json")  # killed mid-job, its lease left behind
        conditions = len(gcs.bridge.conditions)
        finished = cli("run", str(spec), "--progress", "off", env={**env, "HF_TOKEN": TOKEN})
        assert finished.returncode == 0, finished.stderr
        # The rerun took the lease over and wrote its records with conditions that the server checked: a
        # generation (replace-if-unchanged) and 0 (create-if-absent).
        sent = gcs.bridge.conditions[conditions:]
        assert "0" in sent and any(condition != "0" for condition in sent), sent

    parts = committed(gcs, url)
    data = sorted(f for f, r in parts.items() if r["kind"] == "data")
    ids = [i for f in data for i in pq.read_table(io.BytesIO(gcs.read(url, f))).column("id").to_pylist()]
    assert [i for i, n in Counter(ids).items() if n > 1] == []  # nothing twice
    assert sorted(ids) == sorted(f"row-{i:05d}" for i in range(ROWS))  # nothing lost
    assert gcs.keys(url, "data/") == data  # no orphan part left

    reader = {**gcs.environ(), "BATCHRUN_CACHE_DIR": str(tmp_path / "cache-reader")}
    status = cli("status", str(spec), env=reader)
    assert status.returncode == 0 and f"ok: {ROWS} rows" in status.stdout, status.stdout + status.stderr
    exported = cli("export", url, "--to", str(tmp_path / "all.jsonl"), env=reader)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(ids)
