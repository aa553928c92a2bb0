"""What a person (or a cron log) sees while a job runs, and the summary at its end.

From Python (``mode="notebook"``): tqdm's auto bar, a widget in Jupyter and text elsewhere.
On a terminal: a tqdm bar with rows/s, output tokens/s, in flight, the concurrency limit, retries,
failures, cost and ETA. Elsewhere: one summary line every ``interval_s`` seconds, because a bar
redrawn with carriage returns makes an unreadable log file.

A job with several endpoints adds each one's share (:class:`EndpointProgress`): its rows, in flight
under its own limit, its 429s, and whether it is drained or not ready yet. A job with one endpoint
shows what it always did.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TextIO

from tqdm import tqdm

__all__ = ["EndpointProgress", "ProgressReporter", "Snapshot", "format_duration", "format_usd"]


@dataclass(frozen=True, slots=True)
class EndpointProgress:
    """One endpoint's share of a running job with several."""

    name: str
    rows: int = 0  # rows it answered
    in_flight: int = 0
    limit: int = 0  # its own adaptive concurrency limit
    throttled: int = 0  # 429 answers
    state: Literal["live", "drained", "starting", "unused"] = "live"  # starting: not ready yet; unused: could not start
    reason: str | None = None  # why it is drained or unused, in a word or a status: "401", "failed"

    def describe(self, share: float) -> str:
        """``a: 812 rows 76% inflight 40/48 429s 3``; ``c: drained (401)``; ``b: not ready``."""
        parts = [f"{self.name}:"]
        if self.rows or self.state == "live":
            parts.append(f"{self.rows} rows {share:.0%}")
        if self.state == "live":
            parts.append(f"inflight {self.in_flight}/{self.limit}")
        elif self.in_flight:  # drained, with its last requests still out
            parts.append(f"inflight {self.in_flight}")
        if self.throttled:
            parts.append(f"429s {self.throttled}")
        if self.state != "live":
            parts.append(_SHOWN[self.state] + (f" ({self.reason})" if self.reason else ""))
        return " ".join(parts)

    def brief(self, share: float) -> str:
        """The bar's shorter form: ``a 76% 40/48 429s:3``, ``c drained``."""
        if self.state != "live":
            return f"{self.name} {_SHOWN[self.state]}"
        text = f"{self.name} {share:.0%} {self.in_flight}/{self.limit}"
        return text + (f" 429s:{self.throttled}" if self.throttled else "")


_SHOWN = {"drained": "drained", "starting": "not ready", "unused": "not used"}


def _endpoint_parts(endpoints: tuple[EndpointProgress, ...], *, brief: bool = False) -> list[str]:
    """Each endpoint's part of a progress line (or, ``brief``, of the bar), its share of the rows answered."""
    total = sum(e.rows for e in endpoints) or 1
    return [e.brief(e.rows / total) if brief else e.describe(e.rows / total) for e in endpoints]


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
    endpoints: tuple[EndpointProgress, ...] = ()  # each endpoint's share; empty for a job with one


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
        elif self.mode == "notebook":
            from tqdm.auto import tqdm as auto_tqdm  # a widget in Jupyter, the text bar elsewhere

            self._bar = auto_tqdm(total=self._total, unit="row", smoothing=0.1)
        elif self.mode == "lines":
            total = f" on {self._total} rows" if self._total is not None else ""
            self._print(f"progress: started{total}; a line every {format_duration(self._interval_s)}")

    async def run(self) -> None:
        """Refresh until cancelled: the bar twice a second, a line every ``interval_s``."""
        if self.mode == "off":
            return
        period = 0.5 if self.mode in ("bar", "notebook") else self._interval_s
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
            postfix = self._postfix(snap, elapsed)
            if snap.endpoints:  # last: a bar too wide for the terminal is cut at its end
                postfix["endpoints"] = " | ".join(_endpoint_parts(snap.endpoints, brief=True))
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()
        elif self.mode == "lines":
            rate = snap.done / elapsed
            parts = [f"{snap.done}" + (f"/{self._total}" if self._total is not None else "") + " rows"]
            parts.append(f"{rate:.1f} rows/s")
            if self._total is not None and rate > 0:
                parts.append(f"eta {format_duration((self._total - snap.done) / rate)}")
            parts += [f"{k} {v}" for k, v in self._postfix(snap, elapsed).items()]
            line = "progress: " + ", ".join(parts)
            if snap.endpoints:
                line += "".join(f" | {part}" for part in _endpoint_parts(snap.endpoints))
            self._print(line)

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
