"""An adaptive concurrency limit: find an endpoint's capacity without being told it.

TGI admits ``max_concurrent_requests`` (128 per replica by default) and answers 429 at once beyond
that; replicas come and go. The limit follows AIMD, as TCP and Netflix's concurrency-limits do, with
a latency check in the style of Netflix's Gradient2:

- **Slow start**: until the first overload, each success adds 1 (the limit doubles every round).
- **Additive increase**: after that, each success adds ``1/limit`` (the limit grows by 1 per round).
- **Multiplicative decrease**: an overload (429, 503, timeout) multiplies the limit by
  ``decrease_factor`` (0.9), **once per round**: an overload reported by a request sent before the
  last decrease is the same event seen again and is ignored, so a burst of 429s answering one
  overshoot does not collapse the limit to ``minimum``. This is TCP's "once per window" rule.
  0.9 rather than TCP's 0.5/0.7: TGI rejects instantly instead of queueing, so overshooting by a
  request costs one fast 429, while a deep cut costs throughput for many rounds. Measured on the
  emulator (2 replicas x 32 slots, 100 ms): 0.8 reached 80% of capacity, 0.9 reached 87% with
  under 1% 429s (benchmarks/RESULTS.md). A sustained overload still halves the limit in 7 rounds.
- **Latency**: a short average of latency (last ~10 samples) is compared with a long, slowly moving
  baseline (~200 samples, pulled down faster than up). When the short one exceeds
  ``latency_tolerance`` (2.0) × the baseline, the server is queueing: growth stops and the limit is
  cut gently (× ``latency_decrease_factor``, 0.95) at most once per round. A baseline rather than the
  minimum, because generation latency varies with output length: the fastest reply ever seen is not
  what a normal reply should take.
- Growth only while the limit is in use (``in_flight * 2 >= limit``), so a slow input does not let the
  limit drift up to ``maximum`` and then overload the endpoint in one burst.

:class:`LimitController` is the pure arithmetic (a clock is passed in, nothing waits);
:class:`AdaptiveLimit` wraps it in an asyncio semaphore whose size follows it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

__all__ = ["AdaptiveLimit", "LimitController"]


class LimitController:
    """The AIMD + latency arithmetic behind :class:`AdaptiveLimit`. Pure: time comes in as ``now``."""

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
    ) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got minimum={minimum}, maximum={maximum}")
        if not 0 < decrease_factor < 1 or not 0 < latency_decrease_factor <= 1:
            raise ValueError("decrease factors must lie in (0, 1)")
        self.minimum = minimum
        self.maximum = maximum
        self.decrease_factor = decrease_factor
        self.latency_tolerance = latency_tolerance
        self.latency_decrease_factor = latency_decrease_factor
        self.short_alpha = short_alpha
        self.long_alpha = long_alpha
        self.warmup_samples = warmup_samples
        self.default_round_s = default_round_s
        self.value = float(min(max(initial, minimum), maximum))
        self.slow_start = True
        self.short_latency: float | None = None
        self.baseline_latency: float | None = None
        self.samples = 0
        self.overloads_seen = 0  # every overload reported, counted or not
        self.decreases = 0  # decreases actually applied
        self._last_decrease_at = -math.inf

    @property
    def limit(self) -> int:
        """The current limit as a whole number of concurrent requests."""
        return min(self.maximum, max(self.minimum, math.floor(self.value)))

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
        """A request succeeded after ``latency_s`` seconds, with ``in_flight`` requests running."""
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
        self._set(self.value + (1.0 if self.slow_start else 1.0 / self.value))

    def on_overload(self, *, now: float, sent_at: float | None = None) -> bool:
        """The endpoint said it is overloaded to a request sent at ``sent_at``. True if the limit dropped.

        Without ``sent_at`` the request is taken to have been sent one round ago.
        """
        self.overloads_seen += 1
        if sent_at is None:
            sent_at = now - self.round_s
        if sent_at < self._last_decrease_at:
            return False  # sent before the last cut: the same overload event, already answered
        self.slow_start = False
        self._set(self.value * self.decrease_factor)
        self._last_decrease_at = now
        self.decreases += 1
        return True

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
        self.value = min(float(self.maximum), max(float(self.minimum), value))


class AdaptiveLimit:
    """An asyncio semaphore whose size is an adaptive concurrency limit.

    Use ``async with limit.slot(): ...`` (or :meth:`acquire` / :meth:`release`) around each request,
    and report outcomes with :meth:`on_success` and :meth:`on_overload`. Waiters are served in FIFO
    order. When the limit drops below ``in_flight``, nothing is interrupted: new requests wait until
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
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

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

    async def acquire(self) -> None:
        """Wait for a free slot and take it."""
        if not self._waiters and self._in_flight < self.limit:
            self._in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
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

    def on_overload(self, sent_at: float | None = None) -> bool:
        """Report a 429/503/timeout for a request sent at ``sent_at`` (this limit's clock). True if cut."""
        return self.controller.on_overload(now=self._clock(), sent_at=sent_at)

    @property
    def value(self) -> float:
        """The limit as the controller holds it (fractional)."""
        return self.controller.value

    def raise_to(self, value: float) -> None:
        """Go back to at least ``value`` (the level that was good before an outage), and wake waiters."""
        if value > self.controller.value:
            self.controller.value = min(float(self.controller.maximum), value)
            self._wake()

    def _wake(self) -> None:
        # Hand slots over directly (count them as taken here) so a newcomer cannot jump the queue.
        while self._waiters and self._in_flight < self.limit:
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._in_flight += 1
            waiter.set_result(None)

    def try_acquire(self) -> bool:
        """Take a free slot now if one is free and nobody waits for it; False (nothing taken) otherwise.

        The dispatcher's fast path: a slot taken without waiting needs no cancel scope around it.
        """
        if not self._waiters and self._in_flight < self.limit:
            self._in_flight += 1
            return True
        return False
