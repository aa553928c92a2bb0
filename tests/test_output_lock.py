"""One writer per output folder: a second run is refused, naming the run that holds it; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from batchrun.errors import OutputError, OutputLockedError
from batchrun.holder import Holder
from batchrun.output import OutputLock, read_lock

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import sys
from batchrun.output.lock import OutputLock
lock = OutputLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


def write_record(root: Path, *, host: str, pid: int, heartbeat: datetime, since: str = "2026-11-30T00:12:03Z") -> None:
    (root / "state").mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host, "started": "123", "since": since,
              "heartbeat_at": heartbeat.isoformat().replace("+00:00", "Z")}  # fmt: skip
    (root / "state" / "lock").write_text(json.dumps(record))


@pytest.fixture
def lock(tmp_path: Path):
    held = OutputLock(tmp_path / "out")
    yield held
    held.release()


@pytest.fixture
def child(tmp_path: Path):
    """A second process that holds the lock of tmp_path/out until told to let go (or killed)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "out")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held", "the child never took the lock"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_an_output_locked_error_is_an_output_error_with_exit_code_2():
    assert issubclass(OutputLockedError, OutputError) and OutputLockedError.exit_code == 2


def test_a_second_acquisition_in_the_same_process_is_refused_naming_the_holder(tmp_path, lock):
    assert lock.acquire() is None
    with pytest.raises(OutputLockedError) as refused:
        OutputLock(tmp_path / "out").acquire()
    holder = refused.value.holder
    assert (holder.pid, holder.host) == (os.getpid(), socket.gethostname())
    assert str(refused.value) == (
        f"{tmp_path / 'out'} is being written by another batchrun run: pid {os.getpid()} on host "
        f"{socket.gethostname()}, since {holder.since}. Wait for it to finish, or stop it; "
        "a run is never started twice on one output."
    )


def test_the_lock_is_free_again_once_released_and_release_is_idempotent(tmp_path, lock):
    lock.acquire()
    lock.release()
    lock.release()
    with OutputLock(tmp_path / "out") as again:
        assert again.held and again.took_over is None, "a released lock leaves no record to take over"
    assert not again.held


def test_the_lock_file_names_its_holder_while_held(tmp_path, lock):
    lock.acquire()
    record = json.loads((tmp_path / "out" / "state" / "lock").read_text())
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    assert record["since"].endswith("Z") and record["heartbeat_at"]


def test_the_heartbeat_is_refreshed_while_held(tmp_path):
    path = tmp_path / "out" / "state" / "lock"
    with OutputLock(tmp_path / "out", heartbeat_s=0.01):
        first = json.loads(path.read_text())["heartbeat_at"]
        deadline = time.monotonic() + 10
        while json.loads(path.read_text() or "{}").get("heartbeat_at") == first:
            assert time.monotonic() < deadline, "the heartbeat never moved"
            time.sleep(0.01)


def test_another_process_holding_the_lock_is_refused_and_once_it_is_killed_its_lock_is_taken_over(
    tmp_path, child, lock
):
    with pytest.raises(OutputLockedError) as refused:
        lock.acquire()
    assert refused.value.holder.pid == child.pid
    assert f"pid {child.pid} on host {socket.gethostname()}" in str(refused.value)
    assert read_lock(tmp_path / "out").running

    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert not read_lock(tmp_path / "out").running
    stale = lock.acquire()
    assert stale is not None and stale.pid == child.pid and not stale.alive()
    assert lock.took_over == stale


def test_a_lock_released_by_another_process_is_free(tmp_path, child, lock):
    child.stdin.write("done\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "released"
    assert read_lock(tmp_path / "out") is None
    assert lock.acquire() is None


def test_a_record_from_another_host_with_a_fresh_heartbeat_is_refused(tmp_path, lock):
    write_record(tmp_path / "out", host="elsewhere.example", pid=4242, heartbeat=datetime.now(UTC))
    with pytest.raises(OutputLockedError, match=r"pid 4242 on host elsewhere\.example, since 2026-11-30T00:12:03Z"):
        lock.acquire()
    state = read_lock(tmp_path / "out")
    assert state.running and state.holder.host == "elsewhere.example"


def test_a_record_from_another_host_with_an_old_heartbeat_is_taken_over(tmp_path, lock):
    write_record(tmp_path / "out", host="elsewhere.example", pid=4242, heartbeat=datetime.now(UTC) - timedelta(hours=1))
    assert not read_lock(tmp_path / "out").running
    stale = lock.acquire()
    assert (stale.pid, stale.host) == (4242, "elsewhere.example")


def test_a_record_left_on_this_host_by_a_dead_run_is_taken_over(tmp_path, lock):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    write_record(tmp_path / "out", host=socket.gethostname(), pid=pid, heartbeat=datetime.now(UTC))
    stale = lock.acquire()
    assert stale == Holder(pid=pid, host=socket.gethostname(), started="123", since="2026-11-30T00:12:03Z")


def test_read_lock_says_who_runs_and_nothing_when_no_run_ever_held_it(tmp_path, lock):
    assert read_lock(tmp_path / "out") is None
    lock.acquire()
    state = read_lock(tmp_path / "out")
    assert state.running and state.holder.pid == os.getpid()
    lock.release()
    assert read_lock(tmp_path / "out") is None


def test_a_holder_is_alive_only_while_its_process_runs_with_the_same_start_time():
    me = Holder.current()
    assert me.alive() and me.is_this_process()
    assert me.describe() == f"pid {me.pid} on host {me.host}, since {me.since}"
    if me.started is not None:  # Linux: a reused pid has another start time
        reused = Holder(pid=me.pid, host=me.host, started=str(int(me.started) + 1), since=me.since)
        assert not reused.alive()
