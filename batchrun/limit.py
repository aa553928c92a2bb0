"""An adaptive concurrency limit: find an endpoint's capacity without being told it, and follow it.

TGI admits ``max_concurrent_requests`` (128 per replica by default) and answers an instant 429
(``"error_type": "overloaded"``, no Retry-After) beyond that; replicas come and go. The limit is a
TCP-style window with one addition that an instant-rejecting server makes possible: **a 429 measures
the capacity**.

- **The measurement.** Every request remembers its *load*: how many requests this limit had in flight
  when it was sent, itself included. A server that rejects at once rather than queueing rejected it
  because it already held at least its capacity of others, and it cannot have held more than this
  client had out (load - 1): requests not yet arrived and answers not yet read count here but not
  there. So an instant 429 (no Retry-After, answered in well under a round) says capacity <= load - 1,
  and the limit goes straight to that level. A burst of 429s from one overshoot is the same bound seen
  several times and cuts no further than its smallest value; no "once per round" rule is needed, and a
  slow-start overshoot costs a handful of 429s instead of several rounds of a cut far below capacity.
  (The in-flight count *when the 429 came back* is no measure: in a slow-start burst every request
  sent is still in flight then. That was tried and failed; see benchmarks/RESULTS.md.)
- **Slow start**: until the first overload, each success adds ``slow_start_gain`` (0.5: the limit grows
  by half every round; from the default initial 48 at 100 ms, 64 is passed in 1 round, 128 in 3). Not
  doubling: the round that passes a capacity C sends up to (gain x C) past it, and a client that reads
  its answers in bursts sends all of them before it reads the first refusal (from 64, doubling cost a
  whole wave of 64 429s in some runs of benchmarks/capacity.py). Each round below the capacity costs
  the endpoint the slots left empty, hence the larger start: from 8, doubling, the three rounds to 64
  were 3.3% of a 4,000-row job's time, 0.6% from 48. Fast regrowth brings the limit back to the
  *ceiling* (the last measured level), one per success, after anything that left it below, such as a
  latency cut.
- **A refused request waits ahead**: the dispatcher retries a row's first instant refusal not after a
  timed backoff but at the head of the queue (``acquire(ahead=True)``), for the slot the next answer
  gives back: the limit was just cut to what is in flight, so that slot is the first the endpoint has
  room for. Sleeping instead left it to rows behind, or idle at the end of a job.
- **Probing** above the ceiling: the step per round starts small (1/8) and doubles every round
  without an overload. Just after a 429 the limit sits at the measured level and probes one request
  past it only every few rounds, so 429s stay rare; if the capacity has grown (a replica added), the
  growing step reaches it in a few rounds, exponentially, like a new slow start, and the next instant
  429 measures the new level.
- **Other overloads** (a 503, a timeout, a 429 that queued or carries Retry-After) measure nothing:
  they multiply the limit by ``decrease_factor`` (0.9), once per round: one sent before the last cut
  is the same event seen again (TCP's "once per window" rule). 0.9 rather than TCP's 0.5/0.7, because
  a deep cut costs throughput for many rounds.
- **Latency**: a short average of latency (last ~10 samples) is compared with a long, slowly moving
  baseline (~200 samples, pulled down faster than up). When the short one exceeds
  ``latency_tolerance`` (2.0) × the baseline, the server is queueing: growth stops and the limit is
  cut gently (× ``latency_decrease_factor``, 0.95) at most once per round. A baseline rather than the
  minimum, because generation latency varies with output length.
- Growth only while the limit is in use (``in_flight * 2 >= limit``), so a slow input does not let the
  limit drift up to ``maximum`` and then overload the endpoint in one burst; probing above the ceiling
  only while it is saturated (every slot in use), so a lane held back by its rate gate
  (:mod:`batchrun.rate`) stays at the capacity it measured. The rate gate and this limit are the one
  pair of controls of a lane: rate 429s go to the gate, capacity 429s here.

Measured (benchmarks/RESULTS.md, "Adaptive limit"): plain AIMD used ~0.79-0.86 of a hidden capacity;
this controller is compared with it there, and tests/unit/test_limit_simulation.py checks it against a
simulated server with a fake clock (0.96 of a 64-slot capacity over a 4,000-row job, the rest being the
client's own time to read each answer and the last round's drain).

:class:`LimitController` is the pure arithmetic (a clock is passed in, nothing waits);
:class:`AdaptiveLimit` wraps it in an asyncio semaphore whose size follows it, and remembers each
request's load for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["AdaptiveLimit", "LimitController"]

# The load of the request the current task last sent: (id of the AdaptiveLimit, requests in flight when
# its slot was taken, itself included). A context variable because each dispatcher worker is its own
# asyncio task and reports its outcome from the same task, after the slot is released: the dispatcher
# need not carry the number around. Module-level, as context variables should be.
_TASK_LOAD: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("batchrun_limit_load", default=None)
# Probing above the ceiling: the exponent of the step is capped so that 2**rounds stays a float.
_MAX_PROBE_ROUNDS = 60.0


class LimitController:
    """The arithmetic behind :class:`AdaptiveLimit` (see the module docstring). Pure: time comes in as ``now``."""

    def __init__(
        self,
        initial: int,
        *,
        minimum: int = 1,
        maximum: int,
        decrease_factor: float = 0.9,
        latency_tolerance: float = 2.0,
        latency_decrease_factor: float = 0.95,
        short_alpha: float = 0.1,
        long_alpha: float = 0.005,
        warmup_samples: int = 20,
        default_round_s: float = 1.0,
        slow_start_gain: float = 0.5,
        probe_step: float = 0.125,
        instant_fraction: float = 0.5,
        saturation_slack: int = 1,
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got minimum={minimum}, maximum={maximum}")
        if not 0 < decrease_factor < 1 or not 0 < latency_decrease_factor <= 1:
            raise ValueError("decrease factors must lie in (0, 1)")
        if not probe_step > 0 or not 0 < instant_fraction <= 1:
            raise ValueError("probe_step must be positive and instant_fraction in (0, 1]")
        self.minimum = minimum
        self.maximum = maximum
        self.decrease_factor = decrease_factor
        self.latency_tolerance = latency_tolerance
        self.latency_decrease_factor = latency_decrease_factor
        self.short_alpha = short_alpha
        self.long_alpha = long_alpha
        self.warmup_samples = warmup_samples
        self.default_round_s = default_round_s
        # Slow start adds this per success: 0.5 grows the limit by half every round, 1 doubles it.
        self.slow_start_gain = slow_start_gain
        # Probing above the ceiling adds this much per round just after a cut, doubling every round.
        self.probe_step = probe_step
        # A rejection answered within this fraction of a round was not queued: its load measures capacity.
        self.instant_fraction = instant_fraction
        # Probing above the ceiling only while the limit is what holds requests back: all but this many
        # slots in use when an answer comes (in_flight excludes that answer's own slot). A lane held
        # below its limit by something else (its rate gate, a slow input) does not creep up past capacity.
        self.saturation_slack = saturation_slack
        #: The current limit as a whole number of concurrent requests (set with ``value``).
        self.limit: int = 1
        self.value = float(min(max(initial, minimum), maximum))
        self.slow_start = True
        # The level the last overload left the limit at: below it the limit regrows fast, above it it probes.
        self.ceiling: float | None = None
        self.short_latency: float | None = None
        self.baseline_latency: float | None = None
        self.samples = 0
        self.overloads_seen = 0  # every overload reported, counted or not
        self.decreases = 0  # decreases actually applied
        self.measured_cuts = 0  # decreases to a level measured by an instant rejection
        self._last_decrease_at = -math.inf

    @property
    def value(self) -> float:
        """The limit as the controller holds it: fractional, so that it can grow by a fraction per answer."""
        return self._value

    @value.setter
    def value(self, value: float) -> None:
        self._value = value
        # The whole number is kept beside it: every request asks for it, the value changes far less often.
        self.limit = min(self.maximum, max(self.minimum, math.floor(value)))

    @property
    def round_s(self) -> float:
        """One round: the time a request takes now (the smoothed latency)."""
        return self.short_latency if self.short_latency is not None else self.default_round_s

    @property
    def latency_ratio(self) -> float:
        """Short-term latency over the baseline; 1.0 until the baseline has warmed up."""
        if self.samples < self.warmup_samples or not self.baseline_latency:
            return 1.0
        return (self.short_latency or 0.0) / self.baseline_latency

    def on_success(self, latency_s: float, *, now: float, in_flight: int) -> None:
        """A request succeeded after ``latency_s`` seconds; ``in_flight`` requests are running now."""
        self._observe(latency_s)
        if self.latency_ratio > self.latency_tolerance:
            # The server is queueing: do not add load; back off gently, once per round.
            if now - self._last_decrease_at >= self.round_s:
                self._set(self.value * self.latency_decrease_factor)
                self._last_decrease_at = now
                self.decreases += 1
            return
        if in_flight * 2 < self.limit:
            return  # the limit is not what holds us back; growing it would mean nothing
        if self.slow_start:
            self._set(self.value + self.slow_start_gain)
        elif self.ceiling is not None and self.value < self.ceiling:
            self._set(min(self.value + 1.0, self.ceiling))  # back to the known level at slow-start pace
        elif in_flight + self.saturation_slack >= self.limit:
            self._set(self.value + self._probe_step(now) / self.value)

    def on_overload(
        self,
        *,
        now: float,
        sent_at: float | None = None,
        load: int | None = None,
        rejected: bool = False,
        in_flight: int | None = None,
    ) -> bool:
        """The endpoint said it is overloaded to a request sent at ``sent_at``. True if the limit dropped.

        ``rejected``: the server refused it for want of capacity (TGI's 429 without Retry-After),
        ``load`` is how many requests were in flight when it was sent, itself included, and
        ``in_flight`` how many are in flight now (without it). If the refusal came at once, the limit
        goes to ``min(load - 1, in_flight)`` (module docstring). Otherwise the limit is cut by
        ``decrease_factor`` once per round; without ``sent_at`` the request is taken to have been sent
        one round ago.
        """
        self.overloads_seen += 1
        self.slow_start = False
        if sent_at is None:
            sent_at = now - self.round_s
        if rejected and load is not None and now - sent_at < self.instant_fraction * self.round_s:
            # Both are upper bounds on what the server holds; in_flight is the tighter one while the rest
            # of a burst is still being refused, and holding the limit there sends nothing new until an
            # answer frees a slot, so a refusal does not hand its slot to a request refused in turn.
            bound = max(float(self.minimum), load - 1.0 if in_flight is None else min(load - 1.0, in_flight))
            if bound >= self.value:
                return False  # the limit is already at or below what this refusal measured
            self._cut_to(bound, now)
            self.measured_cuts += 1
            return True
        if sent_at < self._last_decrease_at:
            return False  # sent before the last cut: the same overload event, already answered
        self._cut_to(self.value * self.decrease_factor, now)
        return True

    def raise_to(self, value: float) -> bool:
        """Go back up to at least ``value`` (a level known good before an outage). True if it rose."""
        if value <= self.value:
            return False
        self._set(value)
        return True

    def _cut_to(self, value: float, now: float) -> None:
        self._set(value)
        self.ceiling = self.value
        self._last_decrease_at = now
        self.decreases += 1

    def _probe_step(self, now: float) -> float:
        """How much to add per round above the ceiling: small just after a cut, doubling every round since.

        Just after a cut the limit sits where the endpoint said no, so one request more is most likely
        another 429: the first whole step comes after about 3 rounds. If the capacity has grown, the
        doubling step finds it in a few rounds more. Never more than doubling per round (slow start).
        """
        rounds = min((now - self._last_decrease_at) / self.round_s, _MAX_PROBE_ROUNDS)
        return min(self.probe_step * 2.0**rounds, self.value)

    def _observe(self, latency_s: float) -> None:
        latency_s = max(latency_s, 1e-6)
        self.samples += 1
        if self.short_latency is None or self.baseline_latency is None:
            self.short_latency = self.baseline_latency = latency_s
            return
        self.short_latency += self.short_alpha * (latency_s - self.short_latency)
        # The baseline follows slowly, but comes down ten times faster than it goes up: after a
        # queueing episode it must recover quickly, while a creeping rise should not become "normal".
        alpha = self.long_alpha * (10 if self.short_latency < self.baseline_latency else 1)
        self.baseline_latency += alpha * (self.short_latency - self.baseline_latency)

    def _set(self, value: float) -> None:
        value = min(float(self.maximum), max(float(self.minimum), value))
        if value != self._value:  # at the maximum, every answer asks for more and changes nothing
            self.value = value


class AdaptiveLimit:
    """An asyncio semaphore whose size is an adaptive concurrency limit.

    Use ``async with limit.slot(): ...`` (or :meth:`acquire` / :meth:`release`) around each request,
    and report outcomes with :meth:`on_success` and :meth:`on_overload`, from the task that acquired the
    slot: the limit remembers, per task, the load its last request was sent at. Waiters are served in
    FIFO order. When the limit drops below ``in_flight``, nothing is interrupted: new requests wait until
    enough running ones finish.
    """

    def __init__(
        self,
        initial: int,
        *,
        minimum: int = 1,
        maximum: int,
        clock: Callable[[], float] = time.monotonic,
        **tuning: Any,
    ) -> None:
        self.controller = LimitController(initial, minimum=minimum, maximum=maximum, **tuning)
        self._clock = clock
        self._in_flight = 0
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    def __repr__(self) -> str:
        return f"AdaptiveLimit(limit={self.limit}, in_flight={self.in_flight}, waiting={len(self._waiters)})"

    @property
    def limit(self) -> int:
        """How many requests may run at once right now."""
        return self.controller.limit

    @property
    def in_flight(self) -> int:
        """How many slots are held."""
        return self._in_flight

    async def acquire(self, *, ahead: bool = False) -> int:
        """Wait for a free slot and take it. Returns the load: requests in flight now, this one included.

        ``ahead``: a request the endpoint just refused for want of capacity. It waits at the head of the
        queue for the next slot an answer gives back (the endpoint had no room a moment ago: a slot that
        is free now says nothing about the endpoint), unless nothing is in flight to give one back.
        """
        if ahead and self._in_flight > 0:
            load = await self._wait_for_slot(ahead=True)
        elif not self._waiters and self._in_flight < self.limit:
            self._in_flight += 1
            load = self._in_flight
        else:
            load = await self._wait_for_slot()
        _TASK_LOAD.set((id(self), load))
        return load

    async def _wait_for_slot(self, *, ahead: bool = False) -> int:
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if ahead:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back."""
        if self._in_flight <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_flight -= 1
        self._wake()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def on_success(self, latency_s: float) -> None:
        """Report a success; the limit may grow."""
        self.controller.on_success(latency_s, now=self._clock(), in_flight=self._in_flight)
        self._wake()

    def on_overload(
        self, sent_at: float | None = None, *, rejected: bool = False, load: int | None = None, holding: bool = False
    ) -> bool:
        """Report a 429/503/timeout for a request sent at ``sent_at`` (this limit's clock). True if cut.

        ``rejected``: a refusal for want of capacity (TGI's 429 without Retry-After). ``load`` defaults
        to the load of the last request this task sent through this limit. ``holding``: the refused
        request still holds its slot (it is not counted in flight). Reporting before the slot is given
        back is what lets a cut take effect at once: a slot released first goes to a waiter at the old
        limit, who is refused in turn, and a burst of refusals would lower the limit one by one.
        """
        if load is None:
            load = self.task_load()
        in_flight = self._in_flight - 1 if holding else self._in_flight
        return self.controller.on_overload(
            now=self._clock(), sent_at=sent_at, load=load, rejected=rejected, in_flight=in_flight
        )

    def task_load(self) -> int | None:
        """The load the current task's last request was sent at (None if it took no slot here)."""
        remembered = _TASK_LOAD.get()
        return remembered[1] if remembered is not None and remembered[0] == id(self) else None

    @property
    def value(self) -> float:
        """The limit as the controller holds it (fractional)."""
        return self.controller.value

    def raise_to(self, value: float) -> None:
        """Go back to at least ``value`` (the level that was good before an outage), and wake waiters."""
        if self.controller.raise_to(value):
            self._wake()

    def _wake(self) -> None:
        # Hand slots over directly (count them as taken here) so a newcomer cannot jump the queue.
        while self._waiters and self._in_flight < self.controller.limit:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._in_flight += 1
            waiter.set_result(self._in_flight)

    def try_acquire(self) -> bool:
        """Take a free slot now if one is free and nobody waits for it; False (nothing taken) otherwise.

        The dispatcher's fast path: a slot taken without waiting needs no cancel scope around it. The
        load is remembered for the task, as :meth:`acquire` does.
        """
        if not self._waiters and self._in_flight < self.controller.limit:
            self._in_flight += 1
            _TASK_LOAD.set((id(self), self._in_flight))
            return True
        return False
