"""A million rows: peak memory against the row count, and how soon a resumed run sends again.

Every job is the real command, ``python -m batchrun run JOB --progress off``, in a child process of
its own, against the batchrun emulator in another process (one chat endpoint on a fixed loopback
port, no latency, room for 4,096 requests at once). The input is generated: string ids
(``row-0000000``) and tiny prompts, one Parquet file, row groups of 64k rows.

1. memory: the same spec on N rows (``input.limit``), for each N given. The child's peak RSS is its
   ``ru_maxrss`` (from ``os.wait4``, the rusage of the child alone); meanwhile its RSS is sampled
   from ``/proc/<pid>/status`` every 0.5 s, with the rows published so far (from the manifest),
   to see what, if anything, grows.
2. resume: a job on N rows is killed (SIGKILL) once the manifest lists about 90% of them; its output
   folder is kept as a snapshot. Each repeat copies the snapshot, starts a fresh emulator on the same
   port, and runs the job again: the figure is the emulator's first inference request minus the
   moment just before the child process was started. The child logs when each step before the first
   request ended (imports, opening the input, the fingerprint, the duplicate-id scan, the endpoint
   check, opening the output, the reader's first pending row), so the figure can be read as a sum.
   With --finish, each resumed run is let finish and the output is checked: every id exactly once
   (otherwise it is killed once its first request is seen; tests/test_kill_resume.py checks that).

    .venv/bin/python benchmarks/million_rows.py --only memory --rows 100000 1000000
    .venv/bin/python benchmarks/million_rows.py --only resume --rows 1000000 --repeats 3

Generated files live under --workdir (default: a temporary folder) and are deleted at the end,
unless --keep: then a later ``--only resume`` with the same --workdir reuses the killed run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

TOKEN = "hf_benchmark_token_not_real"
NS = "bench"
NAME = "chat"
ROW_GROUP = 65_536


# --------------------------------------------------------------------------------------------------
# The emulator, in its own process, on a fixed port (the url is part of the job's identity)


def _serve(port: int, conn: Any) -> None:
    from batchrun.emulator import EmulatorConfig, EndpointConfig, serve

    endpoint = EndpointConfig.from_dict({
        "name": NAME, "namespace": NS, "initial_state": "running", "max_concurrent_requests": 4096, "port": port,
    })  # fmt: skip

    def ready(emu: Any) -> None:
        conn.send({"control": emu.control_url, "url": emu.endpoint_url(NS, NAME)})

    asyncio.run(serve(EmulatorConfig(token=TOKEN, endpoints=[endpoint]), ready=ready))


class Emulator:
    def __init__(self, port: int) -> None:
        self.port = port

    def __enter__(self) -> Emulator:
        parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=_serve, args=(self.port, child), daemon=True)
        self.process.start()
        urls = parent.recv()
        self.control, self.url = urls["control"], urls["url"]
        return self

    def stats(self) -> dict:
        import urllib.request

        request = urllib.request.Request(f"{self.control}/emulator/stats",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request) as response:
            return json.load(response)["endpoints"][f"{NS}/{NAME}"]

    def __exit__(self, *exc: Any) -> None:
        self.process.terminate()
        self.process.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# Input, spec, output


def write_input(path: Path, rows: int) -> None:
    schema = pa.schema([("id", pa.string()), ("topic", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            writer.write_table(pa.table({
                "id": [f"row-{i:07d}" for i in range(start, start + n)],
                "topic": [f"t{i % 997}" for i in range(start, start + n)],
            }, schema=schema))  # fmt: skip


def write_spec(folder: Path, url: str, input_path: Path, rows: int, name: str) -> Path:
    spec = {
        "name": name,
        "task": "chat-completion",
        "input": {"parquet": str(input_path), "id_column": "id", "limit": rows},
        "prompt": {"template": "Say {topic}."},
        "parameters": {"max_tokens": 4, "seed": 1},
        "endpoint": {"url": url},
        "concurrency": {"max": 64, "initial": 64},
        "retries": {"max_attempts": 5},
        "request_timeout": "30s",
        "output": {"path": str(folder / f"out-{name}")},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def published_rows(output: Path) -> int:
    """Rows the manifest lists as published (data and failed), replayed from its lines."""
    listed: dict[str, int] = {}
    try:
        lines = (output / "state" / "manifest.jsonl").read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written
        if event.get("op") == "publish":
            listed[event["file"]] = int(event["rows"])
            listed.pop(event.get("replaces") or "", None)
        elif event.get("op") == "retire":
            listed.pop(event["file"], None)
    return sum(listed.values())


def check_exactly_once(output: Path, rows: int) -> str:
    ids = []
    for folder in ("data", "failed"):
        for path in sorted((output / folder).glob("*.parquet")):
            ids.extend(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    unique = len(set(ids))
    assert len(ids) == rows, (len(ids), rows)
    assert unique == rows, (unique, rows)
    return f"{rows} records, every id once"


# --------------------------------------------------------------------------------------------------
# The job in a child process: the real CLI, with a log of when each step before dispatch ended


STEPS = [  # (module, object, attribute, label)
    ("batchrun.preflight", None, "open_source", "open the input"),
    ("batchrun.sources", "ParquetSource", "fingerprint", "fingerprint"),
    ("batchrun.preflight", None, "_check_unique_ids", "duplicate-id scan"),
    ("batchrun.preflight", None, "_render_first_rows", "render the first rows"),
    ("batchrun.preflight", None, "_check_endpoint", "endpoint check"),
    ("batchrun.runner", None, "preflight", "preflight (all)"),
    ("batchrun.output.sink", "ParquetSink", "open", "open the output (done-set)"),
    ("batchrun.reader", "PendingRows", "has_pending", "first pending row"),
]


def _child(spec: str, log_path: str) -> int:
    """Run ``batchrun run`` with each step of STEPS timed (wall clock), appended to ``log_path``."""
    import functools
    import importlib
    import inspect

    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def note(label: str) -> None:
        log.write(json.dumps({"step": label, "t": time.time()}) + "\n")

    note("imports start")
    from batchrun.cli import main

    note("imports done")
    for module_name, owner_name, attribute, label in STEPS:
        module = importlib.import_module(module_name)
        owner = getattr(module, owner_name) if owner_name else module
        original = getattr(owner, attribute)
        if inspect.iscoroutinefunction(original):
            async def timed_async(*a: Any, _f: Any = original, _l: str = label, **k: Any) -> Any:
                result = await _f(*a, **k)
                note(_l)
                return result
            wrapper: Any = functools.wraps(original)(timed_async)
        else:
            def timed(*a: Any, _f: Any = original, _l: str = label, **k: Any) -> Any:
                result = _f(*a, **k)
                note(_l)
                return result
            wrapper = functools.wraps(original)(timed)
        setattr(owner, attribute, wrapper)
    return main(["run", spec, "--progress", "off"])


def start_job(spec: Path, log: Path) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "HF_TOKEN": TOKEN}
    started = time.time()
    with open(log.with_suffix(".err"), "ab") as err:
        process = subprocess.Popen([sys.executable, __file__, "--child", str(spec), str(log)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=err)
    return process, started


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def watch(process: subprocess.Popen, output: Path, *, every_s: float = 0.5, kill_at_rows: int | None = None
          ) -> tuple[int, float | None, list[tuple[float, float, int]]]:
    """Sample the child's RSS until it ends (or SIGKILL it once ``kill_at_rows`` are published).

    Returns its exit status, its peak RSS in MiB (``ru_maxrss`` from wait4), and the samples.
    """
    started = time.monotonic()
    samples: list[tuple[float, float, int]] = []
    last = 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_maxrss / 1024, samples
        now = time.monotonic()
        rows = published_rows(output) if kill_at_rows is not None or now - last >= every_s else 0
        if now - last >= every_s:
            rss = _rss_mib(process.pid)
            if rss is not None:
                samples.append((now - started, rss, rows))
            last = now
        if kill_at_rows is not None and rows >= kill_at_rows:
            os.kill(process.pid, signal.SIGKILL)
            kill_at_rows = None
        time.sleep(0.05)


def _trend(samples: list[tuple[float, float, int]]) -> str:
    if not samples:
        return "no samples"
    picks = [samples[int(f * (len(samples) - 1))] for f in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)]
    return ", ".join(f"{t:.0f}s {rss:.0f}MiB@{rows // 1000}k" for t, rss, rows in picks)


# --------------------------------------------------------------------------------------------------
# The benchmarks


def memory(work: Path, row_counts: list[int], repeats: int) -> None:
    input_path = work / "input.parquet"
    write_input(input_path, max(row_counts))
    with Emulator(_free_port()) as emu:
        for repeat in range(repeats):
            peaks = {}
            for rows in row_counts:
                spec = write_spec(work, emu.url, input_path, rows, f"mem{rows}")
                process, _ = start_job(spec, work / "mem.log")
                code, peak, samples = watch(process, work / f"out-mem{rows}")
                assert code == 0, (code, (work / "mem.err").read_text()[-2000:])
                wall = samples[-1][0] if samples else 0.0
                peaks[rows] = peak
                print(f"  run {repeat + 1}: {rows:>9,} rows: peak RSS {peak:.0f} MiB, ~{wall:.0f} s "
                      f"({rows / max(wall, 1e-9):.0f} rows/s); RSS over time: {_trend(samples)}", flush=True)
                shutil.rmtree(work / f"out-mem{rows}")
            if len(row_counts) > 1:
                small, big = min(row_counts), max(row_counts)
                print(f"  run {repeat + 1}: peak {big:,} / peak {small:,} = {peaks[big] / peaks[small]:.3f}", flush=True)


def resume(work: Path, rows: int, repeats: int, kill_share: float, finish: bool) -> None:
    input_path = work / "input.parquet"
    output = work / "out-resume"
    snapshot = work / "snapshot"
    spec = work / "resume.yaml"
    if snapshot.is_dir():  # a kept --workdir: the killed run is reused (the input is the same file)
        port = int(yaml.safe_load(spec.read_text())["endpoint"]["url"].rsplit(":", 1)[1])
        print(f"  reusing the killed run in {snapshot} ({published_rows(snapshot):,} rows published)")
    else:
        write_input(input_path, rows)
        port = _free_port()
        with Emulator(port) as emu:
            spec = write_spec(work, emu.url, input_path, rows, "resume")
            process, _ = start_job(spec, work / "first.log")
            code, peak, samples = watch(process, output, kill_at_rows=int(rows * kill_share))
            killed_at = published_rows(output)
            print(f"  first run: SIGKILL (exit {code}) with {killed_at:,} of {rows:,} rows published "
                  f"({killed_at / rows:.1%}); RSS over time: {_trend(samples)}", flush=True)
        shutil.copytree(output, snapshot)
    for repeat in range(repeats):
        shutil.rmtree(output)
        shutil.copytree(snapshot, output)
        log = work / f"resume{repeat}.log"
        log.unlink(missing_ok=True)
        with Emulator(port) as emu:
            process, started = start_job(spec, log)
            first = None
            while first is None and not os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                first = emu.stats()["first_request_at"]
                time.sleep(0.01)
            if not finish and first is not None:
                os.kill(process.pid, signal.SIGKILL)  # the figure is taken; the rest is the tests' to check
            code, peak, _ = watch(process, output)
        assert first is not None, log.with_suffix(".err").read_text()[-2000:]
        assert code == 0 or not finish, (code, log.with_suffix(".err").read_text()[-2000:])
        steps = [json.loads(line) for line in log.read_text().splitlines()]
        parts = ", ".join(f"{s['step']} {s['t'] - started:.2f}" for s in steps if s["t"] <= first)
        checked = check_exactly_once(output, rows) if finish else "killed after its first request"
        print(f"  resume {repeat + 1}: first request {first - started:.2f} s after process start "
              f"[{parts}]; peak RSS {peak:.0f} MiB; {checked}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["memory", "resume"], default=None)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kill-at", type=float, default=0.9, help="the share of rows published before SIGKILL")
    parser.add_argument("--workdir", default=None, help="where generated files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep --workdir (input, killed-run snapshot) so that another --only resume reuses it")
    parser.add_argument("--finish", action="store_true",
                        help="let each resumed run finish and check every id is in the output once "
                        "(default: SIGKILL it once its first request is seen)")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(_child(*args.child))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="million-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "memory"):
            print(f"memory: peak RSS of whole jobs, rows {args.rows}", flush=True)
            memory(work, args.rows, args.repeats)
        if args.only in (None, "resume"):
            print(f"resume: {max(args.rows):,} rows, SIGKILL at {args.kill_at:.0%}, then run again", flush=True)
            resume(work, max(args.rows), args.repeats, args.kill_at, args.finish)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
