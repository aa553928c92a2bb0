"""The requests' live counters of a dispatch: read by the progress line and the summary alike."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["DispatchStats", "LatencyReservoir"]


class LatencyReservoir:
    """A fixed-size uniform sample of latencies (reservoir sampling) for p50/p95 at constant memory."""

    def __init__(self, size: int = 4096, *, seed: int = 0) -> None:
        self.size = size
        self.count = 0
        self._values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        """Offer one latency to the sample."""
        self.count += 1
        if len(self._values) < self.size:
            self._values.append(value)
            return
        # random() scaled, not randrange(): a third of its cost, and uniform to within 2**-53 of a slot.
        slot = int(self._rng.random() * self.count)
        if slot < self.size:
            self._values[slot] = value

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the sample, or None before any latency was seen."""
        if not self._values:
            return None
        ordered = sorted(self._values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class DispatchStats:
    """The requests' live counters, read by the progress line and the summary alike.

    ``status_counts`` keys are HTTP statuses or failure kinds. Rows are counted once, where their
    records go (:class:`~batchrun.tally.Tally`), not here; each endpoint's share is its route's.
    """

    sent: int = 0  # requests sent (attempts)
    retries: int = 0  # attempts after a row's first
    in_flight: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    latencies: LatencyReservoir = field(default_factory=LatencyReservoir)
    limit: int = 0  # the adaptive concurrency limit now

    def figures(self) -> dict[str, object]:
        """The summary's part: retries, statuses and latency quantiles."""
        return {
            "retries": self.retries,
            "status_counts": dict(self.status_counts),
            "latency_s": {"p50": self.latencies.quantile(0.5), "p95": self.latencies.quantile(0.95)},
        }
