"""Fault injection: which request meets which fault, and the scripted episodes.

A request's fault is decided from a hash of (faults.seed, the endpoint's fault_seed, request body,
how many times that same body was seen before), so reruns of the same workload with the same seeds
meet the same faults whatever the order or concurrency of the requests, and a retried request draws
again. The counts start from zero with each emulator; ``fault_seed`` is what makes one run's draws
differ from the previous run's (batchrun passes its run counter there).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable

from batchrun.emulator.config import Episode, Faults

# New kinds go at the end, so the draws of existing configurations stay the same.
FAULT_KINDS = ("429", "429_no_retry_after", "500", "502", "503", "504", "reset", "hang", "error_body", "truncated",
               "invalid_json")


class FaultDice:
    """Draws the fault, if any, of each request."""

    def __init__(self, faults: Faults, draw_seed: int = 0) -> None:
        self.faults = faults
        # 0 adds nothing to the hash, so the draws of configs without a fault_seed are unchanged.
        self._salt = b"" if draw_seed == 0 else b"fault_seed" + draw_seed.to_bytes(8, "big", signed=True)
        self._enabled = faults.total() > 0
        self._seen: Counter[bytes] = Counter()
        # Cumulative thresholds in a fixed order, so the mapping from a draw to a fault is stable.
        self._thresholds: list[tuple[float, str]] = []
        total = 0.0
        for kind in FAULT_KINDS:
            total += getattr(faults, f"rate_{kind}")
            self._thresholds.append((total, kind))

    def draw(self, body: bytes) -> str | None:
        """The fault for this request, or None."""
        if not self._enabled:
            return None
        digest = hashlib.blake2b(body, digest_size=16).digest()
        occurrence = self._seen[digest]
        self._seen[digest] += 1
        material = (self.faults.seed.to_bytes(8, "big", signed=True) + digest + occurrence.to_bytes(4, "big")
                    + self._salt)
        roll = int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "big") / 2**64
        for threshold, kind in self._thresholds:
            if roll < threshold:
                return kind
        return None


class EpisodeScript:
    """Plays the configured episodes against an endpoint, plus the ones injected at runtime."""

    def __init__(self, episodes: tuple[Episode, ...], act: Callable[[Episode], None]) -> None:
        # Each list pairs an episode with its trigger (Episode guarantees exactly one of the two is set).
        self._by_count = sorted(((e.after_requests, e) for e in episodes if e.after_requests is not None),
                                key=lambda pair: pair[0])
        self._timed = [(e.at_s, e) for e in episodes if e.at_s is not None]
        self._act = act
        self._timers: list[asyncio.TimerHandle] = []

    def on_request(self, number: int) -> None:
        """Called with the 1-based number of each data-plane request."""
        if number == 1 and self._timed:
            loop = asyncio.get_running_loop()
            self._timers = [loop.call_later(at_s, self._act, e) for at_s, e in self._timed]
        while self._by_count and self._by_count[0][0] <= number:
            self._act(self._by_count.pop(0)[1])

    def cancel(self) -> None:
        """Stop pending timers (shutdown)."""
        for timer in self._timers:
            timer.cancel()
