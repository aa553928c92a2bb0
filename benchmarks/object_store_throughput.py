"""Rows per second committed to a local S3-compatible server (moto, over HTTP on loopback) against local disk.

The same rows as sink_throughput.py (about 500 bytes of text each) go through the local sink (temp file,
rename, manifest line) and through the object-store sink (the same local write into the cache, then an
upload and a commit record with create-if-absent); each then reopens to rebuild its done-set (local:
sidecars; S3: listing and reading the commit records). Needs the test extra (moto[server], boto3).

    .venv/bin/python benchmarks/object_store_throughput.py [--rows 100000] [--shard-rows 10000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from sink_throughput import INPUT_SCHEMA, OUTPUT_SCHEMA, make_rows

from batchrun.output import OutputStore, ParquetSink, build_data_schema
from batchrun.output.remote import ObjectOutputStore

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3kit import S3Server


def _timed(sink, rows) -> float:
    start = time.perf_counter()
    for row in rows:
        sink.add(row)
    sink.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    args = parser.parse_args()

    rows = make_rows(args.rows)
    schema = build_data_schema(INPUT_SCHEMA, id_column="id", keep_columns=None, output_schema=OUTPUT_SCHEMA)
    options = {"data_schema": schema, "id_column": "id", "shard_rows": args.shard_rows}
    with tempfile.TemporaryDirectory() as folder:
        local = OutputStore(Path(folder) / "out")
        sink = ParquetSink(local, **options)
        sink.open()
        local_s = _timed(sink, rows)
        start = time.perf_counter()
        assert ParquetSink(local, **options).open().ok == args.rows
        local_reopen = time.perf_counter() - start

        server = S3Server.start()
        try:
            os.environ.update(server.environ(), BATCHRUN_CACHE_DIR=str(Path(folder) / "cache"))
            url = server.bucket("bench")
            store = ObjectOutputStore(url)
            store.writer_lock().acquire()
            sink = store.new_sink(**options)
            sink.open()
            s3_s = _timed(sink, rows)
            store.lease.release()  # type: ignore[union-attr]
            store = ObjectOutputStore(url)
            store.writer_lock().acquire()
            start = time.perf_counter()
            assert store.new_sink(**options).open().ok == args.rows
            s3_reopen = time.perf_counter() - start
            store.lease.release()  # type: ignore[union-attr]
        finally:
            server.stop()

    shards = -(-args.rows // args.shard_rows)
    print(f"{args.rows:,} rows of ~500 B in {shards} parts of {args.shard_rows:,}")
    print(f"  local disk:        {args.rows / local_s:9,.0f} rows/s committed ({local_s:.2f} s); "
          f"reopen {local_reopen * 1000:.0f} ms")
    print(f"  S3 (moto, local):  {args.rows / s3_s:9,.0f} rows/s committed ({s3_s:.2f} s); "
          f"reopen {s3_reopen * 1000:.0f} ms")


if __name__ == "__main__":
    main()
