"""Resume leaves out the rows already done, exactly those, without turning them into Python objects.

The done-set is one bit per source position (no ids, no hashes: nothing can collide), asked once per
stretch of input; a Parquet row group whose rows are all done is skipped unread.
"""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.output.done import DoneSet
from batchrun.reader import PendingRows
from batchrun.sources import open_source
from batchrun.spec import InputSpec
from batchrun.stop import Stop


def done_set(positions) -> DoneSet:
    done = DoneSet()
    done.add_many(np.asarray(sorted(positions), dtype=np.uint64))
    return done


def write_groups(path, start: int, rows: int, group_rows: int) -> None:
    ids = [f"row-{i:05d}" for i in range(start, start + rows)]
    pq.write_table(pa.table({"id": ids, "topic": [f"t{i}" for i in range(start, start + rows)]}), path,
                   row_group_size=group_rows)


def test_the_pending_mask_agrees_with_membership_for_any_window():
    rng = random.Random(7)
    positions = set(rng.sample(range(5000), 1800))
    done = done_set(positions)
    for _ in range(300):
        start, count = rng.randrange(0, 5200), rng.randrange(0, 400)
        mask = done.pending_mask(start, count)
        assert mask.dtype == bool
        assert mask.tolist() == [p not in positions for p in range(start, start + count)]


def test_positions_past_the_bitmap_are_pending_and_an_empty_window_is_empty():
    done = done_set([0, 9])
    assert done.pending_mask(8, 4).tolist() == [True, False, True, True]
    assert done.pending_mask(10**6, 3).tolist() == [True, True, True]
    assert done.pending_mask(3, 0).size == 0
    with pytest.raises(ValueError, match="negative"):
        done.pending_mask(-1, 2)


def test_the_mask_is_a_copy_so_the_sink_can_grow_the_bitmap_while_the_reader_holds_it():
    done = done_set([1])
    mask = done.pending_mask(0, 8)
    done.add(10**6)  # grows the bytearray: a live numpy view of it would make this raise BufferError
    assert mask.tolist() == [True, False, True, True, True, True, True, True]
    assert 10**6 in done


def test_pending_batches_give_every_row_not_done_once_in_order_and_count_the_rest(tmp_path):
    write_groups(tmp_path / "a.parquet", 0, 250, group_rows=50)
    write_groups(tmp_path / "b.parquet", 250, 130, group_rows=40)
    source = open_source(InputSpec(kind="parquet", path=str(tmp_path), id_column="id", limit=360))
    rng = random.Random(3)
    done_positions = set(range(120)) | set(rng.sample(range(120, 360), 90)) | set(range(250, 290))
    skipped, rows = 0, []
    for left_out, batch in source.pending_batches(32, done_set(done_positions)):
        assert len(batch) <= 32
        skipped += left_out
        rows.extend(batch)
    expected = [p for p in range(360) if p not in done_positions]
    assert [row.position for row in rows] == expected
    assert [row.id for row in rows] == [f"row-{p:05d}" for p in expected]
    assert all(row.columns["topic"] == f"t{row.position}" for row in rows)
    assert skipped == 360 - len(expected)


def test_a_row_group_whose_rows_are_all_done_is_never_read(tmp_path, monkeypatch):
    write_groups(tmp_path / "in.parquet", 0, 400, group_rows=100)
    source = open_source(InputSpec(kind="parquet", path=str(tmp_path / "in.parquet"), id_column="id"))
    read_groups: list[int] = []
    original = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, row_groups=None, **kwargs):
        read_groups.extend(row_groups or [])
        return original(self, *args, row_groups=row_groups, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    done = done_set([*range(250), 399])  # groups 0 and 1 whole, group 2 half, group 3 all but one
    results = list(source.pending_batches(64, done))
    assert read_groups == [2, 3]
    assert [row.position for _, batch in results for row in batch] == list(range(250, 399))
    assert sum(left_out for left_out, _ in results) == 251


def test_a_jsonl_input_leaves_out_the_same_rows(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "topic": f"t{i}"}) + "\n" for i in range(100)))
    source = open_source(InputSpec(kind="jsonl", path=str(path), id_column="id"))
    done = done_set(range(0, 100, 3))
    rows = [row for _, batch in source.pending_batches(16, done) for row in batch]
    assert [row.id for row in rows] == [f"r{i}" for i in range(100) if i % 3]


def test_without_a_done_set_pending_batches_are_the_batches(tmp_path):
    write_groups(tmp_path / "in.parquet", 0, 70, group_rows=30)
    source = open_source(InputSpec(kind="parquet", path=str(tmp_path / "in.parquet"), id_column="id"))
    plain = [[row.position for row in batch] for batch in source.batches(16)]
    pending = [[row.position for row in batch] for _, batch in source.pending_batches(16)]
    assert plain == pending
    assert [p for batch in plain for p in batch] == list(range(70))


def test_the_reader_hands_over_only_the_rows_not_done_and_counts_the_skipped(tmp_path):
    write_groups(tmp_path / "in.parquet", 0, 600, group_rows=128)
    source = open_source(InputSpec(kind="parquet", path=str(tmp_path / "in.parquet"), id_column="id"))
    done = done_set([*range(540), 555, 590])

    async def read() -> tuple[list[int], int]:
        async with PendingRows(source, done, Stop(grace_s=1.0), ahead_batches=2, batch_size=16) as reader:
            assert await reader.has_pending()
            positions = [row.position async for row in reader.rows()]
        return positions, reader.skipped

    positions, skipped = asyncio.run(read())
    assert positions == [p for p in range(540, 600) if p not in (555, 590)]
    assert skipped == 542


def test_a_finished_input_has_nothing_pending_and_every_row_skipped(tmp_path):
    write_groups(tmp_path / "in.parquet", 0, 300, group_rows=100)
    source = open_source(InputSpec(kind="parquet", path=str(tmp_path / "in.parquet"), id_column="id"))

    async def read() -> tuple[bool, int]:
        async with PendingRows(source, done_set(range(300)), Stop(grace_s=1.0), batch_size=16) as reader:
            found = await reader.has_pending()
        return found, reader.skipped

    assert asyncio.run(read()) == (False, 300)
