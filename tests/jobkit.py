"""Helpers for whole-job tests: tiny inputs, specs written to disk, an emulator, and output readers."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import glob
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from batchrun.emulator import EmulatorConfig, EmulatorThread, EndpointConfig
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec

T = TypeVar("T")

TOKEN = "hf_jobtest_token_not_real_000"
NS = "jobs-test"
FAST_LIFECYCLE = {"pending_s": 0.05, "initializing_s": 0.1, "replica_start_s": 0.05}
REPO = Path(__file__).resolve().parent.parent


def write_topics(path: Path, n: int, *, empty_every: int | None = None) -> Path:
    """A Parquet input of ``n`` rows: id, topic. Every ``empty_every``-th topic is null."""
    topics = [f"topic number {i}" for i in range(n)]
    if empty_every:
        topics = [None if i % empty_every == 0 else t for i, t in enumerate(topics)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"row-{i:05d}" for i in range(n)], "topic": topics}), path)
    return path


def write_spec(tmp_path: Path, *, endpoint: dict[str, Any], input_path: Path, name: str = "job", **overrides: Any) -> Path:
    """A chat job spec on ``input_path`` with fast retries, written to tmp_path/NAME.yaml."""
    spec: dict[str, Any] = {
        "name": name,
        "task": "chat-completion",
        "input": {"parquet": str(input_path), "id_column": "id"},
        "prompt": {"template": "Write about {topic}.", "system": "Be brief."},
        "parameters": {"max_tokens": 12, "seed": 1},
        "endpoint": endpoint,
        "concurrency": {"max": 32, "initial": 8},
        "retries": {"max_attempts": 3, "backoff_base": 0.01, "backoff_cap": 0.05, "max_retry_after": 0.2},
        "request_timeout": "5s",
        "output": {"path": str(tmp_path / "out" / name), "shard_rows": 40},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            merged = {**spec[key], **value}
            spec[key] = {k: v for k, v in merged.items() if v is not None}  # None removes a default key
        else:
            spec[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(spec_path: Path, **options: Any):
    """Run a job in-process; returns (outcome, echoed lines)."""
    lines: list[str] = []
    opts = RunOptions(progress="off", handle_signals=False, echo=lines.append, poll_interval_s=0.02, **options)
    outcome = asyncio.run(run_job(load_spec(spec_path), opts))
    return outcome, lines


def emulator(*endpoints: EndpointConfig, token: str | None = TOKEN) -> EmulatorThread:
    return EmulatorThread(EmulatorConfig(token=token, endpoints=list(endpoints)))


def running_endpoint(name: str = "gen", **overrides: Any) -> EndpointConfig:
    values = {"name": name, "namespace": NS, "initial_state": "running", **FAST_LIFECYCLE, **overrides}
    return EndpointConfig.from_dict(values)


def paused_endpoint(name: str = "gen", **overrides: Any) -> EndpointConfig:
    """An emulated Dedicated endpoint that a job must resume (and pause again), with fast cold starts;
    ``initial_state`` may say another state to start from (``scaledToZero``)."""
    return running_endpoint(name, **{"initial_state": "paused", **overrides})


#: Control-plane calls that change an endpoint (GET only reads it).
STATE_CHANGING = ("PUT", "POST", "DELETE")


def read_ids(folder: Path, column: str = "id") -> list[Any]:
    ids: list[Any] = []
    for file in sorted(glob.glob(str(folder / "*.parquet"))):
        ids.extend(pq.read_table(file, columns=[column]).column(column).to_pylist())
    return ids


def read_rows(folder: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for file in sorted(glob.glob(str(folder / "*.parquet"))):
        rows.extend(pq.read_table(file).to_pylist())
    return rows


def data_requests(emu: EmulatorThread, name: str = "gen") -> int:
    return emu.stats()["endpoints"][f"{NS}/{name}"]["requests"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `batchrun ARGS` in this process, as `batchrun.cli.main([...])`, from the repo root.

    What a user sees is the same as from `python -m batchrun` (exit code, stdout, stderr), without starting
    a Python: the command's environment is ``env`` over this one's for the length of the call. A command
    still running after ``timeout`` seconds ends this test process (faulthandler dumps every thread's
    traceback as it goes), so a hang fails the run instead of blocking it, as a subprocess's timeout did.
    Tests that need a process of its own (signals, kills, two processes, the console script) use
    :func:`cli_process`.
    """
    from batchrun.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = {key: os.environ.get(key) for key in (env or {})}
    saved_cwd = os.getcwd()
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    os.environ.update(env or {})
    os.chdir(REPO)
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse: a usage error, or --help
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
    finally:
        faulthandler.cancel_dump_traceback_later()
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        root.handlers[:], level = saved_logging
        root.setLevel(level)
    return subprocess.CompletedProcess(["batchrun", *args], code, out.getvalue(), err.getvalue())


