"""Throughput of batchrun's Dispatcher against a bare aiohttp loop and huggingface_hub's AsyncInferenceClient.

All three send the same N text-generation (or chat) requests at the same concurrency to the SAME
server in one run, so the ratios show what the dispatcher's machinery (retry loop, adaptive limit,
budget, records) costs over the thinnest possible client. By default the server is a TGI-like
aiohttp app started in a separate process on loopback, with a fixed latency and a capacity far above
the concurrency (it never answers 429). Pass --url to aim at another server (e.g. the emulator).

    .venv/bin/python benchmarks/dispatch_vs_bare.py --requests 5000 --concurrency 64 --latency-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from batchrun.dispatch import DispatchConfig, Dispatcher
from batchrun.endpoints import DataPlane
from batchrun.records import Row, RowFailure, RowResult
from batchrun.retry import RetryPolicy
from batchrun.tasks import build_task, join_url

# ------------------------------------------------------------------------------------------ server


def _serve(latency_s: float, ready: multiprocessing.connection.Connection) -> None:
    """A TGI-like server: POST / and /v1/chat/completions answer after ``latency_s``; never 429."""

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(latency_s)
        answer = {"generated_text": "x " * 16, "details": {"finish_reason": "length", "generated_tokens": 16}}
        headers = {"x-prompt-tokens": str(len(body.get("inputs", "").split()))}
        return web.json_response(answer if request.path == "/generate" else [answer], headers=headers)

    async def chat(request: web.Request) -> web.Response:
        await request.json()
        await asyncio.sleep(latency_s)
        return web.json_response(
            {
                "object": "chat.completion", "id": "", "created": 0, "model": "tgi",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 16}, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20},
            }
        )  # fmt: skip

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/", generate)
        app.router.add_post("/generate", generate)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        ready.send(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------------------------------------ clients


def _prompts(n: int) -> list[str]:
    return [f"Write a short note about item number {i}." for i in range(n)]


def _payload(task: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    if task == "chat-completion":
        return "/v1/chat/completions", {"model": "tgi", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    return "/", {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "details": True}}


async def run_bare_aiohttp(url: str, task: str, prompts: list[str], concurrency: int) -> int:
    """The thinnest client: one session, a semaphore, one task per request, no retries."""
    semaphore = asyncio.Semaphore(concurrency)
    ok = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str) -> None:
            nonlocal ok
            path, payload = _payload(task, prompt, 16)
            async with semaphore, session.post(join_url(url, path), json=payload) as response:
                body = await response.read()
                if response.status == 200:
                    json.loads(body)
                    ok += 1

        await asyncio.gather(*(one(p) for p in prompts))
    return ok


async def run_hf_client(url: str, task: str, prompts: list[str], concurrency: int) -> int:
    """huggingface_hub's AsyncInferenceClient as a user would write it: a semaphore around each call."""
    from huggingface_hub import AsyncInferenceClient

    semaphore = asyncio.Semaphore(concurrency)
    ok = 0
    async with AsyncInferenceClient(base_url=url.rstrip("/")) as client:

        async def one(prompt: str) -> None:
            nonlocal ok
            async with semaphore:
                if task == "chat-completion":
                    await client.chat_completion([{"role": "user", "content": prompt}], max_tokens=16)
                else:
                    await client.text_generation(prompt, max_new_tokens=16, details=True)
                ok += 1

        await asyncio.gather(*(one(p) for p in prompts))
    return ok


_NOTES: list[str] = []  # extra figures a runner reports, printed under its line


def _dispatcher_runner(initial: int) -> Callable[[str, str, list[str], int], Awaitable[int]]:
    async def run_dispatcher(url: str, task: str, prompts: list[str], concurrency: int) -> int:
        ok = 0

        def on_record(record: RowResult | RowFailure) -> None:
            nonlocal ok
            ok += isinstance(record, RowResult)

        async def rows() -> AsyncIterator[Row]:
            for i, prompt in enumerate(prompts):
                yield Row(i, i, {"prompt": prompt})

        parameters = {"max_tokens": 16} if task == "chat-completion" else {"max_new_tokens": 16}
        dispatcher = Dispatcher(
            plane=DataPlane(url=url),
            task=build_task(task, column="prompt", parameters=parameters),
            config=DispatchConfig(max_concurrency=concurrency, initial_concurrency=initial, policy=RetryPolicy()),
            on_record=on_record,
        )
        await dispatcher.run(rows())
        if len(prompts) > 200:  # not the warm-up
            stats = dispatcher.stats
            p50, p95 = stats.latencies.quantile(0.5), stats.latencies.quantile(0.95)
            _NOTES.append(f"limit at the end {stats.limit}, p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
                          f"retries {stats.retries}")  # fmt: skip
        return ok

    return run_dispatcher


async def _timed(
    name: str, runner: Callable[[str, str, list[str], int], Awaitable[int]], url: str, task: str, n: int, concurrency: int
) -> float:
    await runner(url, task, _prompts(min(n, 200)), concurrency)  # warm up connections and code paths
    started = time.perf_counter()
    ok = await runner(url, task, _prompts(n), concurrency)
    elapsed = time.perf_counter() - started
    rate = n / elapsed
    print(f"  {name:<34} {rate:8.0f} req/s   ({ok}/{n} ok in {elapsed:.2f} s)", flush=True)
    while _NOTES:
        print(f"    {_NOTES.pop(0)}")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="use this server instead of starting the built-in one")
    parser.add_argument("--task", choices=["text-generation", "chat-completion"], default="text-generation")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="built-in server latency")
    args = parser.parse_args()

    server = None
    url = args.url
    if url is None:
        parent, child = multiprocessing.Pipe()
        server = multiprocessing.Process(target=_serve, args=(args.latency_ms / 1000, child), daemon=True)
        server.start()
        url = f"http://127.0.0.1:{parent.recv()}"
    ideal = args.concurrency / (args.latency_ms / 1000)
    print(f"{args.requests} {args.task} requests, concurrency {args.concurrency}, server {url}"
          + ("" if args.url else f" (latency {args.latency_ms:g} ms; ideal {ideal:.0f} req/s)"))  # fmt: skip
    try:
        rates = {}
        for name, runner in [
            ("bare aiohttp + semaphore", run_bare_aiohttp),
            ("AsyncInferenceClient + semaphore", run_hf_client),
            ("batchrun Dispatcher (initial=max)", _dispatcher_runner(args.concurrency)),
            ("batchrun Dispatcher (initial=8)", _dispatcher_runner(8)),
        ]:
            rates[name] = asyncio.run(_timed(name, runner, url, args.task, args.requests, args.concurrency))
        base = rates["bare aiohttp + semaphore"]
        hf = rates["AsyncInferenceClient + semaphore"]
        for name in ("batchrun Dispatcher (initial=max)", "batchrun Dispatcher (initial=8)"):
            print(f"  {name}: {rates[name] / base:.2f}x bare aiohttp, {rates[name] / hf:.2f}x AsyncInferenceClient")
    finally:
        if server is not None:
            server.terminate()
            server.join(5)


if __name__ == "__main__":
    main()
