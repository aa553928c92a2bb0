"""The adaptive concurrency limit in whole `batchrun` jobs: does it find, and follow, an endpoint's capacity?

Each scenario runs a complete job in-process (`run_job`: spec, preflight, dispatch, Parquet out), so
start-up is part of what the server sees. The server runs in its own process, on loopback.

1. hidden: a small aiohttp stand-in for TGI (not batchrun's emulator): 2 replicas x 32 slots = 64
   in flight, 100 ms each, an instant 429 `{"error":"Model is overloaded","error_type":"overloaded"}`
   (no Retry-After) past 64. 4,000 rows, `concurrency.max: 512`, the default initial. Figure:
   rows / (first request arrived .. last answer sent, as the server saw it) / (64 / 0.1 s); and the
   share of requests answered 429.
   told: the same job told the capacity (`concurrency: {max: 64, initial: 64}`): no slow start, no
   probe, no 429.
   bare: no batchrun at all, a bare aiohttp loop of exactly 64 workers, each sending as soon as its
   last answer is in: what any client that knows the capacity reaches against this server on this
   machine. Each answer's round trip costs the stand-in's own handling, its timer's rounding (epoll
   counts in whole milliseconds) and two wake-ups across processes, so at 100 ms even this loop stays
   near 0.93-0.94 of slots / latency; at 500 ms (`--latency 0.5`) those costs weigh five times less.
   Run with `bare`, the benchmark ends with each scenario's median as a share of bare's.
2. replicas: the emulator, 1 replica of 16 slots (100 ms); once the job runs, the benchmark raises
   the endpoint to 4 replicas through the control plane (they become ready one a second); the job is
   told nothing. Figure: seconds from the last replica being ready to the first 1 s window served at
   >= 0.90 of the new capacity (640 rows/s); and the fraction served over the 10 s after it.
3. lose: the emulator, 2 replicas x 32 slots; a `lose_replica` episode 3 s into the job (the replica
   takes 60 s to come back). Figure: seconds from the loss to the first 1 s window whose 429 share is
   under 2%; and the fraction of the remaining capacity served afterwards.
4. two: two stand-ins of 48 and 16 slots (100 ms) as one job's `endpoint:` list, 8,000 rows. Figure:
   rows / (the first request either saw .. the last answer either sent) / (64 / 0.1 s); the 429 share,
   and each endpoint's rows and peak in flight (each capacity found on its own).

    .venv/bin/python benchmarks/capacity.py                  # all four (not told)
    .venv/bin/python benchmarks/capacity.py --only hidden --repeat 3
    .venv/bin/python benchmarks/capacity.py --only hidden --only told --only bare --repeat 3   # interleaved
    .venv/bin/python benchmarks/capacity.py --only hidden --only bare --latency 0.5 --repeat 2
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner_benchmarks import NS, TOKEN, EmulatorProcess

_OVERLOADED = json.dumps({"error": "Model is overloaded", "error_type": "overloaded"})
_ANSWER = json.dumps({
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
})


# ---------------------------------------------------------------- the stand-in server (its own process)

def _stand_in(slots: int, latency: float, conn) -> None:
    from aiohttp import web

    state = {"in_flight": 0, "ok": 0, "429": 0, "first": None, "last": None, "peak": 0}

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        now = time.time()
        if state["first"] is None:
            state["first"] = now
        if state["in_flight"] >= slots:
            state["429"] += 1
            return web.Response(status=429, text=_OVERLOADED, content_type="application/json")
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        try:
            await asyncio.sleep(latency)
        finally:
            state["in_flight"] -= 1
        state["ok"] += 1
        state["last"] = time.time()
        return web.Response(text=_ANSWER, content_type="application/json")

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"model_id": "stand-in/tgi", "model_sha": "0" * 40})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(state)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/info", info)
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        conn.send(f"http://127.0.0.1:{port}")
        await asyncio.Event().wait()

    asyncio.run(main())


# ---------------------------------------------------------------- the job

def _write_job(folder: Path, url: str | list[str], rows: int, max_concurrency: int, initial: int | None = None) -> Path:
    source = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "topic": [f"topic {i % 997}" for i in range(rows)]}), source)
    spec = {
        "name": "capacity",
        "task": "chat-completion",
        "input": {"parquet": str(source), "id_column": "id"},
        "prompt": {"template": "Write about {topic}."},
        "parameters": {"max_tokens": 16, "seed": 1},
        "endpoint": [{"url": u} for u in url] if isinstance(url, list) else {"url": url},
        # Nothing else but for `told`: the default initial.
        "concurrency": {"max": max_concurrency} if initial is None else {"max": max_concurrency, "initial": initial},
        "retries": {"max_attempts": 8},
        "output": {"path": str(folder / "out")},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


async def _run_job(spec_path: Path) -> dict:
    from batchrun.runner import RunOptions, run_job
    from batchrun.spec import load_spec

    os.environ["HF_TOKEN"] = TOKEN
    outcome = await run_job(load_spec(spec_path), RunOptions(progress="off", handle_signals=False, echo=lambda m: None))
    return outcome.summary


async def _get(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return await response.json()


# ---------------------------------------------------------------- 1. hidden capacity

def hidden(rows: int, *, mode: str = "hidden", latency: float = 0.1) -> dict:
    """``mode``: ``hidden`` (the job told nothing), ``told`` (the job told the capacity) or ``bare`` (a bare
    aiohttp loop of exactly ``slots`` workers: what any client told the capacity can reach here)."""
    slots = 64
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_stand_in, args=(slots, latency, child), daemon=True)
    server.start()
    try:
        url = parent.recv()
        if mode == "bare":
            ok = asyncio.run(_bare_loop(url, rows, slots))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                told = mode == "told"
                spec = _write_job(Path(tmp), url, rows, slots, slots) if told else _write_job(Path(tmp), url, rows, 512)
                ok = asyncio.run(_run_job(spec))["rows"]["ok"]
        stats = asyncio.run(_get(f"{url}/stats"))
    finally:
        server.terminate()
        server.join(5)
    span = stats["last"] - stats["first"]
    sent = stats["ok"] + stats["429"]
    return {
        "scenario": mode, "rows": rows, "rows_ok": ok, "capacity": slots, "latency_s": latency,
        "server_span_s": round(span, 3), "fraction_of_capacity": round(rows / span / (slots / latency), 3),
        "share_429": round(stats["429"] / sent, 4), "requests": sent, "peak_in_flight": stats["peak"],
    }


async def _bare_loop(url: str, rows: int, workers: int) -> int:
    """The reference: ``workers`` coroutines, each sending the job's request as soon as its last one is answered."""
    pending = iter(range(rows))
    ok = 0

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal ok
        for i in pending:
            body = {"model": "tgi", "messages": [{"role": "user", "content": f"Write about topic {i % 997}."}],
                    "max_tokens": 16, "seed": 1}
            async with http.post(f"{url}/v1/chat/completions", json=body) as response:
                await response.read()
                ok += response.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(*(worker(http) for _ in range(workers)))
    return ok


