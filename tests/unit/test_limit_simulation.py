"""The adaptive limit against a simulated TGI server: a discrete-event simulation on a fake clock.

The server has N slots, a fixed latency and answers an instant 429 past N in flight; N changes at set
times (replicas added or lost). The client is the dispatcher in miniature: a fixed pool of workers,
each taking a slot of the limit's size before sending, and a small delay between the server finishing
a request and the client reading the answer (1-4 ms: what an idle client's event loop adds). A 429 is
retried as the dispatcher does (batchrun.retry.next_step): a row's first refusal waits at the head of
the queue for the slot the next answer frees; a row refused again backs off with full jitter
(uniform 0 to 0.5 s x 2**streak, the default policy). Nothing sleeps and nothing is timed: the
figures are functions of the seed.
"""

from __future__ import annotations

import collections
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from batchrun.limit import LimitController
from batchrun.spec import ConcurrencySpec, RetrySpec

Capacity = Callable[[float], int]


def steps(*changes: tuple[float, int]) -> Capacity:
    """A capacity that is ``changes[i][1]`` from time ``changes[i][0]`` on."""

    def capacity(t: float) -> int:
        current = changes[0][1]
        for at, value in changes:
            if t >= at:
                current = value
        return current

    return capacity


@dataclass
class Simulation:
    capacity: Capacity
    latency: float = 0.1
    rows: int | None = None  # None: an endless input
    initial: int = ConcurrencySpec.initial
    maximum: int = 512
    workers: int = 512
    net_s: float = 0.0002  # each way
    read_s: tuple[float, float] = (0.001, 0.004)  # server done -> the client reads the answer (uniform)
    seed: int = 0
    tuning: dict = field(default_factory=dict)
    controller: LimitController = field(init=False)
    now: float = 0.0
    in_flight: int = 0  # the client's slots held
    admitted: int = 0  # the server's requests running
    done: int = 0
    answers: list[tuple[float, int]] = field(default_factory=list)  # (time, status) as the client read them
    busy: list[tuple[float, int, int]] = field(default_factory=list)  # (time, admitted, capacity) changes
    limits: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.controller = LimitController(self.initial, maximum=self.maximum, **self.tuning)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._rng = random.Random(self.seed)
        self._waiting: collections.deque[int] = collections.deque()  # rows waiting for a slot: their 429s so far
        self._refused: list[int] = []  # rows refused once, for the head of the queue at the next answer
        self._next_row = 0
        for _ in range(self.workers):
            self._take_row()
        self._record_busy()

    # -- the event loop
    def _at(self, t: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, action))

    def run(self, until: float = 600.0) -> Simulation:
        self._fill()
        while self._events and self._events[0][0] <= until:
            self.now, _, action = heapq.heappop(self._events)
            action()
            self._fill()
        return self

    # -- the client
    def _take_row(self) -> None:
        if self.rows is None or self._next_row < self.rows:
            self._waiting.append(0)
            self._next_row += 1

    def _fill(self) -> None:
        while self._waiting and self.in_flight < self.controller.limit:
            streak = self._waiting.popleft()
            self.in_flight += 1
            self._send(self.now, load=self.in_flight, streak=streak)
        self.limits.append((self.now, self.controller.limit))

    def _send(self, sent_at: float, load: int, streak: int = 0) -> None:
        arrive = sent_at + self.net_s

        def at_server() -> None:
            if self.admitted >= self.capacity(self.now):
                self._at(self.now + self.net_s, lambda: self._answered(sent_at, load, ok=False, streak=streak))
                return
            self.admitted += 1
            self._record_busy()
            self._at(self.now + self.latency, finish)

        def finish() -> None:
            self.admitted -= 1
            self._record_busy()
            self._at(self.now + self.net_s + self._rng.uniform(*self.read_s), lambda: self._answered(sent_at, load, ok=True))

        self._at(arrive, at_server)

    def _answered(self, sent_at: float, load: int, *, ok: bool, streak: int = 0) -> None:
        # The answer gives its slot back: rows refused once since the last answer go first.
        self._waiting.extendleft(self._refused)
        self._refused.clear()
        self.in_flight -= 1
        self.answers.append((self.now, 200 if ok else 429))
        if ok:
            self.controller.on_success(self.now - sent_at, now=self.now, in_flight=self.in_flight)
            self.done += 1
            self._take_row()
        else:
            self.controller.on_overload(
                now=self.now, sent_at=sent_at, load=load, rejected=True, in_flight=self.in_flight
            )
            if streak == 0:
                self._refused.append(1)
            else:
                backoff = min(RetrySpec.backoff_cap, RetrySpec.backoff_base * 2.0**streak)
                self._at(self.now + self._rng.uniform(0.0, backoff), lambda: self._waiting.append(streak + 1))

    def _record_busy(self) -> None:
        self.busy.append((self.now, self.admitted, self.capacity(self.now)))

    # -- what was measured
    def used(self, start: float, end: float) -> float:
        """The fraction of the server's capacity in use over [start, end]: ∫admitted / ∫capacity."""
        used = offered = 0.0
        points = [*self.busy, (end, 0, 0)]
        for (t0, admitted, _), (t1, _, _) in zip(points, points[1:], strict=False):
            a, b = max(t0, start), min(t1, end)
            if b > a:
                used += admitted * (b - a)
                offered += self.capacity(a) * (b - a)
        return used / offered if offered else 0.0

    def share_429(self, start: float = 0.0, end: float = float("inf")) -> float:
        statuses = [status for t, status in self.answers if start <= t < end]
        return statuses.count(429) / len(statuses) if statuses else 0.0

    def span(self) -> tuple[float, float]:
        """First request arriving at the server to the last one it finished."""
        return self.net_s, max(t for t, _, _ in self.busy)

    def settled_after(self, t0: float, good: Callable[[float, float], bool], window: float = 1.0) -> float:
        """Seconds after ``t0`` until the first window (stepped by 0.1 s) in which ``good`` holds."""
        t = t0
        while not good(t, t + window):
            t += 0.1
            assert t < t0 + 60, "never settled"
        return t - t0


