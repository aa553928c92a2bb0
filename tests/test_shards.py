"""Shards: `batchrun run JOB --shard I/N` as processes side by side, killed and run again; the union holds
every id exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from jobkit import (
    NS,
    REPO,
    TOKEN,
    cli,
    emulator,
    read_ids,
    running_endpoint,
    wait_for_committed,
    write_spec,
    write_topics,
)

from batchrun.errors import BatchrunError
from batchrun.shards import Shard, shard_of

N_ROWS = 400


def test_shard_auto_reads_slurm_and_kubernetes_variables():
    assert Shard.parse("2/8") == Shard(2, 8)
    assert Shard.parse("auto", env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == Shard(3, 8)
    slurm_from_one = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert Shard.parse("auto", env=slurm_from_one) == Shard(3, 4)
    assert Shard.parse("auto", count=5, env={"JOB_COMPLETION_INDEX": "4"}) == Shard(4, 5)
    with pytest.raises(BatchrunError, match="--shard-count"):
        Shard.parse("auto", env={"JOB_COMPLETION_INDEX": "4"})
    with pytest.raises(BatchrunError):
        Shard.parse("8/8")


def test_every_id_has_exactly_one_shard_whatever_the_order():
    ids = [f"row-{i:05d}" for i in range(1000)]
    forward = Counter(shard_of(i, 4) for i in ids)
    backward = Counter(shard_of(i, 4) for i in reversed(ids))
    assert forward == backward and sum(forward.values()) == 1000
    assert min(forward.values()) > 150  # a spread, not one shard with everything


def _start(spec: Path, shard: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off",
                             "--shard", shard], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_four_shards_killed_and_run_again_hold_every_id_exactly_once(tmp_path):
    with emulator(running_endpoint("gen", latency_base_s=0.03, max_concurrent_requests=64)) as emu:
        input_path = write_topics(tmp_path / "in.parquet", N_ROWS)
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          concurrency={"max": 4, "initial": 4}, output={"shard_rows": 10})
        out = tmp_path / "out" / "job"
        env = {**os.environ, "HF_TOKEN": TOKEN}
        procs = {i: _start(spec, f"{i}/4", env) for i in range(4)}
        try:
            for victim in (1, 3):  # killed once they have committed some of their rows
                wait_for_committed(out / f"shard-{victim:05d}-of-00004", 10, procs[victim])
                procs[victim].send_signal(signal.SIGKILL)
                procs[victim].wait(timeout=60)
            for i in (0, 2):
                assert procs[i].wait(timeout=300) == 0, procs[i].stderr.read() if procs[i].stderr else ""
            for victim in (1, 3):  # run again: each resumes itself
                again = _start(spec, f"{victim}/4", env)
                procs[victim] = again
                assert again.wait(timeout=300) == 0, again.stderr.read() if again.stderr else ""
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
        ids = []
        for i in range(4):
            ids.extend(read_ids(out / f"shard-{i:05d}-of-00004" / "data"))
        assert sorted(ids) == sorted(f"row-{i:05d}" for i in range(N_ROWS))  # every id once in the union
        for i in range(4):
            assert all(shard_of(x, 4) == i for x in read_ids(out / f"shard-{i:05d}-of-00004" / "data"))
        status = cli("status", str(spec), env={"HF_TOKEN": TOKEN})
        assert status.returncode == 0 and f"ok: {N_ROWS} rows" in status.stdout and "4 shard(s)" in status.stdout
        refused = cli("run", str(spec), "--shard", "0/3", "--progress", "off", env={"HF_TOKEN": TOKEN})
        assert refused.returncode == 2 and "same N" in refused.stderr


def test_a_sharded_run_on_a_managed_endpoint_is_refused_before_anything_is_sent(tmp_path):
    # Each shard would pause the endpoint when it ends, under the shards still sending.
    spec = write_spec(tmp_path, endpoint={"name": "gen", "namespace": "my-org"},
                      input_path=write_topics(tmp_path / "in" / "t.parquet", 10))
    result = cli("run", str(spec), "--shard", "0/4", "--progress", "off")
    assert result.returncode == 2
    assert "--shard does not manage a Dedicated endpoint (my-org/gen)" in result.stderr
    assert "batchrun endpoint resume" in result.stderr
    assert not (tmp_path / "out" / "job").exists()  # nothing written, nothing resumed
