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


def test_slow_start_grows_the_limit_by_half_every_round() -> None:
    # Half, not double: the round that overshoots a capacity C sends at most C/2 past it, all refused before
    # the first refusal is read when a busy client reads its answers in bursts.
    c = controller(8)
    succeed(c, 8)
    assert c.limit == 12
    succeed(c, 12)
    assert c.limit == 18
    doubling = controller(8, slow_start_gain=1.0)
    succeed(doubling, 8)
    assert doubling.limit == 16


def test_after_an_overload_the_limit_probes_slowly_at_first_then_ever_faster() -> None:
    c = controller(100)
    succeed(c, 30, latency=0.1, in_flight=0)  # the round is 0.1 s; the limit not in use
    c.on_overload(now=1.0, sent_at=1.0)
    assert c.limit == 90
    now = 1.0
    grown = []
    for _ in range(8):  # eight rounds of about `limit` successes
        now += 0.1
        succeed(c, c.limit, now=now)
        grown.append(c.limit)
    assert grown[2] <= 91  # about one request more in the first three rounds: 429s stay rare
    assert grown[-1] - grown[-2] >= 8  # by then doubling its step every round: a new capacity is found fast


def test_an_instant_429_sets_the_limit_to_the_load_it_was_sent_at() -> None:
    c = controller(128)
    succeed(c, 30, latency=0.1, in_flight=0)  # learn the round (0.1 s) without growing
    # Sent with 80 in flight (itself included), refused within 2 ms: the server held at most 79.
    assert c.on_overload(now=5.002, sent_at=5.0, load=80, rejected=True)
    assert c.limit == 79 and not c.slow_start
    # More of the same burst measure no lower: no further cut. One sent at a lower load does cut.
    assert not c.on_overload(now=5.003, sent_at=5.0, load=85, rejected=True)
    assert c.on_overload(now=5.004, sent_at=5.001, load=70, rejected=True)
    assert c.limit == 69
    assert c.measured_cuts == 2


def test_refusals_read_while_the_rest_of_a_burst_is_out_hold_the_limit_at_what_is_in_flight() -> None:
    c = controller(128)
    succeed(c, 30, latency=0.1, in_flight=0)  # learn the round (0.1 s) without growing
    c.on_overload(now=5.001, sent_at=5.0, load=120, rejected=True, in_flight=100)
    assert c.limit == 100


def test_a_queued_or_unmeasured_overload_falls_back_to_the_gentle_cut() -> None:
    c = controller(100)
    succeed(c, 30, latency=0.1, in_flight=0)  # learn the round (0.1 s) without growing
    assert c.on_overload(now=5.2, sent_at=5.0, load=50, rejected=True)  # answered after 2 rounds: queued
    assert c.limit == 90
    assert c.on_overload(now=6.0, sent_at=5.9, load=50, rejected=False)  # a 503 or a timeout
    assert c.limit == 81
    assert c.measured_cuts == 0


def test_after_a_measured_cut_the_limit_regrows_fast_to_the_ceiling_left_by_it() -> None:
    c = controller(100)
    succeed(c, 30, latency=0.1, in_flight=0)  # learn the round (0.1 s) without growing
    c.on_overload(now=1.0, sent_at=0.999, load=65, rejected=True)
    assert c.ceiling == 64
    c.value = 40.0  # e.g. a latency cut, or the breaker's outage
    succeed(c, 24, now=1.1)
    assert c.limit == 64


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
        limit.on_success(0.01)  # slow start: 1 -> 1.5
        limit.on_success(0.01)  # 1.5 -> 2
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


def test_the_limit_remembers_the_load_each_task_sent_at() -> None:
    async def main() -> None:
        limit = AdaptiveLimit(4, maximum=4)
        loads: dict[str, int | None] = {}

        async def request(name: str, hold: asyncio.Event) -> None:
            await limit.acquire()
            await hold.wait()
            limit.release()
            loads[name] = limit.task_load()

        holds = [asyncio.Event() for _ in range(5)]
        tasks = [asyncio.ensure_future(request(f"r{i}", hold)) for i, hold in enumerate(holds)]
        await asyncio.sleep(0)
        assert limit.in_flight == 4  # r4 waits
        holds[0].set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for hold in holds[1:]:
            hold.set()
        await asyncio.gather(*tasks)
        assert [loads[f"r{i}"] for i in range(4)] == [1, 2, 3, 4]
        assert loads["r4"] == 4  # handed r0's slot with 4 in flight again
        assert limit.task_load() is None  # this task took no slot

    asyncio.run(main())


