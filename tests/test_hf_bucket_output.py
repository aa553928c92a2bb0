"""Outputs in a Hugging Face Storage Bucket (``hf://buckets/ORG/NAME/PREFIX``) on the emulated Hub, whose bytes
go through its Xet CAS with the real huggingface_hub and hf_xet clients. The proof is the bucket's own
listing and its files, read back with huggingface_hub around batchrun."""

from __future__ import annotations

import io
import json
import signal
from collections import Counter

import pyarrow.parquet as pq
import pytest
from commit_records import counted_parts
from hubkit import point_at_hub
from jobkit import NS, TOKEN, cli, emulator, reaped, running_endpoint, start_run, wait_until, write_spec, write_topics

from batchrun.errors import PreconditionFailed
from batchrun.output.stores import is_store_url, open_store

BUCKET = "out-org/evals"
ROWS = 120


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """The environment huggingface_hub and hf_xet read, pointed at an emulated Hub (in this process and in a child)."""
    env = {"HF_TOKEN": TOKEN, "HF_XET_CACHE": str(tmp_path / "xet-cache"),
           "BATCHRUN_CACHE_DIR": str(tmp_path / "cache"), "BATCHRUN_STATE_DIR": str(tmp_path / "state")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return monkeypatch, env


def api(url: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=url, token=TOKEN)


def bucket_files(hub_url: str, prefix: str) -> dict[str, int]:
    """Every file under the prefix, by the bucket's listing: path below the prefix -> size."""
    return {f.path[len(prefix) + 1:]: f.size for f in api(hub_url).list_bucket_tree(BUCKET, prefix=prefix, recursive=True)
            if f.type == "file"}


def bucket_bytes(hub_url: str, prefix: str, names: list[str], folder) -> dict[str, bytes]:
    api(hub_url).download_bucket_files(BUCKET, [(f"{prefix}/{n}", folder / n.replace("/", "__")) for n in names])
    return {n: (folder / n.replace("/", "__")).read_bytes() for n in names}


def committed(hub_url: str, prefix: str, folder) -> dict[str, dict]:
    """The parts that count, from the commit records the bucket lists: file -> record."""
    names = [n for n in bucket_files(hub_url, prefix) if n.startswith("state/commits/")]
    return counted_parts(json.loads(data) for data in bucket_bytes(hub_url, prefix, names, folder).values())


def ids_of(hub_url: str, prefix: str, files: list[str], folder) -> list:
    ids: list = []
    for data in bucket_bytes(hub_url, prefix, files, folder).values():
        ids += pq.read_table(io.BytesIO(data)).column("id").to_pylist()
    return ids


def test_the_store_keeps_its_promises_on_a_bucket_checking_before_it_writes(hub_env, tmp_path):
    with emulator() as emu:
        point_at_hub(hub_env[0], emu.hub_url)
        api(emu.hub_url).create_bucket(BUCKET)
        store = open_store(f"hf://buckets/{BUCKET}/store")
        assert store.conditional_writes is False  # type: ignore[attr-defined]
        first = store.put_if_absent("state/lease.json", b"1")
        with pytest.raises(PreconditionFailed):
            store.put_if_absent("state/lease.json", b"2")
        second = store.put_if_match("state/lease.json", b"2", first)
        with pytest.raises(PreconditionFailed):
            store.put_if_match("state/lease.json", b"3", first)
        assert store.get("state/lease.json") == (b"2", second)
        part = tmp_path / "part.parquet"
        part.write_bytes(b"x" * 5000)
        store.upload("data/part-1.parquet", part)
        store.put("data/part-2.parquet", b"yy")
        assert [(o.key, o.size) for o in store.list("data")] == [("data/part-1.parquet", 5000),
                                                                ("data/part-2.parquet", 2)]
        store.delete("data/part-1.parquet")
        assert [o.key for o in store.list("data")] == ["data/part-2.parquet"] and store.list("nothing") == []
        with pytest.raises(Exception) as caught:
            store.get("data/part-1.parquet")
        assert caught.value.missing  # type: ignore[attr-defined]
    assert is_store_url("hf://buckets/o/n/p") and not is_store_url("hf://datasets/o/n")


def test_a_whole_job_writes_its_parts_and_records_to_the_bucket_and_status_reads_the_union(hub_env, tmp_path):
    monkeypatch, env = hub_env
    with emulator(running_endpoint()) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        api(emu.hub_url).create_bucket(BUCKET)
        url = f"hf://buckets/{BUCKET}/jobs/whole"
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", ROWS), name="whole",
                          output={"path": url, "shard_rows": 40})
        assert cli("validate", str(spec)).returncode == 0
        ran = cli("run", str(spec), "--progress", "off")
        assert ran.returncode == 0, ran.stderr
        assert "output.no_conditional_writes" in ran.stderr  # the warning at run start
        from huggingface_hub.utils import are_progress_bars_disabled

        assert "Processing Files" not in ran.stderr and "Validating" not in ran.stderr  # no bars over the run's
        assert not are_progress_bars_disabled()  # ... and huggingface_hub's bars are on again after it

        parts = committed(emu.hub_url, "jobs/whole", tmp_path)
        data = sorted(f for f, r in parts.items() if r["kind"] == "data")
        assert len(data) == 3 and sum(r["rows"] for r in parts.values()) == ROWS
        assert sorted(n for n in bucket_files(emu.hub_url, "jobs/whole") if n.startswith("data/")) == data
        assert sorted(ids_of(emu.hub_url, "jobs/whole", data, tmp_path)) == [f"row-{i:05d}" for i in range(ROWS)]

        status = cli("status", str(spec), env={"BATCHRUN_CACHE_DIR": str(tmp_path / "reader")})
        assert status.returncode == 0 and f"ok: {ROWS} rows" in status.stdout, status.stdout + status.stderr
        assert f"output: {url}\n" in status.stdout, status.stdout
        exported = cli("export", url, "--to", str(tmp_path / "all.jsonl"),
                       env={"BATCHRUN_CACHE_DIR": str(tmp_path / "reader")})
        assert exported.returncode == 0, exported.stderr
        lines = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
        assert sorted(line["id"] for line in lines) == [f"row-{i:05d}" for i in range(ROWS)]
        # The token reaches the Hub and its Xet storage as a header, and is written nowhere: not in any object
        # of the bucket, nor in the local cache, nor in what the commands printed (reliability section 7).
        everything = bucket_bytes(emu.hub_url, "jobs/whole", list(bucket_files(emu.hub_url, "jobs/whole")),
                                  tmp_path / "all-objects")
        texts = [ran.stdout + ran.stderr, status.stdout + status.stderr, exported.stdout + exported.stderr]
        texts += [data.decode("latin-1") for data in everything.values()]
        texts += [p.read_bytes().decode("latin-1") for p in (tmp_path / "cache").rglob("*") if p.is_file()]
        assert len(everything) > 6 and not [text for text in texts if TOKEN in text]


