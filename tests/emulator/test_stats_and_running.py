"""Observability (Python API and JSON route), the thread runner, serve() and describe()."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import aiohttp
from emulator_helpers import AUTH, NS, TOKEN, config, endpoint, run

import batchrun.emulator
from batchrun.emulator import Emulator, EmulatorConfig, EmulatorThread, default_endpoints, describe, serve


def test_all_is_sorted_and_names_only_real_objects():
    assert batchrun.emulator.__all__ == sorted(batchrun.emulator.__all__)
    for name in batchrun.emulator.__all__:
        assert getattr(batchrun.emulator, name) is not None


def test_stats_count_routes_statuses_prompts_and_first_and_last_request_times():
    async def body():
        async with Emulator(config(endpoint("gen"))) as emu, aiohttp.ClientSession(headers=AUTH) as http:
            url = emu.endpoint_url(NS, "gen")
            for prompt in ("a", "a", "b", ""):
                async with http.post(url + "/generate", json={"inputs": prompt}) as r:
                    await r.read()
            async with http.get(url + "/health") as r:
                health = (r.status, await r.read())
            async with http.post(emu.api_url + f"/endpoint/{NS}/gen/pause") as r:
                await r.read()
            async with http.get(emu.control_url + "/emulator/stats") as r:
                route_stats = await r.json()
            return health, emu.stats(), route_stats

    health, stats, route_stats = run(body())
    assert health == (200, b"")
    section = stats["endpoints"][f"{NS}/gen"]
    assert section["by_route"]["POST /generate"] == {"200": 3, "422": 1}
    assert section["by_route"]["GET /health"] == {"200": 1}
    assert section["requests"] == 4
    assert section["requests_per_prompt"] == {"a": 2, "b": 1}
    assert section["first_request_at"] <= section["last_request_at"]
    assert section["state"] == "paused" and section["billable_seconds"] > 0
    assert stats["control_log"][0]["method"] == "POST" and stats["control_log"][0]["status"] == 200
    assert route_stats["endpoints"][f"{NS}/gen"]["by_route"] == section["by_route"]


def test_the_stats_route_asks_for_the_token_since_it_lists_every_prompt():
    async def body():
        async with Emulator(config(endpoint("gen"))) as emu, aiohttp.ClientSession() as http:
            async with http.post(emu.endpoint_url(NS, "gen") + "/generate", json={"inputs": "a secret prompt"},
                                 headers=AUTH) as r:
                await r.read()
            answers = []
            for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH):
                async with http.get(emu.control_url + "/emulator/stats", headers=headers) as r:
                    answers.append((r.status, await r.text()))
            return answers

    (none, wrong, right) = run(body())
    assert none[0] == 401 and "a secret prompt" not in none[1]
    assert wrong[0] == 401 and "a secret prompt" not in wrong[1]
    assert right[0] == 200 and "a secret prompt" in right[1]


def test_emulator_thread_serves_blocking_callers_and_stops_cleanly():
    with EmulatorThread(config(endpoint("gen"))) as emu:
        request = urllib.request.Request(emu.endpoint_url(NS, "gen") + "/generate", method="POST",
                                         data=json.dumps({"inputs": "hi"}).encode(),
                                         headers={"Content-Type": "application/json", **AUTH})
        with urllib.request.urlopen(request) as response:
            assert "generated_text" in json.load(response)
        assert emu.stats()["endpoints"][f"{NS}/gen"]["requests"] == 1
        url = emu.endpoint_url(NS, "gen")
    try:
        urllib.request.urlopen(url + "/health", timeout=1)
        raise AssertionError("the port should be closed")
    except OSError:
        pass


def test_serve_runs_until_cancelled_and_describe_lists_every_endpoint_without_the_token():
    async def body():
        ready: asyncio.Future = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(EmulatorConfig(token=TOKEN, endpoints=default_endpoints()),
                                         ready=ready.set_result))
        emu = await ready
        text = describe(emu)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return text, emu

    text, emu = run(body())
    assert emu.api_url in text
    for name in ("gemma-local", "sdxl-local", "idefics2-local"):
        assert name in text
    assert TOKEN not in text