# ---------------------------------------------------------------- 4. two endpoints, each capacity hidden

def two(rows: int) -> dict:
    """Two stand-ins of 48 and 16 slots (100 ms): the job, told nothing, should find each one's capacity
    and use their sum (640 rows/s); each gets a share in proportion to what it can take."""
    slots, latency = (48, 16), 0.1
    servers, urls = [], []
    try:
        for n in slots:
            parent, child = multiprocessing.Pipe()
            server = multiprocessing.Process(target=_stand_in, args=(n, latency, child), daemon=True)
            server.start()
            servers.append(server)
            urls.append(parent.recv())
        with tempfile.TemporaryDirectory() as tmp:
            summary = asyncio.run(_run_job(_write_job(Path(tmp), urls, rows, 512)))
        stats = [asyncio.run(_get(f"{url}/stats")) for url in urls]
    finally:
        for server in servers:
            server.terminate()
            server.join(5)
    span = max(s["last"] for s in stats) - min(s["first"] for s in stats)
    sent = sum(s["ok"] + s["429"] for s in stats)
    capacity = sum(slots)
    return {
        "scenario": "two", "rows": rows, "rows_ok": summary["rows"]["ok"], "capacities": list(slots),
        "server_span_s": round(span, 3), "fraction_of_summed_capacity": round(rows / span / (capacity / latency), 3),
        "share_429": round(sum(s["429"] for s in stats) / sent, 4),
        "rows_per_endpoint": [s["ok"] for s in stats], "peak_in_flight_per_endpoint": [s["peak"] for s in stats],
    }


# ---------------------------------------------------------------- 2 and 3: the emulator, watched

async def _watch(control: str, name: str, samples: list[tuple[float, dict]], done: asyncio.Event) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        while not done.is_set():
            async with http.get(f"{control}/emulator/stats") as response:
                samples.append((time.monotonic(), (await response.json())["endpoints"][f"{NS}/{name}"]))
            await asyncio.sleep(0.1)


def _counts(stat: dict) -> tuple[int, int]:
    ok = rejected = 0
    for route, by_status in stat["by_route"].items():
        if "chat" in route:
            ok += by_status.get("200", 0)
            rejected += by_status.get("429", 0)
    return ok, rejected


def _window(samples: list[tuple[float, dict]], start: float, seconds: float = 1.0) -> tuple[float, float] | None:
    """(rows served per second, 429 share) between the samples nearest ``start`` and ``start + seconds``."""
    a = next((s for s in samples if s[0] >= start), None)
    b = next((s for s in samples if s[0] >= start + seconds), None)
    if a is None or b is None:
        return None
    (ok0, r0), (ok1, r1) = _counts(a[1]), _counts(b[1])
    answered = (ok1 - ok0) + (r1 - r0)
    return (ok1 - ok0) / (b[0] - a[0]), ((r1 - r0) / answered if answered else 0.0)