def test_sigkill_during_a_run_then_a_rerun_leaves_every_id_once_in_the_bucket(hub_env, tmp_path):
    monkeypatch, env = hub_env
    endpoint = running_endpoint(latency_base_s=0.1, latency_jitter_s=0.01)  # 6 s of requests: room to act
    with emulator(endpoint) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        api(emu.hub_url).create_bucket(BUCKET)
        url = f"hf://buckets/{BUCKET}/jobs/kill"
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")},
                          input_path=write_topics(tmp_path / "in.parquet", ROWS), name="kill",
                          concurrency={"max": 2, "initial": 2}, output={"path": url, "shard_rows": 10})
        log = tmp_path / "killed.stderr"
        with reaped(start_run(spec, log=log, env={**env, "HF_ENDPOINT": emu.hub_url})) as proc:
            wait_until(lambda: len(committed(emu.hub_url, "jobs/kill", tmp_path)) >= 2, proc=proc, log=log,
                       timeout=120, what="two committed parts in the bucket")
            # A second run started while the first is alive sees its lease and is refused (not atomic: a race
            # between the look and the write is not refused; one writer per shard is the launcher's job).
            second = cli("run", str(spec), "--progress", "off")
            assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr, second.stderr
            status = cli("status", str(spec), env={"BATCHRUN_CACHE_DIR": str(tmp_path / "reader")})
            assert f"running now: pid {proc.pid}" in status.stdout, status.stdout + status.stderr
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        before = sum(r["rows"] for r in committed(emu.hub_url, "jobs/kill", tmp_path).values())
        print(f"rows committed when the run was killed: {before} of {ROWS}")
        assert 0 < before < ROWS

        finished = cli("run", str(spec), "--progress", "off")
        assert finished.returncode == 0, finished.stderr
        parts = committed(emu.hub_url, "jobs/kill", tmp_path)
        data = sorted(f for f, r in parts.items() if r["kind"] == "data")
        ids = ids_of(emu.hub_url, "jobs/kill", data, tmp_path)
        assert [i for i, n in Counter(ids).items() if n > 1] == []  # nothing twice
        assert sorted(ids) == [f"row-{i:05d}" for i in range(ROWS)]  # nothing lost
        assert sorted(n for n in bucket_files(emu.hub_url, "jobs/kill") if n.startswith("data/")) == data  # no orphan
        status = cli("status", str(spec), env={"BATCHRUN_CACHE_DIR": str(tmp_path / "reader")})
        assert f"ok: {ROWS} rows" in status.stdout, status.stdout + status.stderr


def test_shards_sharing_an_endpoint_on_a_bucket_are_refused_until_the_launcher_brackets_it(hub_env, tmp_path):
    from jobkit import paused_endpoint

    monkeypatch, _ = hub_env
    with emulator(paused_endpoint()) as emu:
        point_at_hub(monkeypatch, emu.hub_url)
        api(emu.hub_url).create_bucket(BUCKET)
        managed = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 30}
        spec = write_spec(tmp_path, endpoint=managed, input_path=write_topics(tmp_path / "in.parquet", 40),
                          output={"path": f"hf://buckets/{BUCKET}/jobs/shards"}, shards=2)
        refused = cli("validate", str(spec))
        assert refused.returncode == 2 and "batchrun endpoint up JOB.yaml" in refused.stderr, refused.stderr
        alone = cli("run", str(spec), "--shard", "0/2", "--progress", "off")
        assert alone.returncode == 2 and "no conditional writes" in alone.stderr, alone.stderr
        assert emu.state(NS, "gen").state == "paused"  # the refusals touched no endpoint

        assert cli("endpoint", "up", str(spec)).returncode == 0
        assert cli("validate", str(spec)).returncode == 0
        for i in range(2):
            ran = cli("run", str(spec), "--shard", f"{i}/2", "--progress", "off")
            assert ran.returncode == 0, ran.stderr
        assert emu.state(NS, "gen").state == "running"  # the bracket holds it up
        assert cli("endpoint", "down", str(spec)).returncode == 0
        assert emu.state(NS, "gen").state == "paused"
        status = cli("status", str(spec))
        assert "ok: 40 rows" in status.stdout, status.stdout + status.stderr
