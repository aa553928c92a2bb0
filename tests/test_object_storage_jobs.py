"""Jobs whose output is on a real S3-compatible server (moto, on loopback): SIGKILL during an upload and during
a commit, then a rerun: nothing lost, nothing duplicated, no orphan part counted. The proof is the store's
own listing, read with boto3 around batchrun (tests/s3kit.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from jobkit import (
    NS,
    REPO,
    TOKEN,
    cli,
    emulator,
    paused_endpoint,
    running_endpoint,
    start_run,
    two_running_with_rows,
    wait_until,
    write_spec,
    write_topics,
)
from s3kit import HoldingProxy, S3Server, committed, committed_rows

from batchrun.shards import shard_of

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
                proxy.hold("PUT", key_part, skip=1)  # the run's first part goes through; its second is held
                proc = start_run(spec, log=log, env=env)
                try:
                    wait_until(proxy.held.is_set, proc=proc, log=log, what=f"a PUT of {key_part} in flight")
                    assert committed_rows(s3, url) > before  # observed progress: this run committed a part
                    if index == 0:  # a second run on the same output is refused at once, naming the holder
                        second = cli("run", str(spec), "--progress", "off", env={**env, "HF_TOKEN": TOKEN})
                        assert second.returncode == 2, second.stderr
                        assert f"pid {proc.pid}" in second.stderr and "another batchrun run" in second.stderr
                        status = cli("status", str(spec), env=env)  # read from the commit records and the lease
                        assert f"running now: pid {proc.pid}" in status.stdout, status.stdout + status.stderr
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
            print(f"(held PUT, reached the store, rows committed, orphan parts) after each kill: {seen}")
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
    assert f"output: {url}\n" in status.stdout, status.stdout
    exported = cli("export", url, "--to", str(tmp_path / "all.jsonl"), env=env)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert sorted(line["custom_id"] if "custom_id" in line else line["id"] for line in lines) == sorted(ids)
    preview = cli("preview", url, "--html", str(tmp_path / "preview.html"), env=env)
    assert preview.returncode == 0 and "row-00000" in (tmp_path / "preview.html").read_text(), preview.stderr
    again = cli("run", str(spec), "--progress", "off", env={**env, "HF_TOKEN": TOKEN})
    assert again.returncode == 0 and committed(s3, url) == parts  # a finished job sends nothing, commits nothing


N_ROWS = 400


def _shard(i: int) -> str:
    return f"shard-{i:05d}-of-00004"


def _start(spec, shard: str, env: dict[str, str]) -> subprocess.Popen:
    """A shard's run as a process of its own, its stderr in a log beside the spec (a pipe left unread while
    the test waits could fill and block it)."""
    log = Path(spec).parent / f"shard-{shard.replace('/', '-of-')}-{time.monotonic_ns()}.log"
    proc = start_run(spec, "--shard", shard, log=log, env=env)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _said(proc: subprocess.Popen) -> str:
    return proc.log.read_text()  # type: ignore[attr-defined]


def _puts_down(emu) -> list[dict]:
    return [e for e in emu.control_log if e["method"] == "POST" and e["path"].endswith(("/pause", "/scale-to-zero"))]


def test_four_shards_on_s3_killed_and_run_again_share_one_endpoint_and_hold_every_id_exactly_once(tmp_path, s3):
    url = s3.bucket("jobs/four")
    env = {**os.environ, **s3.environ(), "HF_TOKEN": TOKEN, "BATCHRUN_STATE_DIR": str(tmp_path / "batchrun-state"),
           "BATCHRUN_CACHE_DIR": str(tmp_path / "cache")}
    paused = paused_endpoint(latency_base_s=0.05, max_concurrent_requests=64, scale_to_zero_timeout=30)
    with emulator(paused) as emu:
        managed = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 30,
                   "scale": {"min_replica": 2, "max_replica": 2}}
        spec = write_spec(tmp_path, endpoint=managed, input_path=write_topics(tmp_path / "in.parquet", N_ROWS),
                          concurrency={"max": 2, "initial": 2}, output={"path": url, "shard_rows": 10})
        procs = {i: _start(spec, f"{i}/4", env) for i in range(4)}
        try:
            # One killed outright, one stopped by SIGTERM, both while sending, once the store lists some of
            # each one's rows committed.
            killed, stopped = two_running_with_rows(procs, lambda i: committed_rows(s3, url, _shard(i)), 10)
            procs[killed].send_signal(signal.SIGKILL)
            procs[stopped].send_signal(signal.SIGTERM)
            for victim in (killed, stopped):
                procs[victim].wait(timeout=60)
            assert procs[killed].returncode == -signal.SIGKILL  # killed while sending, not after it ended
            assert procs[stopped].returncode == 3, _said(procs[stopped])
            for i in set(range(4)) - {killed, stopped}:
                assert procs[i].wait(timeout=300) == 0, _said(procs[i])
            assert _puts_down(emu) and emu.state(NS, "gen").state == "paused"
            again = {victim: _start(spec, f"{victim}/4", env) for victim in (killed, stopped)}
            procs.update(again)
            for proc in again.values():
                assert proc.wait(timeout=300) == 0, _said(proc)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
        # Never put down while a shard was sending, each resume with its one pause, no request met a pause.
        puts_down = _puts_down(emu)
        assert len(puts_down) >= 2 and all(e["data_in_flight"] == 0 for e in puts_down)
        lifecycle = [e["path"].rsplit("/", 1)[-1] for e in emu.control_log
                     if e["method"] == "POST" and e["path"].endswith(("/pause", "/resume"))]
        assert lifecycle == ["resume", "pause"] * (len(lifecycle) // 2), lifecycle
        statuses = {status for route in emu.stats()["endpoints"][f"{NS}/gen"]["by_route"].values() for status in route}
        assert statuses <= {"200", "cancelled"}, statuses
        state = emu.state(NS, "gen")
        assert (state.state, state.min_replica, state.max_replica) == ("paused", 1, 1)
        # The shared state in the store is left clean: no guard, no settings, and no user alive.
        shared = s3.keys(url, "state/endpoints/")
        assert not [k for k in shared if k.endswith(("guard.json", "settings.json"))], shared
        assert not (REPO / "s3:").exists()  # nothing of it went to a local folder named after the URL

    # The union, by the store's listing: every id once, and data/ holds committed parts only.
    parts = {f: r for i in range(4) for f, r in committed(s3, url, _shard(i)).items()}
    data = sorted(f for f, r in parts.items() if r["kind"] == "data")
    assert s3.keys(url, "data/") == data
    ids = _ids_in(s3, url, data)
    assert sorted(ids) == sorted(f"row-{i:05d}" for i in range(N_ROWS))
    for file in data:  # each part holds its shard's ids only
        shard = int(file.split("/")[1].split("-")[1])
        assert all(shard_of(x, 4) == shard for x in _ids_in(s3, url, [file]))
    reader = {**env, "BATCHRUN_CACHE_DIR": str(tmp_path / "reader-cache")}
    status = cli("status", str(spec), env=reader)
    assert status.returncode == 0 and f"ok: {N_ROWS} rows" in status.stdout and "4 shard(s)" in status.stdout
    assert f"output: {url} " in status.stdout, status.stdout
    runs = cli("runs", url, env=reader)
    assert runs.returncode == 0 and runs.stdout.splitlines()[1].split()[3:5] == [str(N_ROWS), "0"], runs.stdout
    compared = cli("compare", url, url, "--json", env=reader)
    assert compared.returncode == 0 and json.loads(compared.stdout)["common"] == N_ROWS, compared.stderr
    refused = cli("run", str(spec), "--shard", "0/3", "--progress", "off", env=env)
    assert refused.returncode == 2 and "same N" in refused.stderr


def test_load_dataset_reads_a_finished_output_on_s3_with_every_id_exactly_once(tmp_path, s3, monkeypatch):
    """What docs/object-storage.md tells a user to run once every shard has finished: datasets with fsspec's
    s3fs reads the objects under data/ itself, no commit record involved."""
    import datasets
    import datasets.config

    # The suite keeps datasets offline (conftest.py), which refuses every remote path, s3:// too; the
    # parquet builder is packaged, so nothing but the loopback S3 server is reached.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    url = s3.bucket("jobs/load")
    env = {**s3.environ(), "BATCHRUN_CACHE_DIR": str(tmp_path / "cache"), "HF_TOKEN": TOKEN}
    rows = 60
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", rows), output={"path": url, "shard_rows": 10})
        for shard in ("0/2", "1/2"):
            finished = cli("run", str(spec), "--shard", shard, "--progress", "off", env=env)
            assert finished.returncode == 0, finished.stderr
    assert len(s3.keys(url, "data/")) > 2  # several parts, from both shards
    # A store other than AWS is named as fsspec expects it, in storage_options (s3fs also reads the AWS_* environment).
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3.endpoint, "region_name": "us-east-1"}}
    loaded = datasets.load_dataset("parquet", data_files=f"{url}/data/*.parquet", storage_options=options,
                                   split="train", cache_dir=str(tmp_path / "hf-cache"))
    ids = loaded["id"]
    assert len(ids) == rows and sorted(ids) == [f"row-{i:05d}" for i in range(rows)]
