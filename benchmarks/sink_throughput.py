"""How fast the sink commits rows: text rows of about 500 bytes, 100k of them, default shard size.

The runner needs ~5,000 rows/s; this prints what the sink itself sustains, fsyncs included, so
writing can be ruled out (or in) as the bottleneck.

    .venv/bin/python benchmarks/sink_throughput.py [--rows 100000] [--shard-rows 10000] [--dir PATH]
"""

from __future__ import annotations

import argparse
import random
import string
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from batchrun.output import OutputStore, ParquetSink, build_data_schema
from batchrun.records import RowResult

INPUT_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string())])
OUTPUT_SCHEMA = pa.schema(
    [
        ("generated_text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
    ]
)


def make_rows(count: int) -> list[RowResult]:
    """Rows of ~500 bytes of text (a 150-byte prompt, a 350-byte answer) drawn from a 5,000-word
    vocabulary, so that compression sees something like prose rather than one repeated line."""
    rng = random.Random(0)
    alphabet = string.ascii_lowercase
    vocabulary = ["".join(rng.choices(alphabet, k=rng.randint(2, 9))) for _ in range(5_000)]

    def text(length: int) -> str:
        return " ".join(rng.choices(vocabulary, k=length // 5))[:length]

    rows = []
    for position in range(count):
        rows.append(
            RowResult(
                position=position,
                id=f"row-{position:09d}",
                kept={"prompt": text(150)},
                output={"generated_text": text(350), "finish_reason": "stop", "prompt_tokens": 40, "completion_tokens": 90},
                latency_s=rng.uniform(0.5, 3.0),
                attempts=1,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()

    rows = make_rows(args.rows)
    schema = build_data_schema(INPUT_SCHEMA, id_column="id", keep_columns=None, output_schema=OUTPUT_SCHEMA)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        store = OutputStore(Path(folder) / "out")
        sink = ParquetSink(store, data_schema=schema, id_column="id", shard_rows=args.shard_rows)
        sink.open()
        start = time.perf_counter()
        for row in rows:
            sink.add(row)
        sink.close()
        elapsed = time.perf_counter() - start
        size = sum(p.stat().st_size for p in store.data_dir.glob("*.parquet"))

        reopen_start = time.perf_counter()
        done = ParquetSink(store, data_schema=schema, id_column="id").open()
        reopen = time.perf_counter() - reopen_start
        assert done.ok == args.rows

    print(
        f"sink throughput: {args.rows / elapsed:,.0f} rows/s committed "
        f"({args.rows:,} rows of ~500 B in {elapsed:.2f} s, {sink.counters.data_shards} shards, "
        f"{size / 1e6:.1f} MB on disk); reopen with done-set: {reopen * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
