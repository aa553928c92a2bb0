"""A token limit held, not discovered: a whole `batchrun` job against a provider with a TPM limit.

The emulator plays the Inference Providers router in its own process: one provider with a limit of
``--tpm`` tokens per one-second window (a request costs its prompt tokens plus ``max_tokens``), the
``x-ratelimit-*`` headers on every answer, 429s without Retry-After, ``--latency`` per request. The job
(`run_job` in-process, a url endpoint, `concurrency.max: 64`) is told nothing about the limit.

Figures: the tokens the provider counted over the whole windows after the first request, as a share of
what those windows allowed (sampled from the router's stats every 20 ms), and the share of requests
answered 429.

    .venv/bin/python benchmarks/rate_limits.py --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runner_benchmarks import TOKEN

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MAX_TOKENS = 16


def _router(tpm: int, latency: float, conn) -> None:
    from batchrun.emulator import EmulatorConfig, serve
    from batchrun.emulator.router_config import ProviderConfig, RouterConfig

    provider = ProviderConfig(name="limited", models=(MODEL,), tpm=tpm, window="second", retry_after="none",
                              latency_s=latency)
    config = EmulatorConfig(token=TOKEN, endpoints=[], router=RouterConfig(providers=(provider,)))
    asyncio.run(serve(config, ready=lambda emu: conn.send(emu.router_url)))


def _write_job(folder: Path, url: str, rows: int) -> Path:
    source = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "topic": [f"topic {i % 997}" for i in range(rows)]}), source)
    spec = {
        "name": "rate-limits",
        "task": "chat-completion",
        "input": {"parquet": str(source), "id_column": "id"},
        "prompt": {"template": "Write about {topic}."},
        "parameters": {"max_tokens": MAX_TOKENS, "seed": 1, "model": MODEL},
        "endpoint": {"url": url},
        "concurrency": {"max": 64},
        "output": {"path": str(folder / "out")},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


async def _charged(http: aiohttp.ClientSession, stats_url: str) -> tuple[int, int, int]:
    async with http.get(stats_url) as response:
        provider = (await response.json())["providers"]["limited"]
    ok = provider["by_status"].get("200", 0)
    return provider["prompt_tokens"] + MAX_TOKENS * ok, provider["requests"], provider["rate_limited_429"]


async def _job_watched(spec_path: Path, stats_url: str) -> tuple[dict, list[tuple[float, int]], tuple[int, int, int]]:
    from batchrun.runner import RunOptions, run_job
    from batchrun.spec import load_spec

    os.environ["HF_TOKEN"] = TOKEN
    samples: list[tuple[float, int]] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        job = asyncio.create_task(run_job(load_spec(spec_path), RunOptions(progress="off", handle_signals=False,
                                                                          echo=lambda m: None)))
        while not job.done():
            samples.append((time.monotonic(), (await _charged(http, stats_url))[0]))
            await asyncio.sleep(0.02)
        outcome = await job
        final = await _charged(http, stats_url)
    samples.append((time.monotonic(), final[0]))
    return outcome.summary, samples, final


def held(rows: int, tpm: int, latency: float) -> dict:
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_router, args=(tpm, latency, child), daemon=True)
    server.start()
    try:
        router_url = parent.recv()
        root = router_url.removesuffix("/v1")
        with tempfile.TemporaryDirectory() as tmp:
            summary, samples, (tokens, requests, refused) = asyncio.run(
                _job_watched(_write_job(Path(tmp), root, rows), f"{root}/emulator/router/stats"))
    finally:
        server.terminate()
        server.join(5)
    started = next(t for t, charged in samples if charged > 0)
    last = min(t for t, charged in samples if charged == tokens)
    windows = int(last - started)
    used = max(charged for t, charged in samples if t <= started + windows)
    return {
        "scenario": "tpm", "rows": rows, "rows_ok": summary["rows"]["ok"], "tpm_per_second": tpm,
        "whole_windows": windows, "share_of_limit": round(used / (windows * tpm), 3),
        "share_429": round(refused / requests, 4), "requests": requests,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--tpm", type=int, default=3000, help="tokens per one-second window")
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.repeat):
        print(json.dumps(held(args.rows, args.tpm, args.latency)), flush=True)


if __name__ == "__main__":
    main()