def test_a_hidden_capacity_is_used_from_the_start_of_a_4000_row_job() -> None:
    # Goal 1 in miniature: 2 replicas x 32 slots, 100 ms, concurrency.max 512, the default initial (48).
    # What is lost, as shares of the span: slow start's first round at 48 (0.6%), the client's 1-4 ms to
    # read each answer (2.6%) and the last round's drain (0.4%): 0.964-0.965 for seeds 0-2, 28 429s (0.7%):
    # the second round, at 72, overshoots by 8. From the old default 8, doubling, it was 0.922-0.935.
    for seed in range(3):
        sim = Simulation(steps((0, 64)), rows=4000, seed=seed).run()
        assert sim.done == 4000
        first, last = sim.span()
        assert 4000 / (last - first) / (64 / 0.1) >= 0.95
        assert sim.share_429() < 0.02


def test_a_smaller_start_costs_the_rounds_of_slow_start_it_takes() -> None:
    # The same job from initial 8: five rounds of growth by half to 64 instead of one, 4.5 points less.
    for seed in range(3):
        sim = Simulation(steps((0, 64)), rows=4000, seed=seed, initial=8).run()
        first, last = sim.span()
        assert 0.90 <= 4000 / (last - first) / (64 / 0.1) < 0.95
        assert sim.share_429() < 0.02


@pytest.mark.parametrize("read_s", [(0.001, 0.004), (0.005, 0.02)], ids=["an idle client", "a busy client"])
def test_a_hidden_capacity_is_used_as_well_as_a_capacity_the_job_is_told(read_s: tuple[float, float]) -> None:
    # What the client adds to each request (its time to read an answer and send the next) leaves the
    # server's slot empty whatever the limit knows: a job told the capacity (initial = max = 64) loses it
    # too. 5-20 ms a request is what benchmarks/capacity.py measured on a shared core (0.88 here, 0.86-0.87
    # for its `told` scenario); the controller must lose nothing more than that.
    def fraction(sim: Simulation) -> float:
        first, last = sim.span()
        return 4000 / (last - first) / (64 / 0.1)

    hidden = Simulation(steps((0, 64)), rows=4000, read_s=read_s).run()
    told = Simulation(steps((0, 64)), rows=4000, read_s=read_s, initial=64, maximum=64).run()
    assert told.share_429() == 0
    assert fraction(hidden) >= fraction(told) - 0.005
    assert hidden.share_429() < 0.02


def test_slow_start_reaches_the_capacity_within_four_rounds_and_stops_there() -> None:
    sim = Simulation(steps((0, 64))).run(until=1.0)
    reached = min(t for t, limit in sim.limits if limit >= 64)
    assert reached <= 0.4
    # The overshoot (at most one round's doubling) is measured by its instant 429s: the limit goes
    # back to the capacity, not 10% below it, and the 429s stop.
    assert 64 <= sim.controller.limit <= 68
    assert sim.share_429(0.6, 1.0) < 0.01  # a probe past the edge now and then


def test_a_steady_capacity_is_used_at_least_97_percent_with_under_one_percent_429s() -> None:
    sim = Simulation(steps((0, 64))).run(until=15)
    assert sim.used(2, 15) >= 0.97
    assert sim.share_429(2, 15) < 0.01


def test_replicas_added_one_by_one_are_used_within_two_seconds_of_the_last() -> None:
    # Goal 2: 1 -> 4 replicas of 32 slots, one more every 2 s from t=10; the client is told nothing.
    sim = Simulation(steps((0, 32), (10, 64), (12, 96), (14, 128))).run(until=25)
    assert sim.used(5, 10) >= 0.95
    assert sim.settled_after(14, lambda a, b: sim.used(a, b) >= 0.9) <= 2.0
    assert sim.used(18, 25) >= 0.95
    assert sim.share_429(18, 25) < 0.01


def test_a_lost_replica_brings_429s_back_under_two_percent_within_a_second() -> None:
    # Goal 3: 4 -> 3 replicas of 32 at t=10; the requests already admitted finish, nothing is admitted
    # until fewer than 96 run, then the limit must hold at the new capacity.
    sim = Simulation(steps((0, 128), (10, 96))).run(until=18)
    assert sim.settled_after(10, lambda a, b: sim.share_429(a, b) < 0.02) <= 1.0
    assert sim.used(12, 18) >= 0.95


def test_capacity_halving_and_recovering_is_followed_both_ways() -> None:
    sim = Simulation(steps((0, 64), (10, 32), (20, 64))).run(until=28)
    assert sim.settled_after(10, lambda a, b: sim.share_429(a, b) < 0.02) <= 1.0
    assert sim.used(12, 20) >= 0.95
    assert sim.settled_after(20, lambda a, b: sim.used(a, b) >= 0.9) <= 2.0
    assert sim.used(23, 28) >= 0.95
