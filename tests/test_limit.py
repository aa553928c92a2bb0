"""The adaptive concurrency limit: AIMD arithmetic with a fake clock, then the semaphore behaviour."""

from __future__ import annotations

import asyncio

import pytest

from batchrun.limit import AdaptiveLimit, LimitController


def controller(initial: int = 10, **kwargs) -> LimitController:
    kwargs.setdefault("maximum", 1000)
    return LimitController(initial, **kwargs)


def succeed(c: LimitController, n: int, *, latency: float = 0.1, now: float = 0.0, in_flight: int | None = None) -> None:
    for _ in range(n):
        c.on_success(latency, now=now, in_flight=c.limit if in_flight is None else in_flight)


def test_slow_start_doubles_the_limit_every_round() -> None:
    c = controller(8)
    succeed(c, 8)
    assert c.limit == 16
    succeed(c, 16)
    assert c.limit == 32


def test_after_an_overload_the_limit_grows_by_one_per_round() -> None:
    c = controller(100)
    c.on_overload(now=1.0, sent_at=1.0)
    assert c.limit == 90
    succeed(c, 92, now=2.0)  # one round: about `limit` successes
    assert c.limit == 91
    succeed(c, 92, now=3.0)
    assert c.limit == 92


def test_an_overload_cuts_the_limit_multiplicatively() -> None:
    c = controller(100)
    assert c.on_overload(now=5.0, sent_at=4.9)
    assert c.limit == 90


def test_a_burst_of_429s_from_one_overload_cuts_only_once() -> None:
    c = controller(100)
    # 50 requests sent together at t=1, all answered 429 at about t=1.1.
    cuts = [c.on_overload(now=1.1 + i * 0.001, sent_at=1.0) for i in range(50)]
    assert cuts.count(True) == 1
    assert c.limit == 90


def test_an_overload_seen_by_requests_sent_after_the_cut_cuts_again() -> None:
    c = controller(100)
    c.on_overload(now=1.0, sent_at=0.9)
    assert c.on_overload(now=1.2, sent_at=1.05)
    assert c.limit == 81


def test_without_a_send_time_one_latency_round_separates_cuts() -> None:
    c = controller(100)
    succeed(c, 30, latency=0.5)  # round is about 0.5 s
    before = c.value
    assert c.on_overload(now=10.0)
    assert not c.on_overload(now=10.2)
    assert c.on_overload(now=10.6)
    assert c.value == pytest.approx(before * 0.9 * 0.9)


def test_the_limit_stays_within_its_bounds() -> None:
    c = controller(5, minimum=2, maximum=12)
    succeed(c, 200)
    assert c.limit == 12
    for i in range(100):
        c.on_overload(now=float(i), sent_at=float(i))
    assert c.limit == 2
    assert LimitController(500, maximum=12).limit == 12
    assert LimitController(0, minimum=3, maximum=12).limit == 3


def test_an_unused_limit_does_not_grow() -> None:
    c = controller(64)
    succeed(c, 500, in_flight=4)  # the input is slow: only 4 requests run
    assert c.limit == 64


def test_rising_latency_stops_growth_and_gently_lowers_the_limit() -> None:
    c = controller(50)
    c.on_overload(now=0.0, sent_at=0.0)  # leave slow start
    succeed(c, 200, latency=0.1, now=1.0)
    grown = c.limit
    # The server starts queueing: latency jumps to 5x.
    now = 2.0
    for _ in range(100):
        c.on_success(0.5, now=now, in_flight=c.limit)
        now += 0.01
    assert c.limit < grown
    # Gentle: a few 5% steps, not a collapse.
    assert c.limit >= grown * 0.7


def test_latency_noise_within_tolerance_does_not_stop_growth() -> None:
    c = controller(20)
    c.on_overload(now=0.0, sent_at=0.0)
    latencies = [0.1, 0.15, 0.08, 0.12, 0.18]
    for i in range(400):
        c.on_success(latencies[i % len(latencies)], now=1.0 + i * 0.001, in_flight=c.limit)
    assert c.limit > 16


def test_limit_recovers_growth_after_latency_returns_to_normal() -> None:
    c = controller(50)
    c.on_overload(now=0.0, sent_at=0.0)
    succeed(c, 100, latency=0.1, now=1.0)
    now = 2.0
    for _ in range(60):
        c.on_success(0.6, now=now, in_flight=c.limit)
        now += 0.1
    low = c.limit
    for _ in range(400):
        c.on_success(0.1, now=now, in_flight=c.limit)
        now += 0.01
    assert c.limit > low


def test_slots_never_exceed_the_limit() -> None:
    async def main() -> None:
        limit = AdaptiveLimit(3, maximum=3)
        running = peak = 0

        async def job() -> None:
            nonlocal running, peak
            async with limit.slot():
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.001)
                running -= 1

        await asyncio.gather(*(job() for _ in range(30)))
        assert peak == 3
        assert limit.in_flight == 0

    asyncio.run(main())


def test_a_lower_limit_holds_new_requests_until_enough_finish() -> None:
    async def main() -> None:
        clock = [0.0]
        limit = AdaptiveLimit(4, maximum=4, clock=lambda: clock[0])
        for _ in range(4):
            await limit.acquire()
        limit.on_overload(sent_at=0.0)  # 4 * 0.9 -> 3.6, used as 3
        assert limit.limit == 3
        waiter = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        limit.release()  # 3 in flight: still not below 3
        await asyncio.sleep(0)
        assert not waiter.done()
        limit.release()  # 2 in flight: the waiter gets a slot
        await asyncio.sleep(0)
        assert waiter.done() and limit.in_flight == 3

    asyncio.run(main())


def test_growth_wakes_waiters() -> None:
    async def main() -> None:
        limit = AdaptiveLimit(1, maximum=10)
        await limit.acquire()
        waiter = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
        limit.on_success(0.01)  # slow start: 1 -> 2
        await asyncio.sleep(0)
        assert waiter.done() and limit.in_flight == 2

    asyncio.run(main())


def test_a_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def main() -> None:
        limit = AdaptiveLimit(1, maximum=1)
        await limit.acquire()
        waiter = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        limit.release()  # hands the slot to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs
        await asyncio.gather(waiter, return_exceptions=True)
        assert limit.in_flight == 0
        await asyncio.wait_for(limit.acquire(), 1)

    asyncio.run(main())


def test_release_without_acquire_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        AdaptiveLimit(1, maximum=1).release()


def test_try_acquire_takes_only_a_free_slot_nobody_waits_for() -> None:
    async def main() -> None:
        limit = AdaptiveLimit(2, maximum=2)
        assert limit.try_acquire() and limit.try_acquire()
        assert not limit.try_acquire() and limit.in_flight == 2  # full: nothing taken
        waiter = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        limit.release()  # the slot goes to the waiter, not to a newcomer
        assert not limit.try_acquire() and limit.in_flight == 2
        await waiter
        limit.release()
        assert limit.try_acquire() and limit.in_flight == 2

    asyncio.run(main())
