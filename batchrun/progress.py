"""What a person (or a cron log) sees while a job runs, and the summary at its end.

On a terminal: a tqdm bar with rows/s, output tokens/s, in flight, the concurrency limit, retries,
failures, cost and ETA. Elsewhere: one summary line every ``interval_s`` seconds, because a bar
redrawn with carriage returns makes an unreadable log file.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

__all__ = ["ProgressReporter", "Snapshot", "format_duration", "format_usd"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The live figures of a running job, read by the reporter."""

    done: int  # rows finished in this run (ok + failed)
    ok: int
    failed: int
    retries: int
    in_flight: int
    limit: int
    output_tokens: int
    spent_usd: float | None = None
    projected_usd: float | None = None
    waiting_for: str | None = None  # why requests are held back ("endpoint unavailable since 8s, probing")


class ProgressReporter:
    """Shows progress from a ``snapshot()`` callable until ``close()``."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        *,
        total: int | None,
        mode: str = "auto",
        interval_s: float = 30.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._total = total
        self._stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self._stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self._interval_s = interval_s
        self._clock = clock
        self._started = clock()
        self._bar: tqdm | None = None

    def start(self) -> None:
        """Open the bar, or (for lines) say that the job started, so a short job still leaves a trace."""
        if self.mode == "bar":
            self._bar = tqdm(total=self._total, unit="row", file=self._stream, dynamic_ncols=True, smoothing=0.1)
        elif self.mode == "lines":
            total = f" of {self._total} rows" if self._total is not None else ""
            self._print(f"progress: started{total}; a line every {format_duration(self._interval_s)}")

    async def run(self) -> None:
        """Refresh until cancelled: the bar twice a second, a line every ``interval_s``."""
        if self.mode == "off":
            return
        period = 0.5 if self.mode == "bar" else self._interval_s
        while True:
            await asyncio.sleep(period)
            self.refresh()

    def _print(self, line: str) -> None:
        try:
            print(line, file=self._stream, flush=True)
        except (BrokenPipeError, ValueError):  # a closed stderr must not stop the job (SIGPIPE is ignored)
            self.mode = "off"

    def _postfix(self, snap: Snapshot, elapsed: float) -> dict[str, Any]:
        postfix: dict[str, Any] = {
            "tok/s": f"{snap.output_tokens / elapsed:.0f}" if elapsed > 0 else "0",
            "inflight": snap.in_flight,
            "limit": snap.limit,
            "retries": snap.retries,
            "failed": snap.failed,
        }
        if snap.waiting_for:
            postfix["waiting"] = snap.waiting_for
        if snap.spent_usd is not None:
            postfix["cost"] = format_usd(snap.spent_usd)
            if snap.projected_usd is not None:
                postfix["cost"] += f"/~{format_usd(snap.projected_usd)}"
        return postfix

    def refresh(self) -> None:
        snap = self._snapshot()
        elapsed = max(1e-9, self._clock() - self._started)
        if self._bar is not None:
            self._bar.n = snap.done
            self._bar.set_postfix(self._postfix(snap, elapsed), refresh=False)
            self._bar.refresh()
        elif self.mode == "lines":
            rate = snap.done / elapsed
            parts = [f"{snap.done}" + (f"/{self._total}" if self._total is not None else "") + " rows"]
            parts.append(f"{rate:.1f} rows/s")
            if self._total is not None and rate > 0:
                parts.append(f"eta {format_duration((self._total - snap.done) / rate)}")
            parts += [f"{k} {v}" for k, v in self._postfix(snap, elapsed).items()]
            self._print("progress: " + ", ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self.refresh()
            self._bar.close()
            self._bar = None


def format_usd(amount: float) -> str:
    """Dollars, with cents for real bills and more digits for the emulator's tiny ones."""
    return f"${amount:.2f}" if amount >= 1 else f"${amount:.4f}"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
