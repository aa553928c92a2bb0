"""SIGKILL at random moments, resume each time: nothing lost, nothing twice, every file readable.

The shape of the Kafka exactly-once test (reliability.md §1). CI runs a short version; set
BATCHRUN_SLOW=1 for the full 20 kills.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from jobkit import (
    NS,
    REPO,
    TOKEN,
    cli,
    committed_rows,
    emulator,
    read_ids,
    running_endpoint,
    wait_for_committed,
    write_spec,
    write_topics,
)

FULL = os.environ.get("BATCHRUN_SLOW") == "1"


def _kill_and_resume(tmp_path: Path, kills: int, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    # Faults make some rows retry and some fail retryably, so kills also land mid-retry. The latency and
    # the concurrency cap bound the pace (8 / ~0.05 s, about 160 rows/s) whatever the machine's speed, so
    # the work left after each awaited point lasts far longer than it takes to see it and kill.
    endpoint = running_endpoint(latency_base_s=0.04, latency_jitter_s=0.02,
                                faults={"rate_500": 0.05, "rate_429": 0.05, "retry_after_s": 0.05})
    with emulator(endpoint) as emu:
        input_path = write_topics(tmp_path / "in" / "t.parquet", rows, empty_every=97)
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          name="kill", concurrency={"max": 8, "initial": 8}, output={"shard_rows": 25},
                          retries={"max_attempts": 2, "budget_ratio": 1.0})
        env = {**os.environ, "HF_TOKEN": TOKEN}
        out = tmp_path / "out" / "kill"
        landed: list[tuple[int, int]] = []  # (rows awaited, rows committed when the kill had landed)
        for kill in range(kills):
            # Each kill waits for an observed point of the work: N rows committed in the manifest, N drawn
            # between "this run committed something" and a share of what is left that keeps work for every
            # kill still to come, so that each lands in the middle of the work on a slow machine and on a
            # fast one alike.
            before = committed_rows(out)
            target = before + rng.randint(1, max(1, (rows - before) // (kills - kill + 1)))
            log = tmp_path / f"kill-{kill}.stderr"
            with open(log, "w") as stderr:
                proc = subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec), "--progress", "off"],
                                        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                wait_for_committed(out, target, proc, log=log)
                assert proc.poll() is None, f"run {kill} finished before its kill"  # killed mid-work
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            finally:
                proc.kill()
                proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            landed.append((target, committed_rows(out)))
        committed = committed_rows(out)
        print(f"rows awaited / committed at each kill: {landed} of {rows}")  # shown with -s or -rP
        assert 0 < committed < rows, landed  # the kills landed in the middle of the work (by construction)
        finished = None
        for _ in range(3):  # retryable failures (the injected 500s) are retried on each run
            finished = cli("run", str(spec), "--progress", "off", env={"HF_TOKEN": TOKEN})
            assert finished.returncode in (0, 1), finished.stderr
            if finished.returncode == 0:
                break
    ok, failed = read_ids(out / "data"), read_ids(out / "failed")
    expected = [f"row-{i:05d}" for i in range(rows)]
    assert sorted(ok + failed) == expected  # nothing lost, nothing twice
    assert committed_rows(out) == rows  # and the manifest vouches for every one of them
    for folder in ("data", "failed"):
        for file in (out / folder).glob("*.parquet"):
            pq.read_metadata(file)  # every published file has its footer


def test_sigkill_at_random_moments_then_resume_loses_and_duplicates_nothing(tmp_path):
    _kill_and_resume(tmp_path, kills=3, rows=600, seed=7)


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="the full 20-kill soak runs with BATCHRUN_SLOW=1")
def test_twenty_sigkills_then_resume_lose_and_duplicate_nothing(tmp_path):
    _kill_and_resume(tmp_path, kills=20, rows=4000, seed=2026)
