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

__all__ = ["ProgressReporter", "Snapshot", "format_summary"]


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
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.mode == "bar":
            self._bar = tqdm(total=self._total, unit="row", file=self._stream, dynamic_ncols=True, smoothing=0.1)
        if self.mode != "off":
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        period = 0.5 if self.mode == "bar" else self._interval_s
        while True:
            await asyncio.sleep(period)
            self.refresh()

    def _postfix(self, snap: Snapshot, elapsed: float) -> dict[str, Any]:
        postfix: dict[str, Any] = {
            "tok/s": f"{snap.output_tokens / elapsed:.0f}" if elapsed > 0 else "0",
            "inflight": snap.in_flight,
            "limit": snap.limit,
            "retries": snap.retries,
            "failed": snap.failed,
        }
        if snap.spent_usd is not None:
            postfix["cost"] = _usd(snap.spent_usd)
            if snap.projected_usd is not None:
                postfix["cost"] += f"/~{_usd(snap.projected_usd)}"
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
                parts.append(f"eta {_duration((self._total - snap.done) / rate)}")
            parts += [f"{k} {v}" for k, v in self._postfix(snap, elapsed).items()]
            print("progress: " + ", ".join(parts), file=self._stream, flush=True)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._bar is not None:
            self.refresh()
            self._bar.close()
            self._bar = None


def _usd(amount: float) -> str:
    """Dollars, with cents for real bills and more digits for the emulator's tiny ones."""
    return f"${amount:.2f}" if amount >= 1 else f"${amount:.4f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-job summary as a few readable lines (the same figures as summary.json)."""
    rows = summary["rows"]
    lines = [
        f"job {summary['job']}: {summary['outcome']}",
        f"  this run: {rows['ok']} ok, {rows['failed']} failed, {rows['skipped']} skipped (finished by earlier runs)"
        + (f", {rows['pending']} not yet run" if rows.get("pending") else ""),
    ]
    if "total_ok" in rows:
        retryable = rows.get("total_failed_retryable") or 0
        lines.append(
            f"  the output holds: {rows['total_ok']} ok, {rows['total_failed']} failed"
            + (f" ({retryable} retryable: run again to retry them)" if retryable else "")
        )
    tokens = f", {summary['output_tokens']} output tokens" if summary.get("output_tokens") else ""
    lines.append(f"  wall {summary['wall_s']:.1f}s, {summary['throughput_rows_per_s']:.1f} rows/s{tokens}")
    lat = summary.get("latency_s") or {}
    if lat.get("p50") is not None:
        lines.append(f"  latency p50 {lat['p50']:.3f}s, p95 {lat['p95']:.3f}s; retries {summary['retries']}")
    endpoint = summary.get("endpoint") or {}
    action = endpoint.get("final_action")
    if action and action != "none":
        said = {"pause": "paused", "scale-to-zero": "scaled to zero", "keep": "left running"}.get(action, action)
        lines.append(f"  endpoint: {endpoint.get('ref', '')} {said}")
    if endpoint.get("note"):
        lines.append(f"  note: {endpoint['note']}")
    cost = summary.get("cost") or {}
    if cost.get("usd") is not None:
        lines.append(f"  cost: {_usd(cost['usd'])} ({cost['replica_hours']:.3f} replica-hours)")
    output = summary.get("output")
    if output:
        lines.append(f"  output: {output}")
    if summary.get("stop_reason"):
        lines.append(f"  stopped: {summary['stop_reason']} (run the same command again to resume)")
    return "\n".join(lines)
