"""The rows not yet done, streamed from the source on a reader thread, with backpressure.

The source is read in a thread so that Parquet decoding never blocks the event loop. Each batch of
rows that are not done yet is handed to the loop; at most ``ahead_batches`` batches are handed over
and not yet consumed, and the thread waits (on a semaphore, not a poll) until a batch is used up:
that bound keeps memory flat however large the input is. Each row is handed over exactly once.

The reader watches the job's :class:`~batchrun.stop.Stop`: once a stop is requested it reads no more;
an input that cannot be read part way requests one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import TracebackType

from batchrun.errors import InputError, redact
from batchrun.records import Row
from batchrun.sources import DoneMask, Source
from batchrun.stop import Stop, StopReason

__all__ = ["PendingRows", "RowStream"]


class _End:
    """The input ended (``error`` set when reading failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class PendingRows:
    """``async with PendingRows(...) as reader``: the thread runs inside the block; ``rows()`` yields."""

    def __init__(
        self, source: Source, done: DoneMask, stop: Stop, *, ahead_batches: int = 4, batch_size: int = 256
    ) -> None:
        self._source = source
        self._done = done
        self._stop = stop
        self._batch_size = batch_size
        self._room = threading.Semaphore(max(1, ahead_batches))
        self._queue: asyncio.Queue[list[Row] | _End] = asyncio.Queue()
        self._first: asyncio.Future[bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.skipped = 0  # rows already done by earlier runs
        self.error: BaseException | None = None  # why reading failed, if it did

    async def __aenter__(self) -> PendingRows:
        self._loop = asyncio.get_running_loop()
        self._first = self._loop.create_future()
        self._stop.on_request(lambda cause: self._room.release())  # a waiting reader wakes up and ends
        self._thread = threading.Thread(target=self._read, name="batchrun-reader", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        self._room.release()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def has_pending(self) -> bool:
        """True once a row that is not done yet has been found; False if every row is done.

        Raises InputError when the input could not be read before any pending row was found.
        """
        assert self._first is not None
        found = await self._first
        if not found and self.error is not None:
            raise InputError(f"reading the input failed: {redact(str(self.error))}")
        return found

    def rows(self) -> RowStream:
        """The pending rows in order. Reading that fails part way stops the job (rows read so far finish)."""
        return RowStream(self)

    # ------------------------------------------------------------------ the thread

    def _stopped(self) -> bool:
        return self._closed.is_set() or self._stop.requested

    def _read(self) -> None:
        end = _End()
        try:
            for skipped, pending in self._source.pending_batches(batch_size=self._batch_size, done=self._done):
                if self._stopped():
                    return
                self.skipped += skipped
                if not pending:
                    continue
                self._settle_first(True)
                self._room.acquire()
                if self._stopped():
                    return
                self._hand_over(pending)
        except BaseException as exc:  # reported to the job, which stops cleanly
            self.error = exc
            end = _End(exc)
        finally:
            self._settle_first(False)
            self._hand_over(end)

    def _hand_over(self, item: list[Row] | _End) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is reading any more
            pass

    def _settle_first(self, found: bool) -> None:
        assert self._loop is not None and self._first is not None
        first = self._first

        def settle() -> None:
            if not first.done():
                first.set_result(found)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed
            pass


class RowStream:
    """The rows a :class:`PendingRows` hands over, one at a time: an async iterator, and ``next_nowait``.

    Rows arrive in batches; ``next_nowait`` gives the next row of the batch at hand without awaiting
    (None when the batch is used up), so a consumer that takes one row per request (the dispatcher)
    needs no await, lock or cancel scope for a row that is already here.
    """

    def __init__(self, reader: PendingRows) -> None:
        self._reader = reader
        self._batch: Iterator[Row] = iter(())

    def __aiter__(self) -> RowStream:
        return self

    def next_nowait(self) -> Row | None:
        """The next row if one was handed over already, else None (then ``await anext()`` waits for one)."""
        return next(self._batch, None)

    async def __anext__(self) -> Row:
        row = next(self._batch, None)
        while row is None:
            item = await self._reader._queue.get()
            if isinstance(item, _End):
                self._reader._queue.put_nowait(item)  # every consumer sees the end
                if item.error is not None:
                    self._reader._stop.request(StopReason.ERROR, f"reading the input failed: {redact(str(item.error))}")
                raise StopAsyncIteration
            self._reader._room.release()
            self._batch = iter(item)
            row = next(self._batch, None)
        return row
