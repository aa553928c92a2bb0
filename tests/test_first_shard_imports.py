"""The first shard of a run imports nothing: the one-time imports are made before any row is sent."""

from __future__ import annotations

import subprocess
import sys

import pytest

_OPEN = {
    "folder": """
from batchrun.output.layout import OutputStore
from batchrun.output.sink import ParquetSink
sink = ParquetSink(OutputStore(root + "/out"), data_schema=schema, id_column="id", shard_rows=2)
""",
    "object store": """
from batchrun.output.remote import ObjectOutputStore
from batchrun.output.stores import FolderStore
store = ObjectOutputStore("file://" + root + "/bucket", None, store=FolderStore(root + "/bucket"))
store.writer_lock().acquire()
sink = store.new_sink(data_schema=schema, id_column="id", shard_rows=2)
""",
}


@pytest.mark.parametrize("output", sorted(_OPEN))
def test_the_first_shard_imports_nothing_while_rows_are_in_flight(tmp_path, monkeypatch, output):
    # pyarrow imports pandas (~0.4 s) on its first conversion of a Python list. Left to the first shard's
    # commit, that import held the interpreter's lock in the committing thread while answers waited on the
    # event loop; each sink makes that conversion when it opens. A process of its own: this one has pandas.
    monkeypatch.setenv("BATCHRUN_CACHE_DIR", str(tmp_path / "cache"))
    probe = f"""
import os, sys
import pyarrow as pa
from batchrun.records import RowResult
root = {str(tmp_path)!r}
schema = pa.schema([("id", pa.int64()), ("text", pa.string()), ("latency_s", pa.float64()), ("attempts", pa.int32())])
{_OPEN[output]}
loaded_before_open = "pandas" in sys.modules
sink.open()
opened = set(sys.modules)
for i in range(3):
    sink.add(RowResult(i, i, {{}}, {{"text": "x"}}, 0.1, 1))
sink.close()
print(loaded_before_open, sink.counters.data_shards, sorted(m for m in set(sys.modules) - opened if m.startswith("pandas")))
sys.stdout.flush()
os._exit(0)  # an object store's lease heartbeat need not be waited for
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False 2 []"
