"""The client ceiling: a whole `batchrun run` job against a bare aiohttp loop, at zero server latency.

Both clients send the same N chat (or text-generation) requests at concurrency 64 to the SAME stand-in
server: a plain aiohttp app in its own process (not the emulator, so that the server is cheap) that
answers at once with a canned body, counts the inference requests and records when it saw the first
and the last. Throughput is rows over that server-side span, so the job's start-up (imports, preflight,
opening the output) and its end (the last commit, the summary) are left out: what remains is the
per-row cost of each client. Each client runs in a fresh interpreter, interleaved, ``--repeats`` times.

    .venv/bin/python benchmarks/client_ceiling.py                          # 20,000 chat rows, 3 repeats
    .venv/bin/python benchmarks/client_ceiling.py --task text-generation --rows 20000 --repeats 2
    .venv/bin/python benchmarks/client_ceiling.py --before /tmp/base   # also an older tree, side by side

For profiling, ``--serve PORT`` runs the server alone in the foreground, and ``--write-job DIR --url URL``
writes the job (spec and input) that the benchmark runs, e.g. for
``py-spy record -f raw -o /tmp/prof.txt -- .venv/bin/python -m batchrun run DIR/job.yaml --progress off``.

Two bare loops are measured. ``bare_aiohttp`` (the reference of the ratios) gathers one task per row, so
that every row's task is created, builds its payload and waits on a semaphore before the server sees
the first request: that share of its per-row work falls outside the server's span. ``bare_workers``
is the same loop as a pool of ``concurrency`` workers pulling row numbers (what a script must do to
keep memory flat on a large input, as batchrun does); it builds each payload within the span. The
ratios over it are reported too (``over_bare_workers_median``).

The server's own CPU time over the span is reported too: near 1.0 means the server, not the client,
held the pace, and the ratio then says little. On a shared machine the span also stretches with the
other work that takes the cores, so the client's CPU time within the span is sampled from /proc as
well: rows per client CPU-second is the throughput each client would reach with a core of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

TOKEN = "hf_benchmark_token_not_real"
CHAT_ROUTE = "/v1/chat/completions"
_CHAT_ANSWER = json.dumps({
    "object": "chat.completion", "id": "", "created": 0, "model": "tgi",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 16}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20},
}).encode()  # fmt: skip
_TEXT_ANSWER = json.dumps(
    [{"generated_text": "x " * 16, "details": {"finish_reason": "length", "generated_tokens": 16}}]
).encode()

# ------------------------------------------------------------------------------------------ the server


class _Counts:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cpu_at_first: float | None = None
        self.cpu_at_last: float | None = None


def _app() -> web.Application:
    counts = _Counts()

    def answer(body: bytes) -> web.Response:
        now = time.perf_counter()
        if counts.first is None:
            counts.first, counts.cpu_at_first = now, time.process_time()
        counts.requests += 1
        counts.last, counts.cpu_at_last = now, time.process_time()
        return web.Response(body=body, content_type="application/json", headers={"x-prompt-tokens": "4"})

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return answer(_CHAT_ANSWER)

    async def text(request: web.Request) -> web.Response:
        await request.read()
        return answer(_TEXT_ANSWER)

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"model_id": "stand-in", "model_sha": None})

    async def stats(request: web.Request) -> web.Response:
        span = (counts.last - counts.first) if counts.first is not None and counts.last is not None else None
        cpu = (counts.cpu_at_last - counts.cpu_at_first) if span else None
        return web.json_response({"requests": counts.requests, "span_s": span, "server_cpu_s": cpu,
                                  "first": counts.first, "last": counts.last})

    async def reset(request: web.Request) -> web.Response:
        counts.reset()
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/", text)
    app.router.add_post(CHAT_ROUTE, chat)
    app.router.add_get("/info", info)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_reset", reset)
    return app


def _serve(port: int, conn: multiprocessing.connection.Connection | None, cpu: int | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})

    async def main() -> None:
        runner = web.AppRunner(_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        if conn is not None:
            conn.send(url)
        else:
            print(url, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _control(url: str, what: str) -> dict:
    async with aiohttp.ClientSession() as http:
        if what == "reset":
            async with http.post(f"{url}/_reset") as response:
                return await response.json()
        async with http.get(f"{url}/_stats") as response:
            return await response.json()


# ------------------------------------------------------------------------------------------ the clients


def _prompt(i: int) -> str:
    return f"Write about topic {i % 997}."


def write_job(folder: Path, url: str, rows: int, concurrency: int, task: str) -> Path:
    """The batchrun job of the benchmark: ``rows`` prompts in Parquet, a ``job.yaml`` next to them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    input_path = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "topic": [f"topic {i % 997}" for i in range(rows)]}), input_path)
    parameters = {"max_tokens": 16, "seed": 1} if task == "chat-completion" else {"max_new_tokens": 16, "seed": 1}
    spec = {
        "name": "ceiling",
        "task": task,
        "input": {"parquet": str(input_path), "id_column": "id"},
        "prompt": {"template": "Write about {topic}."},
        "parameters": parameters,
        "endpoint": {"url": url},
        "concurrency": {"max": concurrency, "initial": concurrency},
        "request_timeout": "30s",
        "output": {"path": str(folder / "out")},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _payload(task: str, i: int) -> tuple[str, dict]:
    """What batchrun's task sends for row ``i``, byte for byte in content."""
    if task == "chat-completion":
        return CHAT_ROUTE, {"model": "tgi", "max_tokens": 16, "seed": 1,
                            "messages": [{"role": "user", "content": _prompt(i)}]}  # fmt: skip
    return "/", {"inputs": _prompt(i), "parameters": {"max_new_tokens": 16, "seed": 1, "details": True}}


async def bare(url: str, task: str, rows: int, concurrency: int) -> int:
    """The thinnest client: one session, a semaphore, one task per request, the answer read as JSON."""
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def one(i: int) -> None:
            nonlocal ok
            path, payload = _payload(task, i)
            async with semaphore, http.post(url + path, json=payload) as response:
                body = await response.read()
                if response.status == 200:
                    json.loads(body)
                    ok += 1

        await asyncio.gather(*(one(i) for i in range(rows)))
    return ok


async def bare_workers(url: str, task: str, rows: int, concurrency: int) -> int:
    """The same loop as ``concurrency`` workers pulling row numbers: each payload is built when its row is sent."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    ok = 0
    todo = iter(range(rows))
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def worker() -> None:
            nonlocal ok
            for i in todo:
                path, payload = _payload(task, i)
                async with http.post(url + path, json=payload) as response:
                    body = await response.read()
                    if response.status == 200:
                        json.loads(body)
                        ok += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok


_BARE_LOOPS = {"gather": bare, "workers": bare_workers}
_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    """The CPU time (user + system, every thread) a running process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The client's CPU time at ``when``, interpolated between the samples around it."""
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t0 <= when <= t1:
            return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c0
    return samples[0][1] if when < samples[0][0] else samples[-1][1]


def _client_run(command: list[str], url: str, env: dict[str, str], cpu: int | None = None, cwd: str | None = None) -> dict:
    """Run one client in a fresh interpreter: the server's figures, the wall time, the client's CPU time
    (all of it, and the part spent within the server's span, from /proc sampled every 20 ms)."""
    asyncio.run(_control(url, "reset"))
    started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=pin, cwd=cwd
    )
    samples: list[tuple[float, float]] = []

    def sample() -> None:  # perf_counter is CLOCK_MONOTONIC: the server's clock too
        while process.poll() is None:
            cpu = _cpu_s(process.pid)
            if cpu is not None:
                samples.append((time.perf_counter(), cpu))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    if process.returncode != 0:
        raise SystemExit(f"{command} failed ({process.returncode}):\n{stderr[-3000:]}")
    stats = asyncio.run(_control(url, "stats"))
    first, last = stats["first"], stats["last"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {**stats, "wall_s": wall, "cpu_s": cpu, "cpu_in_span_s": _cpu_at(samples, last) - _cpu_at(samples, first),
            "cpu_before_span_s": _cpu_at(samples, first)}


def _package_of(env: dict[str, str]) -> str:
    """Where a client started with ``env`` (from a neutral folder, as the runs are) imports batchrun from."""
    with tempfile.TemporaryDirectory() as tmp:
        found = subprocess.run([sys.executable, "-c", "import batchrun; print(batchrun.__file__)"], env=env, cwd=tmp,
                               capture_output=True, text=True, check=True)
    return str(Path(found.stdout.strip()).parent)


def measure(rows: int, concurrency: int, repeats: int, task: str, before: str | None = None, pin: bool = False) -> dict:
    """Interleaved runs of each client against one server; ``before`` is another batchrun source tree.

    ``pin``: the server on CPU 0 and every client on CPU 1, so that they never share a core.
    """
    server_cpu, client_cpu = (0, 1) if pin else (None, None)
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(0, child, server_cpu), daemon=True)
    server.start()
    url = parent.recv()
    env = {**os.environ, "HF_TOKEN": TOKEN}
    clients = {"batchrun": env}
    if before is not None:  # that tree's batchrun package comes first on the path (absolute: clients run elsewhere)
        path = os.pathsep.join(filter(None, [str(Path(before).resolve()), env.get("PYTHONPATH")]))
        clients["batchrun_before"] = {**env, "PYTHONPATH": path}
    # `python -m` puts the working directory first on the path: each client runs from a folder of its own,
    # or a run from the repository would import the repository's batchrun whatever PYTHONPATH says.
    packages = {name: _package_of(client_env) for name, client_env in clients.items()}
    if before is not None and packages["batchrun_before"] == packages["batchrun"]:
        raise SystemExit(f"--before {before}: the older client would import {packages['batchrun']}, the same "
                         "package as the current one; give the folder that holds the older batchrun/")
    runs: dict[str, list[dict]] = {name: [] for name in (*clients, "bare_aiohttp", "bare_workers")}

    def bare_command(loop: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--bare", url, "--bare-loop", loop, "--task", task,
                "--rows", str(rows), "--concurrency", str(concurrency)]  # fmt: skip

    try:
        for _ in range(repeats):  # interleaved: drift on a noisy machine hits every client alike
            for name, client_env in clients.items():
                with tempfile.TemporaryDirectory() as tmp:
                    job = write_job(Path(tmp), url, rows, concurrency, task)
                    command = [sys.executable, "-m", "batchrun", "run", str(job), "--progress", "off"]
                    runs[name].append(_client_run(command, url, client_env, client_cpu, cwd=tmp))
            runs["bare_aiohttp"].append(_client_run(bare_command("gather"), url, env, client_cpu))
            runs["bare_workers"].append(_client_run(bare_command("workers"), url, env, client_cpu))
    finally:
        server.terminate()
        server.join(5)
    for name, results in runs.items():
        for result in results:
            assert result["requests"] == rows, (name, result)
    rates = {name: [rows / r["span_s"] for r in results] for name, results in runs.items()}
    ratios = {name: [b / a for b, a in zip(rates[name], rates["bare_aiohttp"], strict=True)] for name in clients}
    over_workers = {name: [b / a for b, a in zip(rates[name], rates["bare_workers"], strict=True)]
                    for name in clients}
    # Rows per CPU-second of the client within the span: the throughput each would reach with a core
    # of its own, which a shared machine's load does not move.
    per_cpu = {name: [rows / r["cpu_in_span_s"] for r in results] for name, results in runs.items()}
    cpu_ratios = {
        name: [b / a for b, a in zip(per_cpu[name], per_cpu["bare_aiohttp"], strict=True)] for name in clients
    }
    return {
        "benchmark": "client_ceiling", "task": task, "rows": rows, "concurrency": concurrency, "repeats": repeats,
        "pinned": pin,
        "batchrun_packages": packages,
        "server_latency_s": 0.0,
        "rows_per_s_over_server_span": {k: [round(v) for v in values] for k, values in rates.items()},
        "over_bare_each_repeat": {k: [round(r, 3) for r in values] for k, values in ratios.items()},
        "over_bare_median": {k: round(statistics.median(values), 3) for k, values in ratios.items()},
        "over_bare_workers_each_repeat": {k: [round(r, 3) for r in values] for k, values in over_workers.items()},
        "over_bare_workers_median": {k: round(statistics.median(values), 3) for k, values in over_workers.items()},
        "rows_per_client_cpu_s_in_span": {k: [round(v) for v in values] for k, values in per_cpu.items()},
        "per_cpu_over_bare_each_repeat": {k: [round(r, 3) for r in values] for k, values in cpu_ratios.items()},
        "per_cpu_over_bare_median": {k: round(statistics.median(values), 3) for k, values in cpu_ratios.items()},
        "client_cpu_share_of_span": {
            k: [round(r["cpu_in_span_s"] / r["span_s"], 2) for r in results] for k, results in runs.items()
        },
        "server_cpu_share_of_span": {
            k: [round(r["server_cpu_s"] / r["span_s"], 2) for r in results] for k, results in runs.items()
        },
        "wall_s": {k: [round(r["wall_s"], 2) for r in results] for k, results in runs.items()},
        # Before the server saw the first request: start-up, and whatever per-row work a client does up front.
        "client_cpu_before_span_s": {k: [round(r["cpu_before_span_s"], 2) for r in results] for k, results in runs.items()},
        # The whole process, start-up included: steadier than the span on a busy machine.
        "client_cpu_s": {k: [round(r["cpu_s"], 2) for r in results] for k, results in runs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["chat-completion", "text-generation"], default="chat-completion")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", type=int, metavar="PORT", help="run the stand-in server alone (0: any port)")
    parser.add_argument("--write-job", metavar="DIR", help="write the benchmark's job for --url into DIR")
    parser.add_argument("--url", help="the server, for --write-job")
    parser.add_argument("--before", metavar="SRC", help="also run the batchrun package of this source tree "
                        "(e.g. `git archive COMMIT | tar -x -C SRC`), interleaved with the others")
    parser.add_argument("--pin", action="store_true", help="server on CPU 0, clients on CPU 1")
    parser.add_argument("--bare", metavar="URL", help=argparse.SUPPRESS)  # one bare-client run (a subprocess)
    parser.add_argument("--bare-loop", choices=sorted(_BARE_LOOPS), default="gather", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args.serve, None)
    elif args.write_job:
        print(write_job(Path(args.write_job), args.url, args.rows, args.concurrency, args.task))
    elif args.bare:
        ok = asyncio.run(_BARE_LOOPS[args.bare_loop](args.bare, args.task, args.rows, args.concurrency))
        assert ok == args.rows, ok
    else:
        print(json.dumps(measure(args.rows, args.concurrency, args.repeats, args.task, args.before, args.pin), indent=1))


if __name__ == "__main__":
    main()