def cli_process(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m batchrun ARGS` as a process of its own, as a user would, from the repo root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """``with reaped(start_run(...)) as proc``: a process the block leaves running is killed and waited for."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def start_run(spec_path: Path, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``batchrun run SPEC --progress off ARGS`` as a process of its own (to kill), its stderr in ``log``."""
    with open(log, "w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "batchrun", "run", str(spec_path), "--progress", "off", *args],
                                cwd=REPO, env={**os.environ, "HF_TOKEN": TOKEN, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=stderr)


# ------------------------------------------------------------------------------------- waiting for events
# Tests never sleep to let something happen: they wait for it to be observed, with a bounded poll.
# The timeouts are generous limits against a hang, not expectations of speed.

POLL_S = 0.01


def _early_exit(proc: subprocess.Popen | None, log: Path | None = None) -> str | None:
    """Why waiting is pointless: the process being watched has exited (with its stderr), or None.

    The stderr is read from ``proc.stderr`` when it is a pipe, else from the file ``log``.
    """
    if proc is None or proc.poll() is None:
        return None
    stderr = ""
    if log is not None:
        stderr = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    elif proc.stderr is not None:
        try:
            stderr = proc.stderr.read() or ""
        except (OSError, ValueError):
            stderr = "(stderr unreadable)"
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    return f"the process exited early with {proc.returncode}; stderr:\n{stderr[-4000:]}"


def wait_until(predicate: Callable[[], T], *, timeout: float = 60.0, proc: subprocess.Popen | None = None,
               what: str = "the condition", interval: float = POLL_S, log: Path | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Fails with a message naming ``what`` was awaited after ``timeout`` seconds, or as soon as ``proc``
    (when given) has exited without the condition holding, with its stderr (or the file ``log``).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        exited = _early_exit(proc, log)
        if exited is not None:
            value = predicate()  # it may have happened just before the exit
            if value:
                return value
            raise AssertionError(f"waiting for {what}: {exited}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"waiting for {what}: not seen after {timeout:g} s")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], T], *, limit_s: float = 30.0, what: str = "the condition",
                           interval: float = POLL_S) -> T:
    """:func:`wait_until` for a coroutine: polls without blocking the event loop."""
    deadline = time.monotonic() + limit_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waiting for {what}: not seen after {limit_s:g} s")
        await asyncio.sleep(interval)


async def wait_for_async(check: Callable[[], Awaitable[T]], *, limit_s: float = 30.0, what: str = "the condition",
                         interval: float = POLL_S) -> T:
    """Like :func:`wait_until_async` for an async check (e.g. one that makes a request)."""
    deadline = time.monotonic() + limit_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waiting for {what}: not seen after {limit_s:g} s")
        await asyncio.sleep(interval)


def state_dir(out_dir: Path, shard: str | None = None) -> Path:
    """``OUT/state``, or a split job's shard's: ``OUT/state/shards/shard-00001-of-00004``."""
    return Path(out_dir) / "state" / "shards" / shard if shard else Path(out_dir) / "state"


def manifest_events(out_dir: Path, shard: str | None = None) -> list[dict[str, Any]]:
    """The events of ``OUT/state/manifest.jsonl`` (or a shard's); a last line torn mid-write is ignored."""
    try:
        raw = (state_dir(out_dir, shard) / "manifest.jsonl").read_bytes()
    except FileNotFoundError:
        return []
    lines = [line for line in raw.split(b"\n") if line.strip()]
    events: list[dict[str, Any]] = []
    for index, line in enumerate(lines):
        try:
            event = json.loads(line)
        except ValueError:
            if index == len(lines) - 1:
                break  # torn by a crash, or still being written: it does not count yet
            raise
        events.append(event)
    return events


def committed_rows(out_dir: Path, shard: str | None = None) -> int:
    """Rows in the shards the manifest lists now: published, not retired or replaced since."""
    listed: dict[str, int] = {}
    for event in manifest_events(out_dir, shard):
        if event.get("op") == "publish":
            listed[event["file"]] = int(event["rows"])
            if event.get("replaces"):
                listed.pop(event["replaces"], None)
        elif event.get("op") == "retire":
            listed.pop(event["file"], None)
    return sum(listed.values())


def wait_for_committed(out_dir: Path, n: int, proc: subprocess.Popen | None = None, *, timeout: float = 120.0,
                       log: Path | None = None, shard: str | None = None) -> int:
    """Wait until the manifest (a shard's, with ``shard``) lists at least ``n`` committed rows; returns how many."""
    def enough() -> int:
        rows = committed_rows(out_dir, shard)
        return rows if rows >= n else 0

    return wait_until(enough, timeout=timeout, proc=proc, log=log,
                      what=f"{n} committed rows in {state_dir(out_dir, shard)}/manifest.jsonl")


def two_running_with_rows(procs: Mapping[int, subprocess.Popen], committed: Callable[[int], int], n: int, *,
                          timeout: float = 120.0) -> tuple[int, int]:
    """The first two processes seen still running with at least ``n`` rows committed (``committed(i)``).

    For a test that stops two of several shards mid-run: chosen when both are seen sending, rather than
    named beforehand, so that on a slow machine neither has already finished when its signal comes.
    """
    def two() -> tuple[int, int] | None:
        failed = {i: proc.returncode for i, proc in procs.items() if proc.poll() not in (None, 0)}
        assert not failed, f"shards exited before any was stopped: {failed}"
        found = [i for i, proc in procs.items() if proc.poll() is None and committed(i) >= n]
        return (found[0], found[1]) if len(found) >= 2 else None

    chosen = wait_until(two, timeout=timeout, what=f"two shards still running with {n} rows committed")
    assert chosen is not None
    return chosen


def wait_for_requests(emu: EmulatorThread, n: int, proc: subprocess.Popen | None = None, *, name: str = "gen",
                      timeout: float = 120.0) -> int:
    """Wait until the emulated endpoint ``name`` has seen at least ``n`` data-plane requests."""
    def enough() -> int:
        seen = data_requests(emu, name)
        return seen if seen >= n else 0

    return wait_until(enough, timeout=timeout, proc=proc, what=f"{n} data-plane requests at {NS}/{name}")


def wait_for_control_call(emu: EmulatorThread, method: str, path_end: str, proc: subprocess.Popen | None = None, *,
                          after: int = 0, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the emulator's control log holds a ``method`` call on a path ending ``path_end``; returns it.

    ``after``: ignore the first ``after`` entries of the log (calls made before the awaited step).
    """
    def seen() -> dict[str, Any] | None:
        log = emu.control_log[after:]
        return next((e for e in log if e["method"] == method and e["path"].endswith(path_end)), None)

    return wait_until(seen, timeout=timeout, proc=proc, what=f"a {method} ...{path_end} in the control log")
