"""Whole-job benchmarks on the batchrun emulator, run in a separate process on loopback.

1. capacity: an endpoint with a hidden capacity (2 replicas x 32 slots, 100 ms latency, instant 429
   beyond it). A full `batchrun` job with concurrency.max 256 must find that capacity by itself.
   Reports throughput as a fraction of the ideal (capacity / latency = 640 rows/s) and the 429 share.
2. comparison: one high-capacity endpoint (20 ms latency), the same N chat requests at concurrency 64,
   sent by (a) a full batchrun job (Parquet in, Parquet out), (b) a bare aiohttp loop with a semaphore,
   (c) huggingface_hub's AsyncInferenceClient with a semaphore. Ratios are measured in one run.

    .venv/bin/python benchmarks/runner_benchmarks.py                 # both, default sizes
    .venv/bin/python benchmarks/runner_benchmarks.py --only capacity --rows 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

TOKEN = "hf_benchmark_token_not_real"
NS = "bench"


def _serve(endpoints: list[dict], conn) -> None:
    from batchrun.emulator import EmulatorConfig, EndpointConfig, serve

    config = EmulatorConfig(token=TOKEN, endpoints=[EndpointConfig.from_dict(e) for e in endpoints])

    def ready(emu) -> None:
        conn.send({"control": emu.control_url, **{e["name"]: emu.endpoint_url(NS, e["name"]) for e in endpoints}})

    asyncio.run(serve(config, ready=ready))


class EmulatorProcess:
    """The emulator in its own process, so that it does not share an event loop with the client."""

    def __init__(self, endpoints: list[dict]) -> None:
        self.endpoints = endpoints

    def __enter__(self) -> dict:
        parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=_serve, args=(self.endpoints, child), daemon=True)
        self.process.start()
        self.urls = parent.recv()
        return self.urls

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(5)


async def _stats(control: str, name: str) -> dict:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http, \
            http.get(f"{control}/emulator/stats") as response:
        return (await response.json())["endpoints"][f"{NS}/{name}"]


def _write_input(folder: Path, rows: int) -> Path:
    path = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "topic": [f"topic {i % 997}" for i in range(rows)]}), path)
    return path


def _write_spec(folder: Path, url: str, input_path: Path, *, max_concurrency: int, initial: int, rows: int) -> Path:
    spec = {
        "name": "bench",
        "task": "chat-completion",
        "input": {"parquet": str(input_path), "id_column": "id", "limit": rows},
        "prompt": {"template": "Write about {topic}."},
        "parameters": {"max_tokens": 16, "seed": 1},
        "endpoint": {"url": url},
        "concurrency": {"max": max_concurrency, "initial": initial},
        "retries": {"max_attempts": 8},
        "request_timeout": "30s",
        "output": {"path": str(folder / "out")},
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


async def _run_batchrun(spec_path: Path) -> tuple[float, dict]:
    from batchrun.runner import RunOptions, run_job
    from batchrun.spec import load_spec

    os.environ["HF_TOKEN"] = TOKEN
    started = time.perf_counter()
    outcome = await run_job(load_spec(spec_path), RunOptions(progress="off", handle_signals=False, echo=lambda m: None))
    return time.perf_counter() - started, outcome.summary


def _chat_payload(i: int) -> dict:
    return {"model": "tgi", "messages": [{"role": "user", "content": f"Write about topic {i % 997}."}],
            "max_tokens": 16, "seed": 1}


async def _run_bare(url: str, rows: int, concurrency: int) -> float:
    semaphore = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        async def one(i: int) -> None:
            async with semaphore:
                async with http.post(f"{url}/v1/chat/completions", json=_chat_payload(i)) as response:
                    await response.read()
                    assert response.status == 200, response.status

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(rows)))
        return time.perf_counter() - started


async def _run_hf_client(url: str, rows: int, concurrency: int) -> float:
    from huggingface_hub import AsyncInferenceClient

    semaphore = asyncio.Semaphore(concurrency)
    client = AsyncInferenceClient(model=url, token=TOKEN)

    async def one(i: int) -> None:
        async with semaphore:
            await client.chat_completion(_chat_payload(i)["messages"], max_tokens=16, seed=1)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(rows)))
    elapsed = time.perf_counter() - started
    close = getattr(client, "close", None)
    if close is not None:
        await close()
    return elapsed


def capacity(rows: int) -> None:
    replicas, slots, latency = 2, 32, 0.1
    endpoint = {"name": "hidden", "namespace": NS, "initial_state": "running", "min_replica": replicas,
                "max_replica": replicas, "max_concurrent_requests": slots, "latency_base_s": latency}
    ideal = replicas * slots / latency
    with EmulatorProcess([endpoint]) as urls, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = _write_spec(folder, urls["hidden"], _write_input(folder, rows), max_concurrency=256, initial=8, rows=rows)
        wall, summary = asyncio.run(_run_batchrun(spec))
        stats = asyncio.run(_stats(urls["control"], "hidden"))
    by_status: dict[str, int] = {}
    for route, counts in stats["by_route"].items():
        if "chat" in route:
            for status, count in counts.items():
                by_status[status] = by_status.get(status, 0) + count
    sent = sum(by_status.values())
    active = stats["last_request_at"] - stats["first_request_at"]
    share_429 = by_status.get("429", 0) / sent if sent else 0.0
    throughput = rows / wall
    print(json.dumps({
        "benchmark": "capacity", "rows": rows, "capacity_slots": replicas * slots, "latency_s": latency,
        "ideal_rows_per_s": ideal, "rows_per_s": round(throughput, 1),
        "fraction_of_ideal": round(throughput / ideal, 3),
        "rows_per_s_while_sending": round(rows / active, 1), "fraction_of_ideal_while_sending": round(rows / active / ideal, 3),
        "share_429": round(share_429, 4), "by_status": by_status,
        "requests_sent": sent, "peak_concurrency": stats["peak_concurrency"],
        "rows_ok": summary["rows"]["ok"], "wall_s": round(wall, 2),
    }, indent=1))


def comparison(rows: int, concurrency: int, repeats: int) -> None:
    endpoint = {"name": "wide", "namespace": NS, "initial_state": "running", "max_concurrent_requests": 4096,
                "latency_base_s": 0.02}
    results: dict[str, list[float]] = {"batchrun": [], "bare_aiohttp": [], "hf_async_client": []}
    with EmulatorProcess([endpoint]) as urls:
        url = urls["wide"]
        for _ in range(repeats):  # interleaved, so drift on a noisy machine hits all three alike
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                spec = _write_spec(folder, url, _write_input(folder, rows), max_concurrency=concurrency,
                                   initial=concurrency, rows=rows)
                wall, summary = asyncio.run(_run_batchrun(spec))
                assert summary["rows"]["ok"] == rows, summary["rows"]
                results["batchrun"].append(rows / wall)
            results["bare_aiohttp"].append(rows / asyncio.run(_run_bare(url, rows, concurrency)))
            results["hf_async_client"].append(rows / asyncio.run(_run_hf_client(url, rows, concurrency)))
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(json.dumps({
        "benchmark": "comparison", "rows": rows, "concurrency": concurrency, "latency_s": 0.02,
        "ideal_rows_per_s": concurrency / 0.02, "repeats": repeats,
        "rows_per_s_median": {k: round(v, 1) for k, v in medians.items()},
        "batchrun_over_bare": round(medians["batchrun"] / medians["bare_aiohttp"], 3),
        "batchrun_over_hf_client": round(medians["batchrun"] / medians["hf_async_client"], 3),
        "all_runs": {k: [round(v, 1) for v in values] for k, values in results.items()},
    }, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["capacity", "comparison"])
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.only in (None, "capacity"):
        capacity(args.rows or 6000)
    if args.only in (None, "comparison"):
        comparison(args.rows or 5000, args.concurrency, args.repeats)


if __name__ == "__main__":
    main()
