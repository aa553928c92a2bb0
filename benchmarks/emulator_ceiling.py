"""The emulator's own ceiling: requests per second with zero latency, on loopback.

Later benchmarks of batchrun run against the emulator; this figure tells them whether the emulator
could be their bottleneck. The emulator runs in its own process (one event loop, one core) and an
aiohttp load generator in this one, keeping ``--concurrency`` requests in flight on keep-alive
connections for ``--seconds``. Every answer is checked to be a 200.

    .venv/bin/python benchmarks/emulator_ceiling.py --seconds 10 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import time

import aiohttp

from batchrun.emulator import EmulatorConfig, EndpointConfig, serve

TOKEN = "hf_benchmark_token"
ROUTES = {
    "generate": ("gen", "/generate", {"inputs": "Write one line about rivers", "parameters": {"max_new_tokens": 20}}),
    "chat": ("gen", "/v1/chat/completions",
             {"model": "tgi", "messages": [{"role": "user", "content": "Write one line about rivers"}],
              "max_tokens": 20}),
    "text-to-image": ("img", "/", {"inputs": "a red fox", "parameters": {"width": 64, "height": 64}}),
}


def _run_emulator(urls: multiprocessing.Queue) -> None:
    endpoints = [
        # Zero latency, and capacity far above the offered load, so only the emulator's own cost shows.
        EndpointConfig(name="gen", initial_state="running", max_concurrent_requests=100_000),
        EndpointConfig(name="img", task="text-to-image", initial_state="running", min_replica=8, max_replica=8),
    ]
    config = EmulatorConfig(token=TOKEN, endpoints=endpoints)

    def ready(emulator) -> None:
        urls.put({name: emulator.endpoint_url("batchrun-local", name) for name in ("gen", "img")})

    asyncio.run(serve(config, ready=ready))


async def _load(url: str, payload: dict, seconds: float, concurrency: int) -> tuple[int, int, float]:
    body = json.dumps(payload).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", "Accept": "image/png"}
    ok = failed = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        async def one() -> None:
            async with http.post(url, data=body) as response:
                await response.read()

        # Warm-up: open the connections before the clock starts.
        await asyncio.gather(*(one() for _ in range(concurrency)))
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            nonlocal ok, failed
            while time.perf_counter() < deadline:
                async with http.post(url, data=body) as response:
                    await response.read()
                    if response.status == 200:
                        ok += 1
                    else:
                        failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return ok, failed, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--routes", default="generate,chat,text-to-image")
    args = parser.parse_args()

    urls_queue: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_run_emulator, args=(urls_queue,), daemon=True)
    server.start()
    try:
        urls = urls_queue.get(timeout=30)
        print(f"machine: {platform.machine()} {platform.processor() or ''} cores={os.cpu_count()} "
              f"python={platform.python_version()} aiohttp={aiohttp.__version__}")
        for route in args.routes.split(","):
            name, path, payload = ROUTES[route]
            ok, failed, elapsed = asyncio.run(_load(urls[name] + path, payload, args.seconds, args.concurrency))
            print(json.dumps({"route": route, "concurrency": args.concurrency, "seconds": round(elapsed, 2),
                              "ok": ok, "failed": failed, "requests_per_second": round(ok / elapsed)}))
    finally:
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
