"""A circuit breaker: when the endpoint stops answering, stop sending and let one probe find its return.

Without it, an outage costs a multiple of its length: first attempts keep going out at full speed,
each row fails once, and the retries then trickle out at the retry budget's floor long after the
endpoint is back. With it (reliability.md §2):

    CLOSED     requests flow. When most of the recent outcomes say "unavailable" (a 500, 502, 503 or
               504 that is not the model server's own JSON error, a refused or reset connection, a
               timeout), or the last few in a row do, the breaker opens.
    OPEN       nothing is sent; rows that failed meanwhile keep their attempts. Every ``probe_s``
               (growing up to ``max_probe_s``) one request may go out: HALF_OPEN.
    HALF_OPEN  one probe is on the wire. Its success closes the breaker; its failure opens it again.

When it closes, work resumes at the concurrency that was good before the outage, so an outage of T
seconds costs about T plus a few round trips. 429 is not unavailability: it is the adaptive limit's
business. Only failures of different rows count as an outage: one row whose every request fails (a
prompt that breaks the model) is that row's problem, even at the end of a job when it is the only one
still sending. Pure arithmetic on a clock that is passed in; the dispatcher does the waiting.
"""

from __future__ import annotations

import enum
from collections import deque

__all__ = ["Admission", "BreakerState", "CircuitBreaker"]

#: Unavailable outcomes in a row, of this many different rows, after which a failure is taken as the
#: endpoint's until it is known.
SUSPICION_STREAK = 2


class BreakerState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class Admission(str, enum.Enum):
    """What a request that wants to go out may do now."""

    SEND = "send"  # the breaker is closed
    PROBE = "probe"  # this request is the one probe
    WAIT = "wait"  # wait, at most ``CircuitBreaker.wait_s(now)``


class CircuitBreaker:
    """Counts recent outcomes and says whether requests may go out. See the module docstring."""

    def __init__(
        self,
        *,
        window: int = 20,
        min_outcomes: int = 10,
        trip_share: float = 0.5,
        trip_streak: int = 5,
        probe_s: float = 0.25,
        max_probe_s: float = 2.0,
    ) -> None:
        if not 0 < trip_share <= 1 or min_outcomes < 1 or window < min_outcomes:
            raise ValueError("need 0 < trip_share <= 1 and 1 <= min_outcomes <= window")
        self.trip_share = trip_share
        self.trip_streak = trip_streak  # this many unavailable outcomes in a row open it at once
        self._streak: set[int] = set()  # the rows of the current run of unavailable outcomes
        self.min_outcomes = min_outcomes
        self.probe_s = probe_s
        self.max_probe_s = max_probe_s
        self.state = BreakerState.CLOSED
        self.opened_at: float | None = None  # when the current outage was first seen
        self.trips = 0  # outages seen
        self._recent: deque[tuple[bool, int]] = deque(maxlen=window)  # (unavailable, row)
        self._unavailable = 0
        self._next_probe_at = 0.0
        self._probe_wait = probe_s

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.state.value}, trips={self.trips})"

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    @property
    def suspects_outage(self) -> bool:
        """Open, or the last outcomes in a row were unavailable: a failure now may be the endpoint's,
        not the row's, so the row should not use up its attempts on it."""
        return self.state is not BreakerState.CLOSED or len(self._streak) >= SUSPICION_STREAK

    def admit(self, now: float) -> Admission:
        """May a request go out now? A PROBE answer is given to one request at a time."""
        if self.state is BreakerState.CLOSED:
            return Admission.SEND
        if self.state is BreakerState.OPEN and now >= self._next_probe_at:
            self.state = BreakerState.HALF_OPEN
            return Admission.PROBE
        return Admission.WAIT

    def wait_s(self, now: float) -> float:
        """How long a waiting request should wait before asking again (the next probe's time)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self._next_probe_at - now)
        return self.max_probe_s  # a probe is on the wire: its answer wakes the waiters

    def outage_s(self, now: float) -> float:
        """How long the endpoint has been unavailable (0 while closed)."""
        return 0.0 if self.opened_at is None else now - self.opened_at

    def record(self, *, unavailable: bool, now: float, probe: bool = False, row: int = 0) -> bool:
        """Count one outcome of the request for ``row``. True when it changed the state (opened or closed it)."""
        if probe:
            return self._probe_answered(unavailable, now)
        if len(self._recent) == self._recent.maxlen and self._recent[0][0]:
            self._unavailable -= 1
        self._recent.append((unavailable, row))
        self._unavailable += unavailable
        if unavailable:
            self._streak.add(row)
        else:
            self._streak.clear()
        if self.state is not BreakerState.CLOSED or not unavailable:
            return False
        most = len(self._recent) >= self.min_outcomes and self._unavailable >= self.trip_share * len(self._recent)
        if most:  # of several rows, not one row's retries
            most = len({key for bad, key in self._recent if bad}) >= SUSPICION_STREAK
        if most or len(self._streak) >= self.trip_streak:
            self._open(now, first=True)
            return True
        return False

    def _probe_answered(self, unavailable: bool, now: float) -> bool:
        if unavailable:
            self._probe_wait = min(self.max_probe_s, self._probe_wait * 2)
            self._open(now, first=False)
            return False
        self.state = BreakerState.CLOSED
        self.opened_at = None
        self._recent.clear()
        self._unavailable = 0
        self._streak.clear()
        self._probe_wait = self.probe_s
        return True

    def _open(self, now: float, *, first: bool) -> None:
        self.state = BreakerState.OPEN
        if first:
            self.trips += 1
            self.opened_at = now
            self._probe_wait = self.probe_s
        self._next_probe_at = now + self._probe_wait

    def describe(self, now: float) -> str | None:
        """What a progress line says while requests wait, or None while closed."""
        if self.state is BreakerState.CLOSED:
            return None
        return f"endpoint unavailable since {self.outage_s(now):.0f}s, probing"
