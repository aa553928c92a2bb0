"""The reader's hand-over: pending rows reach the loop in batches and are taken one at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from batchrun.output.done import DoneSet
from batchrun.reader import PendingRows
from batchrun.records import Row
from batchrun.stop import Stop


class ListSource:
    """A source of ``n`` rows in batches of ``batch_size`` (what PendingRows asks of a source)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def pending_batches(self, batch_size: int = 1024, done: DoneSet | None = None) -> Iterator[tuple[int, list[Row]]]:
        for start in range(0, self.n, batch_size):
            rows = [Row(i, f"id-{i}", {"prompt": f"p{i}"}) for i in range(start, min(self.n, start + batch_size))]
            pending = [row for row in rows if done is None or row.position not in done]
            yield len(rows) - len(pending), pending


def test_every_pending_row_is_handed_over_once_whether_taken_at_once_or_awaited() -> None:
    async def main() -> list[int]:
        taken: list[int] = []
        done = DoneSet()
        for position in (3, 4, 17):  # finished by an earlier run: never handed over
            done.add(position)
        async with PendingRows(ListSource(50), done, Stop(), batch_size=8, ahead_batches=2) as reader:
            assert await reader.has_pending()
            stream = reader.rows()
            while True:
                row = stream.next_nowait()  # None when the batch at hand is used up
                if row is None:
                    try:
                        row = await anext(stream)
                    except StopAsyncIteration:
                        break
                taken.append(row.position)
            assert stream.next_nowait() is None
            assert reader.skipped == 3
        return taken

    assert asyncio.run(main()) == [i for i in range(50) if i not in {3, 4, 17}]


def test_a_row_taken_at_once_needs_a_batch_at_hand() -> None:
    async def main() -> None:
        async with PendingRows(ListSource(2), set(), Stop(), batch_size=1) as reader:
            stream = reader.rows()
            assert stream.next_nowait() is None  # nothing awaited yet: nothing at hand
            first = await anext(stream)
            assert first.position == 0
            second = stream.next_nowait() or await anext(stream)
            assert second.position == 1

    asyncio.run(main())
