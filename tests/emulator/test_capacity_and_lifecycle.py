"""Capacity, state-dependent answers, lifecycle timing and billing, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from emulator_helpers import AUTH, NS, config, endpoint, run

from batchrun.emulator import Emulator, EndpointConfig
from batchrun.emulator.state import EndpointState


def session() -> aiohttp.ClientSession:
    # No connection limit: the tests open hundreds of concurrent requests.
    return aiohttp.ClientSession(headers=AUTH, connector=aiohttp.TCPConnector(limit=0))


async def post_generate(http: aiohttp.ClientSession, url: str, prompt: str = "hello", **headers) -> tuple[int, str]:
    async with http.post(url + "/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 3}},
                         headers=headers) as response:
        return response.status, await response.text()


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def test_129th_concurrent_request_on_one_replica_gets_429():
    async def body():
        async with Emulator(config(endpoint("gen", latency_base_s=1.5))) as emu, session() as http:
            url = emu.endpoint_url(NS, "gen")
            held = [asyncio.create_task(post_generate(http, url, f"p{i}")) for i in range(128)]
            await until(lambda: emu.find(NS, "gen").admitted == 128)
            status, text = await post_generate(http, url, "one too many")
            still_held = sum(not task.done() for task in held)
            results = await asyncio.gather(*held)
            return status, text, still_held, results, emu.stats()["endpoints"][f"{NS}/gen"]

    status, text, still_held, results, stats = run(body())
    assert status == 429
    assert text == '{"error":"Model is overloaded","error_type":"overloaded"}'
    assert still_held == 128  # immediate: answered while every 1.5 s request was still held, not queued
    assert [s for s, _ in results] == [200] * 128
    assert stats["peak_concurrency"] == 129


def test_capacity_is_max_concurrent_requests_times_ready_replicas():
    async def body():
        cfg = endpoint("gen", latency_base_s=0.3, max_concurrent_requests=2, min_replica=2, max_replica=2)
        async with Emulator(config(cfg)) as emu, session() as http:
            url = emu.endpoint_url(NS, "gen")
            statuses = await asyncio.gather(*(post_generate(http, url, f"p{i}") for i in range(6)))
            return sorted(s for s, _ in statuses)

    assert run(body()) == [200, 200, 200, 200, 429, 429]


def test_resume_goes_pending_then_initializing_then_running_on_the_configured_timing():
    async def body():
        cfg = endpoint("gen", initial_state="paused", pending_s=0.1, initializing_s=0.2)
        async with Emulator(config(cfg)) as emu:
            state = emu.state(NS, "gen")
            seen: list[tuple[float, str]] = []
            started = time.monotonic()
            state.resume()
            while state.state != "running":
                if not seen or seen[-1][1] != state.state:
                    seen.append((time.monotonic() - started, state.state))
                await asyncio.sleep(0.005)
            seen.append((time.monotonic() - started, state.state))
            return seen, state.url, emu.endpoint_url(NS, "gen")

    seen, url, expected_url = run(body())
    assert [name for _, name in seen] == ["pending", "initializing", "running"]
    # The lower bounds are the timing promise (never sooner than configured); the upper ones are
    # generous limits against a stall, not speed claims.
    assert 0.09 <= seen[1][0] <= 2.0
    assert 0.29 <= seen[2][0] <= 3.0
    assert url == expected_url


def test_more_replicas_become_ready_one_by_one_every_replica_start_s():
    async def body():
        async with Emulator(config(endpoint("gen", replica_start_s=0.1, max_replica=4))) as emu:
            state = emu.state(NS, "gen")
            started = time.monotonic()
            state.update({"compute": {"scaling": {"minReplica": 4}}})
            ready_at: dict[int, float] = {}
            while state.state != "running" or state.ready_replicas < 4:
                ready_at.setdefault(state.ready_replicas, time.monotonic() - started)
                await asyncio.sleep(0.003)
            ready_at.setdefault(4, time.monotonic() - started)
            return ready_at, state.target_replicas

    ready_at, target = run(body())
    assert target == 4
    for replicas, expected in ((2, 0.1), (3, 0.2), (4, 0.3)):
        assert expected - 0.01 <= ready_at[replicas]  # one by one: never sooner than replica_start_s each
        assert ready_at[replicas] <= expected + 2.0  # a limit against a stall, not a speed claim


def test_a_paused_endpoint_answers_400_and_an_initializing_one_503():
    async def body():
        cfg = endpoint("gen", initial_state="paused", pending_s=0.0, initializing_s=5.0)
        async with Emulator(config(cfg)) as emu, session() as http:
            url = emu.endpoint_url(NS, "gen")
            paused = await post_generate(http, url)
            emu.state(NS, "gen").resume()
            await until(lambda: emu.state(NS, "gen").state == "initializing")
            initializing = await post_generate(http, url)
            return paused, initializing, emu.state(NS, "gen").state

    paused, initializing, state = run(body())
    assert paused == (400, "Bad Request: The endpoint is paused, ask a maintainer to restart it")
    assert initializing[0] == 503
    assert state == "initializing"


def test_a_scaled_to_zero_endpoint_answers_503_and_the_request_wakes_it():
    async def body():
        async with Emulator(config(endpoint("gen", initial_state="scaledToZero", initializing_s=0.1))) as emu, \
                session() as http:
            url = emu.endpoint_url(NS, "gen")
            state = emu.state(NS, "gen")
            billed_while_asleep = state.billable_seconds()
            first = await post_generate(http, url)
            woke_to = state.state
            await until(lambda: state.state == "running")
            second = await post_generate(http, url)
            return billed_while_asleep, first[0], woke_to, second[0]

    billed_while_asleep, first, woke_to, second = run(body())
    assert billed_while_asleep == 0
    assert first == 503
    assert woke_to == "initializing"
    assert second == 200


def test_x_scale_up_timeout_holds_the_request_until_a_replica_is_ready():
    async def body():
        async with Emulator(config(endpoint("gen", initial_state="scaledToZero", initializing_s=0.15))) as emu, \
                session() as http:
            url = emu.endpoint_url(NS, "gen")
            started = time.monotonic()
            held = await post_generate(http, url, **{"X-Scale-Up-Timeout": "5"})
            return held[0], time.monotonic() - started

    status, waited = run(body())
    assert status == 200  # held, then answered, within the 5 s X-Scale-Up-Timeout
    assert waited >= 0.14  # held until the replica was ready, not answered before


def test_an_idle_endpoint_with_min_replica_0_scales_to_zero_after_its_timeout():
    async def body():
        # 0.002 minutes = 0.12 s of idleness.
        cfg = endpoint("gen", min_replica=0, scale_to_zero_timeout=0.002)
        async with Emulator(config(cfg)) as emu, session() as http:
            await post_generate(http, emu.endpoint_url(NS, "gen"))
            state = emu.state(NS, "gen")
            started = time.monotonic()
            await until(lambda: state.state == "scaledToZero", timeout=30)  # a limit against a hang
            return time.monotonic() - started, state.url

    after, url = run(body())
    assert after >= 0.08  # not before its idle timeout
    assert url is not None


def test_text_to_image_draws_one_image_at_a_time_per_replica_and_queues_the_rest():
    async def body():
        cfg = endpoint("img", task="text-to-image", image_latency_s=0.1, min_replica=2, max_replica=2)
        async with Emulator(config(cfg)) as emu, session() as http:
            url = emu.endpoint_url(NS, "img")

            async def draw(i):
                async with http.post(url, json={"inputs": f"fox {i}", "parameters": {"width": 16, "height": 16}},
                                     headers={"Accept": "image/png"}) as response:
                    await response.read()
                    return response.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(draw(i) for i in range(6)))
            return statuses, time.monotonic() - started, emu.stats()["endpoints"][f"{NS}/img"]

    statuses, elapsed, stats = run(body())
    assert statuses == [200] * 6  # queued, never 429
    assert elapsed >= 0.29  # 6 images, 2 at a time, 0.1 s each: three rounds at least
    assert elapsed < 30  # a limit against a hang, not a speed claim
    assert stats["peak_concurrency"] == 6


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_billable_seconds_are_replica_seconds_while_running_and_stop_on_pause_and_scale_to_zero():
    async def body():
        clock = FakeClock()
        cfg = EndpointConfig(name="gen", initial_state="running", min_replica=2, max_replica=2)
        state = EndpointState(cfg, "http://127.0.0.1:1", clock=clock)
        clock.now += 10
        assert state.billable_seconds() == pytest.approx(20)  # 2 replicas x 10 s
        state.pause()
        clock.now += 100
        assert state.billable_seconds() == pytest.approx(20)  # paused: not billed
        state._set(state="running", ready=1, url=True)
        clock.now += 5
        state.scale_to_zero()
        clock.now += 50
        return state.billable_seconds()

    assert run(body()) == pytest.approx(25)


def test_billable_seconds_include_the_replica_initializing_but_not_pending():
    async def body():
        cfg = endpoint("gen", initial_state="paused", pending_s=0.2, initializing_s=0.2)
        async with Emulator(config(cfg)) as emu:
            state = emu.state(NS, "gen")
            loop = asyncio.get_running_loop()
            resumed_at = loop.time()
            state.resume()
            # While pending, every reading is 0 (read in the same step as the state, so it is pending).
            during_pending = []
            while state.state == "pending":
                during_pending.append(state.billable_seconds())
                await asyncio.sleep(0.01)
            await until(lambda: state.state == "running")
            running_at = loop.time()
            while loop.time() < running_at + 0.2:
                await asyncio.sleep(0.2)
            state.pause()
            billed, paused_at = state.billable_seconds(), loop.time()
            await asyncio.sleep(0.1)  # a window to watch for billing that must not happen
            return during_pending, billed, paused_at - resumed_at, state.billable_seconds()

    during_pending, billed, since_resume, after_pause = run(body())
    assert during_pending and set(during_pending) == {0}
    # 0.2 s initializing + at least 0.2 s running, one replica; at most the time since the resume less
    # the 0.2 s pending (measured in the same run, so a slow machine moves both bounds together).
    assert 0.38 <= billed <= since_resume - 0.2 + 0.02
    assert after_pause == billed
