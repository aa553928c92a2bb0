"""Between dispatch and the Parquet sink: records are buffered, added in a thread, and committed.

The sink's work (building columns, writing and fsyncing a shard) is blocking, so it runs in a
thread, in batches, never on the event loop. A thread call that has started is always let finish,
even when the task awaiting it is cancelled: otherwise it would race the final commit.

Whatever a sink call raises reaches the caller as an :class:`OutputError` (a bug's exception too,
with its type named): the runner stops dispatch on it, since nothing paid for could be saved.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from batchrun.errors import BatchrunError, OutputError
from batchrun.records import RowFailure, RowResult

__all__ = ["Committer", "finish_in_thread"]

T = TypeVar("T")

#: Records wait at most this long before they are handed to the sink.
FLUSH_EVERY_S = 0.25


class Sink(Protocol):
    def add(self, record: RowResult | RowFailure) -> None: ...
    def commit(self) -> None: ...


async def finish_in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a thread; if the caller is cancelled, wait for it to finish first."""
    call = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait({call})
        raise


class Committer:
    """``add`` takes each finished record; ``run`` hands them to the sink and commits every ``interval_s``."""

    def __init__(self, sink: Sink, *, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._sink = sink
        self._interval_s = interval_s
        self._clock = clock
        self._pending: list[RowResult | RowFailure] = []
        self._lock = asyncio.Lock()  # one sink call at a time: the sink is not thread-safe

    def add(self, record: RowResult | RowFailure) -> None:
        self._pending.append(record)

    async def run(self) -> None:
        """Until cancelled: flush every FLUSH_EVERY_S, commit every interval."""
        last_commit = self._clock()
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self.flush()
            if self._clock() - last_commit >= self._interval_s:
                await self.commit()
                last_commit = self._clock()

    async def flush(self) -> None:
        """Hand every buffered record to the sink (which publishes a shard when one is full)."""
        async with self._lock:
            if not self._pending:
                return
            batch, self._pending = self._pending, []

            def add_all() -> None:
                for record in batch:
                    self._sink.add(record)

            await _as_output_error(finish_in_thread(add_all))

    async def commit(self) -> None:
        """Flush, then publish whatever the sink holds."""
        await self.flush()
        async with self._lock:
            await _as_output_error(finish_in_thread(self._sink.commit))


async def _as_output_error(call: Any) -> None:
    """Await a sink call; anything but batchrun's own errors (and cancellation) becomes an OutputError."""
    try:
        await call
    except BatchrunError:
        raise
    except Exception as exc:
        raise OutputError(f"committing the output failed: {type(exc).__name__}: {exc}") from exc
