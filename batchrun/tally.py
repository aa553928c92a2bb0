"""The row counts of a run, in one place, and the failure threshold that watches them."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchrun.records import RowFailure, RowResult
from batchrun.stop import Stop, StopReason

__all__ = ["FailureWatch", "Tally"]

#: The failure threshold looks at this many recent rows, and waits for at least MIN_ROWS of them.
WINDOW_ROWS = 200
MIN_ROWS = 50


class FailureWatch:
    """True once the failure share over the recent rows passes ``threshold`` (None: never)."""

    def __init__(self, threshold: float | None, window: int = WINDOW_ROWS) -> None:
        self.threshold = threshold
        self._recent: deque[bool] = deque(maxlen=window)
        self._failures = 0

    def observe(self, failed: bool) -> bool:
        if self.threshold is None:
            return False
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._failures -= 1
        self._recent.append(failed)
        self._failures += failed
        enough = len(self._recent) >= min(MIN_ROWS, self._recent.maxlen or MIN_ROWS)
        return enough and self._failures / len(self._recent) > self.threshold


@dataclass(slots=True)
class Tally:
    """What this run finished: rows ok and failed, output tokens. ``skipped``: done by earlier runs."""

    stop: Stop
    watch: FailureWatch = field(default_factory=lambda: FailureWatch(None))
    ok: int = 0
    failed: int = 0
    output_tokens: int = 0
    skipped: int = 0

    @property
    def done(self) -> int:
        return self.ok + self.failed

    def count(self, record: RowResult | RowFailure) -> None:
        failed = isinstance(record, RowFailure)
        if isinstance(record, RowResult):
            self.ok += 1
            self.output_tokens += int(record.output.get("completion_tokens") or 0)
        else:
            self.failed += 1
        if self.watch.observe(failed):
            self.stop.request(
                StopReason.FAILURE_THRESHOLD,
                f"more than {self.watch.threshold:.0%} of recent rows failed (failure_threshold)",
            )
