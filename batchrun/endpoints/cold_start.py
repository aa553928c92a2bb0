"""When a 503 is the endpoint starting rather than a row's fault.

After a resume, on a scaled-to-zero endpoint, or while a replica restarts, 503s are expected
(reliability.md §2, cold start). Burning rows' attempts on them would turn a cold start into failure
rows, so they are excused: the row backs off and tries again without using up an attempt. Only for a
bounded spell, though: once 503s have been excused for longer than the job's patience for a start
(``endpoint.ready_timeout``), they count again, so a replica that crash-loops ends in failure rows and
the failure threshold instead of retries (and billing) forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batchrun.errors import RequestFailed

__all__ = ["ColdStartPolicy"]


class ColdStartPolicy:
    """Says whether a failure is excused as a cold start. The lifecycle tells it when the endpoint is
    warm or cold; a 503 seen while a refresh is still on its way gets the benefit of the doubt."""

    def __init__(
        self,
        patience_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.patience_s = patience_s
        self.cold = True  # until the endpoint is first seen ready
        self._clock = clock
        self._on_event = on_event or (lambda message: None)
        self._since: float | None = None  # when the current cold spell began (first excused 503)
        self._reported = False  # the "503s now count" event was shown for this spell

    def set_warm(self, warm: bool) -> None:
        """What the last look at the endpoint saw: warm (running, every replica ready) or cold."""
        self.cold = not warm
        if warm:  # the next cold spell gets the full patience
            self._since = None
            self._reported = False
        elif self._since is None:
            self._since = self._clock()

    def excuses(self, failure: RequestFailed, *, doubt: bool = False) -> bool:
        """True when ``failure`` should not use up the row's attempts.

        ``doubt``: a refresh of the endpoint's state is on its way; until it answers, a 503 is taken to
        be a replica restarting.
        """
        if failure.status != 503 or not (self.cold or doubt):
            return False
        now = self._clock()
        if self._since is None:
            self._since = now
        spell = now - self._since
        if spell <= self.patience_s:
            return True
        if not self._reported:
            self._reported = True
            self._on_event(
                f"still not ready after {spell:.1f}s (endpoint.ready_timeout {self.patience_s:g}s): "
                "503s now count against rows' attempts"
            )
        return False
