"""Reading a large input: memory stays flat however many rows the file holds (the one input test too big
for tests/unit)."""

from __future__ import annotations

import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.sources import open_source
from batchrun.spec import InputSpec


def parquet_input(path, **kw) -> InputSpec:
    return InputSpec(kind="parquet", path=str(path), **kw)


def test_reading_a_large_parquet_file_keeps_memory_flat(tmp_path):
    # 200k rows of ~400 bytes: about 80 MB as Python strings, more as Row objects. Written as one row
    # group (pandas' default shape), the hardest case for a streaming reader.
    n = 200_000
    pad = "x" * 400
    table = pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"{i}{pad}" for i in range(n)]})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=n)
    del table
    source = open_source(parquet_input(tmp_path / "big.parquet", id_column="id"))

    arrow_base = pa.total_allocated_bytes()
    arrow_peak = 0
    seen = 0
    tracemalloc.start()
    try:
        for batch in source.batches(512):
            seen += len(batch)
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - arrow_base)
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n
    # Bounds are generous (a few batches and one decoded page set), far below the ~80 MB of data.
    assert python_peak < 16 * 2**20, python_peak
    assert arrow_peak < 32 * 2**20, arrow_peak
    assert source.find_duplicate_ids() == []
