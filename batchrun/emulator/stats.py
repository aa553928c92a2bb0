"""Counters of one endpoint's data plane, cheap enough to keep on every request."""

from __future__ import annotations

import time
from collections import Counter


class EndpointStats:
    """Requests by route and status, concurrency, requests per prompt, first and last request times."""

    def __init__(self) -> None:
        self.by_route_status: Counter[tuple[str, str]] = Counter()
        self.requests = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.per_prompt: Counter[str] = Counter()
        self.first_request_at: float | None = None  # wall clock, seconds since the epoch
        self.last_request_at: float | None = None

    def started(self) -> None:
        """A data-plane inference request arrived."""
        now = time.time()
        if self.first_request_at is None:
            self.first_request_at = now
        self.last_request_at = now
        self.requests += 1
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight

    def finished(self, route: str, status: int | str) -> None:
        """It ended with ``status`` (an HTTP status, or ``reset`` / ``hang`` when no answer was sent)."""
        self.in_flight -= 1
        self.by_route_status[(route, str(status))] += 1

    def count_only(self, route: str, status: int | str) -> None:
        """A request outside the inference routes (health, info): counted, not timed or tracked."""
        self.by_route_status[(route, str(status))] += 1

    def prompt(self, text: str) -> None:
        """Count one request for ``text`` (the prompt, or the chat messages' text)."""
        self.per_prompt[text] += 1

    def to_dict(self) -> dict:
        """A JSON-able snapshot."""
        by_route: dict[str, dict[str, int]] = {}
        for (route, status), count in sorted(self.by_route_status.items()):
            by_route.setdefault(route, {})[status] = count
        return {
            "requests": self.requests,
            "by_route": by_route,
            "in_flight": self.in_flight,
            "peak_concurrency": self.peak_in_flight,
            "requests_per_prompt": dict(self.per_prompt),
            "first_request_at": self.first_request_at,
            "last_request_at": self.last_request_at,
        }