def test_an_instant_429_reported_through_the_semaphore_uses_the_senders_load() -> None:
    async def main() -> None:
        clock = [10.0]
        limit = AdaptiveLimit(50, maximum=100, clock=lambda: clock[0])
        for _ in range(20):
            await limit.acquire()
        sent_at = clock[0]
        clock[0] += 0.001
        limit.release()
        assert limit.on_overload(sent_at, rejected=True)  # sent as the 20th: the server held 19
        assert limit.limit == 19

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


def test_a_slot_taken_on_the_fast_path_remembers_its_load_too() -> None:
    async def main() -> None:
        limit = AdaptiveLimit(2, maximum=2)

        async def request() -> tuple[bool, int | None]:
            taken = limit.try_acquire()
            return taken, limit.task_load()

        first = await asyncio.ensure_future(request())
        second = await asyncio.ensure_future(request())
        third = await asyncio.ensure_future(request())
        assert first == (True, 1) and second == (True, 2)
        assert third == (False, None)  # no free slot: nothing taken, no load remembered
        assert limit.in_flight == 2

    asyncio.run(main())


def test_a_refusal_reported_while_it_still_holds_its_slot_is_not_counted_among_those_the_server_holds() -> None:
    # The dispatcher reports a refusal before giving its slot back (given back first, the slot would go to a
    # row waiting at the old limit, refused in turn). The refused request is then still counted in flight,
    # but the server does not hold it: the limit goes to what the others in flight measure.
    async def main() -> None:
        clock = [10.0]
        limit = AdaptiveLimit(20, maximum=100, clock=lambda: clock[0])
        for _ in range(20):
            await limit.acquire()
        sent_at = clock[0]
        clock[0] += 0.001
        for _ in range(5):  # five answers came back meanwhile: 15 in flight, the refused one among them
            limit.release()
        assert limit.on_overload(sent_at, rejected=True, load=20, holding=True)
        assert limit.limit == 14
        limit.release()
        assert limit.in_flight == 14

    asyncio.run(main())


def test_a_refused_request_waits_ahead_of_the_queue_for_the_slot_the_next_answer_frees() -> None:
    # A slot free when the refusal is read says nothing about the endpoint (it had no room a moment ago):
    # the refused request waits for one an answer gives back, and takes it before rows that waited longer.
    async def main() -> None:
        limit = AdaptiveLimit(3, maximum=3)
        assert limit.try_acquire() and limit.try_acquire()  # two in flight, one slot free
        refused = asyncio.ensure_future(limit.acquire(ahead=True))
        await asyncio.sleep(0)
        assert not refused.done() and limit.in_flight == 2  # the free slot is not taken
        assert not limit.try_acquire()  # nor handed to a newcomer past it
        limit.release()  # an answer came back
        assert await asyncio.wait_for(refused, 1) == 2

        limit.controller.value = 2.0  # full: two in flight, a row already waiting
        waiting = asyncio.ensure_future(limit.acquire())
        refused = asyncio.ensure_future(limit.acquire(ahead=True))
        await asyncio.sleep(0)
        limit.release()  # one slot back: it goes to the refused request, not to the row before it
        await asyncio.sleep(0)
        assert refused.done() and not waiting.done()
        limit.release()
        await asyncio.wait_for(waiting, 1)
        assert limit.in_flight == 2

    asyncio.run(main())


def test_a_refused_request_with_nothing_in_flight_takes_a_free_slot_at_once() -> None:
    # Nothing in flight gives a slot back: waiting for an answer would wait for ever.
    async def main() -> None:
        limit = AdaptiveLimit(2, maximum=2)
        assert await asyncio.wait_for(limit.acquire(ahead=True), 1) == 1

    asyncio.run(main())
