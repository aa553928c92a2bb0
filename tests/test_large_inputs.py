"""Reading a large input: memory stays flat however many rows the file holds (the one input test too big
for tests/unit)."""

from __future__ import annotations

import subprocess
import sys
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


def test_the_hashed_duplicate_id_scan_of_string_ids_does_not_import_pandas(tmp_path):
    # pandas is 0.2 s of start-up; a large input's duplicate-id scan of an Arrow string column needs none of
    # it (the column's to_numpy would import it). A process of its own, as this one has pandas loaded.
    path = tmp_path / "ids.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "b"], "text": ["w", "x", "y", "z"]}), path)
    probe = ("import sys; from batchrun.sources import _base, open_source; from batchrun.spec import InputSpec; "
             "_base.EXACT_ID_SCAN_ROWS = 0; "  # the hashed scan, as for an input of over 200,000 rows
             f"source = open_source(InputSpec(kind='parquet', path={str(path)!r}, id_column='id')); "
             "print(source.find_duplicate_ids(), 'pandas' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['b'] False"
