"""Shards: `batchrun run JOB --shard I/N` as processes side by side, killed and run again; the union holds
every id exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
from jobkit import (
    NS,
    REPO,
    TOKEN,
    cli,
    committed_rows,
    emulator,
    paused_endpoint,
    read_ids,
    running_endpoint,
    two_running_with_rows,
    write_spec,
    write_topics,
)

from batchrun.endpoints.saved_settings import endpoint_state_path
from batchrun.endpoints.shared_endpoint import BRACKET, SharedUse
from batchrun.errors import BatchrunError
from batchrun.holder import utc_now
from batchrun.output import OutputStore
from batchrun.shards import JobShard, shard_of

N_ROWS = 400


def test_shard_auto_reads_slurm_and_kubernetes_variables():
    assert JobShard.parse("2/8") == JobShard(2, 8)
    assert JobShard.parse("auto", env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == JobShard(3, 8)
    slurm_from_one = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert JobShard.parse("auto", env=slurm_from_one) == JobShard(3, 4)
    assert JobShard.parse("auto", count=5, env={"JOB_COMPLETION_INDEX": "4"}) == JobShard(4, 5)
    # A subset of the array run again (--array=3,5): Slurm counts the subset. Without the job's count it
    # is refused; with it, the task id is the shard (never shifted by the subset's first id).
    subset = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "5",
              "SLURM_ARRAY_TASK_COUNT": "2"}
    with pytest.raises(BatchrunError, match="not a whole array"):
        JobShard.parse("auto", env=subset)
    assert JobShard.parse("auto", count=8, env=subset) == JobShard(5, 8)
    with pytest.raises(BatchrunError, match="number the array from 0"):
        JobShard.parse("auto", count=4, env={**slurm_from_one, "SLURM_ARRAY_TASK_ID": "4"})
    # --array=1-8 for 8 shards: every task refuses (shard 0 would never run), not only task 8.
    one_to_eight = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8",
                    "SLURM_ARRAY_TASK_COUNT": "8"}
    with pytest.raises(BatchrunError, match="reach 8"):
        JobShard.parse("auto", count=8, env=one_to_eight)
    with pytest.raises(BatchrunError, match="--shard-count"):
        JobShard.parse("auto", env={"JOB_COMPLETION_INDEX": "4"})
    with pytest.raises(BatchrunError):
        JobShard.parse("8/8")


def test_a_shard_refuses_an_output_path_that_makes_a_folder_per_run(tmp_path, env):
    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9/"}, output={"path": str(tmp_path / "{run_id}")},
                      input_path=write_topics(tmp_path / "in.parquet", 4))
    refused = cli("run", str(spec), "--shard", "0/2", "--progress", "off", env=env)
    assert refused.returncode == 2 and "each shard would write a folder of its own" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "job.yaml"]


def test_a_shard_with_other_settings_than_its_siblings_is_refused_and_status_names_missing_shards(tmp_path, env):
    with emulator(running_endpoint("gen", latency_base_s=0.002)) as emu:
        input_path = write_topics(tmp_path / "in.parquet", 20)
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path)
        assert cli("run", str(spec), "--shard", "0/3", "--progress", "off", env=env).returncode == 0
        (tmp_path / "other").mkdir()
        other = write_spec(tmp_path / "other", endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                           output={"path": str(tmp_path / "out" / "job")}, parameters={"max_tokens": 5})
        refused = cli("run", str(other), "--shard", "1/3", "--progress", "off", env=env)
        assert refused.returncode == 2 and "holds shards of this job (this run is shard-00001-of-00003) under " \
            "other settings" in refused.stderr, refused.stderr
        assert "--fresh" not in refused.stderr
    assert OutputStore.shard_names(tmp_path / "out" / "job") == ["shard-00000-of-00003"]
    status = cli("status", str(spec), env=env)
    assert "(1 of 3 shard(s) have run)" in status.stdout and "not run yet: shard(s) 1, 2 of 3" in status.stdout


def test_status_of_a_split_job_says_which_shards_are_running(tmp_path):
    from batchrun.output import OutputLock, OutputStore
    from batchrun.shards import union_status

    stores = [OutputStore(tmp_path / "out", f"shard-{i:05d}-of-00002") for i in range(2)]
    for store in stores:
        store.save_job({"name": "job"})
    with OutputLock(stores[1]):
        union = union_status(tmp_path / "out")
    assert union["shards"]["shard-00000-of-00002"]["running"] is None
    assert f"pid {os.getpid()}" in union["shards"]["shard-00001-of-00002"]["running"]


def test_every_id_has_exactly_one_shard_whatever_the_order():
    ids = [f"row-{i:05d}" for i in range(1000)]
    forward = Counter(shard_of(i, 4) for i in ids)
    backward = Counter(shard_of(i, 4) for i in reversed(ids))
    assert forward == backward and sum(forward.values()) == 1000
    assert min(forward.values()) > 150  # a spread, not one shard with everything


def test_shard_auto_takes_the_count_from_the_spec_under_kubernetes(tmp_path, env):
    with emulator(running_endpoint("gen", latency_base_s=0.002)) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, shards=2,
                          input_path=write_topics(tmp_path / "in.parquet", 20))
        ran = cli("run", str(spec), "--shard", "auto", "--progress", "off", env={**env, "JOB_COMPLETION_INDEX": "1"})
    assert ran.returncode == 0, ran.stderr
    out = tmp_path / "out" / "job"
    assert [p.name for p in (out / "state" / "shards").iterdir()] == ["shard-00001-of-00002"]
    assert read_ids(out / "data") and all(shard_of(i, 2) == 1 for i in read_ids(out / "data"))
    (tmp_path / "bad").mkdir()
    bad = write_spec(tmp_path / "bad", endpoint={"url": "http://127.0.0.1:9/"}, shards=0,
                     input_path=tmp_path / "in.parquet")
    refused = cli("validate", str(bad), env=env)
    assert refused.returncode == 2 and "shards" in refused.stderr


def _start(spec: Path, shard: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off",
                             "--shard", shard], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _shard(i: int) -> str:
    return f"shard-{i:05d}-of-00004"


def _puts_down(emu) -> list[dict]:
    return [e for e in emu.control_log if e["method"] == "POST" and e["path"].endswith(("/pause", "/scale-to-zero"))]


@pytest.fixture
def env(tmp_path):
    # The endpoint's host-wide saved settings go to this test's folder, never to ~/.cache/batchrun.
    return {**os.environ, "HF_TOKEN": TOKEN, "BATCHRUN_STATE_DIR": str(tmp_path / "batchrun-state")}


def test_four_shards_killed_and_run_again_share_one_endpoint_and_hold_every_id_exactly_once(tmp_path, env):
    paused = paused_endpoint(latency_base_s=0.05, max_concurrent_requests=64, scale_to_zero_timeout=30)
    with emulator(paused) as emu:
        input_path = write_topics(tmp_path / "in.parquet", N_ROWS)
        managed = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 30,
                   "scale": {"min_replica": 2, "max_replica": 2}}
        spec = write_spec(tmp_path, endpoint=managed, input_path=input_path,
                          concurrency={"max": 2, "initial": 2}, output={"shard_rows": 10})
        out = tmp_path / "out" / "job"
        procs = {i: _start(spec, f"{i}/4", env) for i in range(4)}
        try:
            # One killed outright, one stopped by SIGTERM (it releases: it must leave the endpoint to the
            # others), both while sending, once each has committed some of its rows.
            killed, stopped = two_running_with_rows(procs, lambda i: committed_rows(out, _shard(i)), 10)
            procs[killed].send_signal(signal.SIGKILL)
            procs[stopped].send_signal(signal.SIGTERM)
            for victim in (killed, stopped):
                procs[victim].wait(timeout=60)
            assert procs[killed].returncode == -signal.SIGKILL  # killed while sending, not after it ended
            assert procs[stopped].returncode == 3, procs[stopped].stderr.read() if procs[stopped].stderr else ""
            for i in set(range(4)) - {killed, stopped}:
                assert procs[i].wait(timeout=300) == 0, procs[i].stderr.read() if procs[i].stderr else ""
            # The last shard of the first round put it down: the one killed is dead, SIGTERM's left. (How
            # often it was put down before depends on how the starts overlapped: a shard that ran all alone
            # pauses it, and a later one resumes it.)
            assert _puts_down(emu) and emu.state(NS, "gen").state == "paused"
            again = {victim: _start(spec, f"{victim}/4", env) for victim in (killed, stopped)}  # each resumes itself
            procs.update(again)
            for proc in again.values():
                assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
        # Never put down while a shard was sending: each pause found nothing in flight, and no request ever
        # met a paused endpoint (answered 400) or failed.
        puts_down = _puts_down(emu)
        assert len(puts_down) >= 2 and all(e["data_in_flight"] == 0 for e in puts_down)
        lifecycle = [e["path"].rsplit("/", 1)[-1] for e in emu.control_log
                     if e["method"] == "POST" and e["path"].endswith(("/pause", "/resume"))]
        assert lifecycle == ["resume", "pause"] * (len(lifecycle) // 2), lifecycle  # each resume its one pause
        statuses = {status for route in emu.stats()["endpoints"][f"{NS}/gen"]["by_route"].values() for status in route}
        assert statuses <= {"200", "cancelled"}, statuses  # cancelled: the requests of the shard killed outright
        # Paused once the last shard ended, with the user's settings back, and nothing left in the shared state.
        state = emu.state(NS, "gen")
        assert (state.state, state.min_replica, state.max_replica) == ("paused", 1, 1)
        assert state.scale_to_zero_timeout == 30
        shared = next((out / "state" / "endpoints").iterdir())
        assert not (shared / "settings.json").exists() and list((shared / "users").iterdir()) == []
        # The token is nowhere in what the shards wrote: their state, the shared endpoint's files, the data.
        assert not [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]

        # One output folder: the shards' files side by side in data/, the union every id once.
        loaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train")
        assert sorted(loaded["id"]) == sorted(f"row-{i:05d}" for i in range(N_ROWS))
        for path in (out / "data").glob("*.parquet"):
            shard = int(path.name.split("-")[1])  # shard-00001-of-00004-part-...: each file holds its shard's ids
            assert all(shard_of(x, 4) == shard for x in pq.read_table(path).column("id").to_pylist())
        assert sorted(p.name for p in (out / "state" / "shards").iterdir()) == [_shard(i) for i in range(4)]
        status = cli("status", str(spec), env=env)
        assert status.returncode == 0 and f"ok: {N_ROWS} rows" in status.stdout and "4 shard(s)" in status.stdout
        runs = cli("runs", str(tmp_path / "out"), env=env)  # one run: the union of its four shards
        assert runs.returncode == 0 and len(runs.stdout.splitlines()) == 2, runs.stdout
        assert runs.stdout.splitlines()[1].split()[3:5] == [str(N_ROWS), "0"], runs.stdout
        compared = cli("compare", str(out), str(out), "--json", env=env)  # a split run reads as one run
        assert compared.returncode == 0, compared.stderr
        report = json.loads(compared.stdout)
        assert report["common"] == N_ROWS and report["runs"]["a"]["ok"] == N_ROWS
        assert report["runs"]["a"]["cost_usd"] is None  # the shards' costs overlap: no sum is made
        exported = cli("export", str(out), "--to", str(tmp_path / "all.jsonl"), env=env)
        assert exported.returncode == 0, exported.stderr
        assert len((tmp_path / "all.jsonl").read_text().splitlines()) == N_ROWS

        refused = cli("run", str(spec), "--shard", "0/3", "--progress", "off", env=env)
        assert refused.returncode == 2 and "same N" in refused.stderr
        unsplit = cli("run", str(spec), "--progress", "off", env=env)  # would redo every row
        assert unsplit.returncode == 2 and "split into shards (4 of them)" in unsplit.stderr
        fresh = cli("run", str(spec), "--shard", "0/4", "--fresh", "--progress", "off", env=env)
        assert fresh.returncode == 2 and "cannot start it over alone" in fresh.stderr
        assert sorted(read_ids(out / "data")) == sorted(loaded["id"])  # the refusals changed nothing
        assert len(_puts_down(emu)) == len(puts_down)  # ... and touched no endpoint


def test_endpoint_up_and_down_bracket_the_shards_by_hand(tmp_path, env):
    with emulator(paused_endpoint()) as emu:
        managed = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 30,
                   "scale": {"min_replica": 2, "max_replica": 3}}
        spec = write_spec(tmp_path, endpoint=managed, input_path=write_topics(tmp_path / "in.parquet", 40),
                          concurrency={"max": 4, "initial": 4})
        up = cli("endpoint", "up", str(spec), env=env)
        assert up.returncode == 0 and "ready" in up.stdout, up.stderr
        state = emu.state(NS, "gen")
        assert (state.state, state.min_replica, state.max_replica) == ("running", 2, 3)
        for i in range(2):  # one after the other: neither puts the endpoint down, the bracket holds it
            ran = cli("run", str(spec), "--shard", f"{i}/2", "--progress", "off", env=env)
            assert ran.returncode == 0, ran.stderr
            assert "left to the other users" in (tmp_path / "out" / "job" / "state" / "shards" /
                                                 f"shard-{i:05d}-of-00002" / "summary.json").read_text()
        assert _puts_down(emu) == [] and emu.state(NS, "gen").state == "running"
        down = cli("endpoint", "down", str(spec), env=env)
        assert down.returncode == 0 and "pause" in down.stdout, down.stdout + down.stderr
        state = emu.state(NS, "gen")
        assert (state.state, state.min_replica, state.max_replica) == ("paused", 1, 1)
        assert len(_puts_down(emu)) == 1
        (tmp_path / "u").mkdir()
        without = cli("endpoint", "down", str(write_spec(tmp_path / "u", endpoint={"url": "http://127.0.0.1:9/"},
                                                          input_path=tmp_path / "in.parquet")), env=env)
        assert without.returncode == 2 and "brackets a Dedicated endpoint" in without.stderr


def test_endpoint_up_that_fails_puts_back_what_it_resumed(tmp_path, env):
    slow = paused_endpoint(initializing_s=30)
    with emulator(slow) as emu:
        managed = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 1,
                   "scale": {"min_replica": 2, "max_replica": 2}}
        spec = write_spec(tmp_path, endpoint=managed, input_path=write_topics(tmp_path / "in.parquet", 4))
        up = cli("endpoint", "up", str(spec), env=env)
        assert up.returncode != 0 and "was not ready after 1s" in up.stderr, up.stdout + up.stderr
        state = emu.state(NS, "gen")  # a bracket never goes stale: had it stayed, nothing would pause this
        assert (state.state, state.min_replica, state.max_replica) == ("paused", 1, 1)
        assert [e["path"].rsplit("/", 1)[-1] for e in emu.control_log if e["method"] == "POST"] == ["resume", "pause"]
    shared = next((tmp_path / "out" / "job" / "state" / "endpoints").iterdir())
    assert list((shared / "users").iterdir()) == [] and not (shared / "settings.json").exists()


def test_shards_restore_what_a_single_run_killed_earlier_on_this_machine_saved(tmp_path, env):
    # A single run scaled the endpoint to 2 and was killed with SIGKILL: the user's settings (paused, 1
    # replica, 30 min) wait in batchrun's per-machine state folder. The shards put those back, not the 2.
    left_running = running_endpoint(min_replica=2, max_replica=2, scale_to_zero_timeout=15, latency_base_s=0.002)
    with emulator(left_running) as emu:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        host_file = Path(env["BATCHRUN_STATE_DIR"]) / "endpoints" / endpoint_state_path(emu.api_url, NS, "gen").name
        host_file.parent.mkdir(parents=True)
        host_file.write_text(json.dumps({
            "endpoint": f"{NS}/gen", "api_url": emu.api_url, "initial_state": "paused", "min_replica": 1,
            "max_replica": 1, "scale_to_zero_timeout": 30, "pid": dead.pid, "host": socket.gethostname()}))
        managed = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 30,
                   "scale": {"min_replica": 2, "max_replica": 2}}
        spec = write_spec(tmp_path, endpoint=managed, input_path=write_topics(tmp_path / "in.parquet", 20))
        for i in range(2):
            ran = cli("run", str(spec), "--shard", f"{i}/2", "--progress", "off", env=env)
            assert ran.returncode == 0, ran.stderr
        state = emu.state(NS, "gen")
        assert (state.state, state.min_replica, state.max_replica) == ("paused", 1, 1)
        assert state.scale_to_zero_timeout == 30
    assert not host_file.exists()


def test_a_shard_that_is_not_last_leaves_the_endpoint_to_the_others(tmp_path):
    folder = tmp_path / "shared"
    first, second = SharedUse(folder, "shard-00000-of-00002"), SharedUse(folder, "shard-00001-of-00002")
    first.join(beat=False)
    second.join(beat=False)
    assert [o.split(" ")[0] for o in first.others()] == ["shard-00001-of-00002"]
    assert second.leave() and first.leave() == []  # the second sees the first alive; the first is last

    # A killed shard (same host, its process gone) does not count; one on another host counts until its
    # heartbeat is stale; the bracket always counts.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    users = folder / "users"
    (users / "shard-00001-of-00002.json").write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "started": None, "since": "x", "heartbeat_at": "x"}))
    (users / "shard-00002-of-00003.json").write_text(json.dumps(
        {"pid": 1, "host": "elsewhere", "started": None, "since": "x", "heartbeat_at": utc_now()}))
    (users / "shard-00000-of-00003.json").write_text(json.dumps(
        {"pid": 1, "host": "elsewhere", "started": None, "since": "x", "heartbeat_at": "2020-01-01T00:00:00Z"}))
    assert [o.split(" ")[0] for o in first.others()] == ["shard-00002-of-00003"]
    bracket = SharedUse(folder, BRACKET)
    bracket.join(beat=False)
    (users / "shard-00002-of-00003.json").unlink()
    assert [o.split(" ")[0] for o in first.others()] == [BRACKET]
    bracket.leave()

    # A record caught mid-replace (torn, or ESTALE on NFS) is alive while the file is fresh, never taken as gone.
    torn = users / "shard-00001-of-00003.json"
    torn.write_text('{"pid": 1, "ho')
    assert [o.split(" ")[0] for o in first.others()] == ["shard-00001-of-00003"]
    os.utime(torn, (0, 0))  # a torn file nobody rewrote for long: its writer is gone
    assert first.others() == []
