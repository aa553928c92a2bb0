"""Jobs whose output is on a real S3-compatible server (moto, on loopback): SIGKILL during an upload and during
a commit, then a rerun: nothing lost, nothing duplicated, no orphan part counted. The proof is the store's
own listing, read with boto3 around batchrun (tests/s3kit.py)."""

from __future__ import annotations

import io
import json
import signal
from collections import Counter

import pyarrow.parquet as pq
import pytest
from jobkit import NS, TOKEN, cli, emulator, running_endpoint, start_run, wait_until, write_spec, write_topics
from s3kit import HoldingProxy, S3Server, committed, committed_rows

ROWS = 240


@pytest.fixture(scope="module")
def s3():
    server = S3Server.start()
    yield server
    server.stop()


def _ids_in(server: S3Server, url: str, files) -> list:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    ids: list = []
    for file in files:
        body = server.client.get_object(Bucket=bucket, Key=f"{prefix}/{file}")["Body"].read()
        ids += pq.read_table(io.BytesIO(body)).column("id").to_pylist()
    return ids


def test_sigkill_during_an_upload_and_during_a_commit_then_a_rerun_loses_and_duplicates_nothing(tmp_path, s3):
    proxy = HoldingProxy(s3.port)
    url = s3.bucket("jobs/kill")
    env = {**s3.environ(), "AWS_ENDPOINT_URL": proxy.endpoint, "BATCHRUN_CACHE_DIR": str(tmp_path / "cache"),
           "BATCHRUN_STATE_DIR": str(tmp_path / "state")}
    endpoint = running_endpoint(latency_base_s=0.02, latency_jitter_s=0.01)
    try:
        with emulator(endpoint) as emu:
            spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                              input_path=write_topics(tmp_path / "in.parquet", ROWS), name="kill",
                              concurrency={"max": 4, "initial": 4}, output={"path": url, "shard_rows": 10})
            # (what the held request writes, whether it reaches the store after its writer is dead)
            kills = [("/data/", True), ("/commits/", True), ("/commits/", False), ("/data/", False)]
            seen: list[tuple[str, bool, int, int]] = []
            for index, (key_part, lands) in enumerate(kills):
                before = committed_rows(s3, url)
                log = tmp_path / f"run-{index}.stderr"
                proc = start_run(spec, log=log, env=env)
                try:
                    # Observed progress first: this run has committed a part of its own.
                    wait_until(lambda before=before: committed_rows(s3, url) > before, proc=proc, log=log,
                               interval=0.1, what="a part committed by this run")
                    proxy.hold("PUT", key_part)
                    wait_until(proxy.held.is_set, proc=proc, log=log, what=f"a PUT of {key_part} in flight")
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(timeout=30)
                finally:
                    proxy.release(forward=lands)
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                # The held request may land only now, after its writer died: wait for the store to show it.
                if lands:
                    wait_until(proxy.landed.is_set, what="the held request reached the store")
                orphans = [k for k in s3.keys(url, "data/") if k not in committed(s3, url)]
                seen.append((key_part, lands, committed_rows(s3, url), len(orphans)))
            assert 0 < committed_rows(s3, url) < ROWS, seen
            assert any(orphans for _, _, _, orphans in seen), seen  # a part without a record was left somewhere

            finished = cli("run", str(spec), "--progress", "off", env={**env, "HF_TOKEN": TOKEN})
            assert finished.returncode == 0, finished.stderr
    finally:
        proxy.stop()

    parts = committed(s3, url)
    data = sorted(f for f, r in parts.items() if r["kind"] == "data")
    ids = _ids_in(s3, url, data)
    assert [i for i, n in Counter(ids).items() if n > 1] == []  # nothing twice
    assert sorted(ids) == sorted(f"row-{i:05d}" for i in range(ROWS))  # nothing lost
    assert s3.keys(url, "data/") == data  # every orphan part was removed; nothing uncommitted is left
    assert sum(r["rows"] for r in parts.values()) == ROWS

    env = {**s3.environ(), "BATCHRUN_CACHE_DIR": str(tmp_path / "cache-reader")}
    status = cli("status", str(spec), env=env)
    assert status.returncode == 0 and f"ok: {ROWS} rows" in status.stdout, status.stdout + status.stderr
    exported = cli("export", url, "--to", str(tmp_path / "all.jsonl"), env=env)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] if "custom_id" in line else line["id"] for line in lines) == sorted(ids)
    again = cli("run", str(spec), "--progress", "off", env={**env, "HF_TOKEN": TOKEN})
    assert again.returncode == 0 and committed(s3, url) == parts  # a finished job sends nothing, commits nothing