async def _watched_job(urls: dict, name: str, rows: int, action) -> list[tuple[float, dict]]:
    samples: list[tuple[float, dict]] = []
    done = asyncio.Event()
    watcher = asyncio.create_task(_watch(urls["control"], name, samples, done))
    with tempfile.TemporaryDirectory() as tmp:
        job = asyncio.create_task(_run_job(_write_job(Path(tmp), urls[name], rows, 512)))
        acting = asyncio.create_task(action(samples))
        summary = await job
        done.set()
        await watcher
        acting.cancel()
    assert summary["rows"]["ok"] == rows, summary["rows"]
    return samples


def replicas(rows: int) -> dict:
    slots, latency, target = 16, 0.1, 4
    endpoint = {"name": "grows", "namespace": NS, "initial_state": "running", "min_replica": 1, "max_replica": 8,
                "max_concurrent_requests": slots, "latency_base_s": latency, "replica_start_s": 1.0}

    async def scale_up(samples: list) -> None:
        while not samples or _counts(samples[-1][1])[0] < 1500:  # running at 1 replica for a while
            await asyncio.sleep(0.05)
        body = {"compute": {"scaling": {"minReplica": target, "maxReplica": target}}}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http, http.put(
            f"{urls['api']}/endpoint/{NS}/grows", json=body
        ) as response:
            assert response.status == 200, await response.text()

    with EmulatorProcess([endpoint]) as urls:
        urls["api"] = urls["control"] + "/v2"
        samples = asyncio.run(_watched_job(urls, "grows", rows, scale_up))
    ready_at = next(t for t, s in samples if s["ready_replicas"] == target)
    ideal = target * slots / latency
    reach = None
    t = ready_at - 3.0
    while (w := _window(samples, t)) is not None:
        if w[0] >= 0.9 * ideal:
            reach = round(t + 1.0 - ready_at, 2)  # the end of the first window at 0.9
            break
        t += 0.1
    after = _window(samples, ready_at, 10.0)
    return {
        "scenario": "replicas", "rows": rows, "capacity_before": slots, "capacity_after": target * slots,
        "s_from_last_ready_to_a_1s_window_at_0.9": reach,
        "fraction_of_capacity_in_10s_after_last_ready": round(after[0] / ideal, 3) if after else None,
        "share_429_in_10s_after": round(after[1], 4) if after else None,
    }


def lose(rows: int) -> dict:
    slots, latency = 32, 0.1
    endpoint = {"name": "shrinks", "namespace": NS, "initial_state": "running", "min_replica": 2, "max_replica": 2,
                "max_concurrent_requests": slots, "latency_base_s": latency, "replica_start_s": 60.0,
                "episodes": [{"kind": "lose_replica", "at_s": 3.0}]}

    async def nothing(samples: list) -> None:
        await asyncio.Event().wait()

    with EmulatorProcess([endpoint]) as urls:
        samples = asyncio.run(_watched_job(urls, "shrinks", rows, nothing))
    lost_at = next(t for t, s in samples if s["ready_replicas"] == 1)
    settle = None
    t = lost_at - 0.1
    while (w := _window(samples, t)) is not None:
        if t >= lost_at and w[1] < 0.02:
            settle = round(t + 1.0 - lost_at, 2)  # the end of the first 1 s window under 2%
            break
        t += 0.1
    before = _window(samples, lost_at - 1.0)
    after = _window(samples, lost_at + 2.0, 5.0)
    return {
        "scenario": "lose", "rows": rows, "capacity_before": 2 * slots, "capacity_after": slots,
        "s_from_loss_to_a_1s_window_under_2pct_429": settle,
        "share_429_1s_before": round(before[1], 4) if before else None,
        "fraction_of_capacity_2_to_7s_after": round(after[0] / (slots / latency), 3) if after else None,
        "share_429_2_to_7s_after": round(after[1], 4) if after else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["hidden", "told", "bare", "replicas", "lose", "two"], action="append")
    parser.add_argument("--rows", type=int,
                        help="rows per job (defaults: hidden, told and bare 4000, replicas 12000, lose 4000, two 8000)")
    parser.add_argument("--latency", type=float, default=0.1, help="hidden, told and bare: seconds per answer")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    capacity = {mode: (functools.partial(hidden, mode=mode, latency=args.latency), 4000)
                for mode in ("hidden", "told", "bare")}
    scenarios = {**capacity, "replicas": (replicas, 12000), "lose": (lose, 4000), "two": (two, 8000)}
    names = args.only or [name for name in scenarios if name not in ("told", "bare")]
    # Repeats interleave the scenarios asked for, so that a machine's load moves them alike.
    reached: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for name in names:
            run, rows = scenarios[name]
            result = run(args.rows or rows)
            print(json.dumps(result), flush=True)
            if name in capacity:
                reached.setdefault(name, []).append(result["fraction_of_capacity"])
    if "bare" in reached:
        # What the controller finds, as a share of what a client told the capacity reaches on this machine.
        bare = statistics.median(reached["bare"])
        print(json.dumps({f"{name}_of_bare_median": round(statistics.median(values) / bare, 3)
                          for name, values in reached.items() if name != "bare"}), flush=True)


if __name__ == "__main__":
    main()
