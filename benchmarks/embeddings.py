"""Rows embedded per second on the emulated TEI: batchrun packing rows, batchrun sending one row per
request, and the emulator's ceiling (a bare aiohttp loop keeping full batches in flight).

The emulator runs in its own process (one event loop, one core), with one TEI endpoint:
``max_client_batch_size`` 32, an input budget (``max_concurrent_requests``) far above the load, and
a forward-pass latency of ``--base-ms`` plus ``--token-us`` per token (TEI's cost model as the
emulator plays it: a pass has a fixed cost, so packing amortises it). batchrun runs whole jobs
(``run_job``: Parquet in, Parquet shards out, records committed) in this process; the bare loop
only sends and reads. Each figure is rows per second over the whole run.

    .venv/bin/python benchmarks/embeddings.py --rows 20000 --concurrency 16 --base-ms 5 --token-us 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.emulator import EmulatorConfig, EndpointConfig, serve
from batchrun.runner import RunOptions, run_job
from batchrun.spec import parse_spec

TOKEN = "hf_benchmark_token"
BATCH = 32


def _text(i: int) -> str:
    return f"passage {i} tells of rivers, hills and the sea, and of the people who live between them"


def _run_emulator(urls: multiprocessing.Queue, base_s: float, token_s: float) -> None:
    endpoint = EndpointConfig(name="bge", task="feature-extraction", initial_state="running", embedding_dim=384,
                              max_client_batch_size=BATCH, max_concurrent_requests=100_000,
                              latency_base_s=base_s, latency_per_token_s=token_s)
    config = EmulatorConfig(token=TOKEN, endpoints=[endpoint])
    asyncio.run(serve(config, ready=lambda emu: urls.put(emu.endpoint_url("batchrun-local", "bge"))))


async def _bare(url: str, rows: int, per_request: int, concurrency: int, *, parse: bool = False) -> float:
    """Rows per second for a bare loop sending every row, ``per_request`` rows a request; with ``parse``
    it also reads each answer's JSON (as any client that keeps the vectors must)."""
    bodies = [json.dumps({"inputs": [_text(i) for i in range(start, min(rows, start + per_request))]}).encode()
              for start in range(0, rows, per_request)]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    pending = iter(bodies)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), headers=headers) as http:

        async def worker() -> None:
            for body in pending:
                async with http.post(url + "/embed", data=body) as response:
                    answer = await response.read()
                    assert response.status == 200, response.status
                    if parse:
                        orjson.loads(answer)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return rows / (time.perf_counter() - started)


def _batchrun(url: str, folder: Path, rows: int, concurrency: int, max_rows: int | None) -> tuple[float, int]:
    """Rows per second for a whole batchrun job, and the rows per request it settled on."""
    out = folder / f"out-{max_rows}"
    shutil.rmtree(out, ignore_errors=True)
    data: dict[str, Any] = {
        "name": "bench", "task": "feature-extraction",
        "input": {"parquet": str(folder / "in.parquet"), "id_column": "id"},
        "prompt": {"column": "text"}, "parameters": {},
        "endpoint": {"url": url}, "concurrency": {"max": concurrency, "initial": concurrency},
        "output": {"path": str(out), "shard_rows": 10_000},
    }
    if max_rows is not None:
        data["packing"] = {"max_rows": max_rows}
    os.environ["HF_TOKEN"] = TOKEN
    options = RunOptions(progress="off", handle_signals=False, echo=lambda line: None)
    started, cpu = time.perf_counter(), time.process_time()
    outcome = asyncio.run(run_job(parse_spec(data, file="<benchmark>"), options))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert outcome.exit_code == 0, outcome.summary
    assert outcome.summary["rows"]["ok"] == rows, outcome.summary["rows"]
    print(json.dumps({"max_rows": max_rows, "elapsed_s": round(elapsed, 2), "cpu_s": round(cpu, 2),
                      "latency_s": outcome.summary["latency_s"]}))
    sent = outcome.summary["status_counts"].get("200", 0)
    return rows / elapsed, round(rows / max(1, sent))


async def _dispatcher_only(url: str, rows: int, concurrency: int) -> float:
    """Rows per second for batchrun's Dispatcher and packing alone: rows from memory, records counted
    and dropped (no reader thread, no Parquet, no start-up): what the whole job adds shows against it."""
    from batchrun.dispatch import DispatchConfig, Dispatcher
    from batchrun.endpoints import DataPlane
    from batchrun.packing import Packer, RowsPerRequest
    from batchrun.records import Row
    from batchrun.tasks import build_task

    done = 0

    def on_record(record: object) -> None:
        nonlocal done
        done += 1

    dispatcher = Dispatcher(plane=DataPlane(url=url, token=TOKEN), task=build_task("feature-extraction", column="text"),
                            config=DispatchConfig(max_concurrency=concurrency, initial_concurrency=concurrency),
                            on_record=on_record, rows_per_request=RowsPerRequest(max_rows=BATCH))

    async def source() -> Any:
        for i in range(rows):
            yield Row(i, i, {"text": _text(i)})

    assert dispatcher.rows_per_request is not None
    started = time.perf_counter()
    await dispatcher.run(Packer(source(), dispatcher.rows_per_request))
    assert done == rows, done
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--base-ms", type=float, default=5.0, help="the emulator's cost of one forward pass")
    parser.add_argument("--token-us", type=float, default=20.0, help="the emulator's cost per token")
    parser.add_argument("--single-rows", type=int, default=None,
                        help="rows for the one-row-per-request runs (default: --rows)")
    args = parser.parse_args()

    urls: multiprocessing.Queue = multiprocessing.Queue()
    server = multiprocessing.Process(target=_run_emulator, args=(urls, args.base_ms / 1000, args.token_us / 1e6),
                                     daemon=True)
    server.start()
    folder = Path(tempfile.mkdtemp(prefix="batchrun-embeddings-"))
    try:
        url = urls.get(timeout=30)
        pq.write_table(pa.table({"id": list(range(args.rows)), "text": [_text(i) for i in range(args.rows)]}),
                       folder / "in.parquet")
        single = args.single_rows or args.rows
        print(f"machine: {platform.machine()} cores={os.cpu_count()} python={platform.python_version()}; "
              f"rows={args.rows} concurrency={args.concurrency} base_ms={args.base_ms} token_us={args.token_us}")
        figures = {
            "ceiling_bare_32_per_request": asyncio.run(_bare(url, args.rows, BATCH, args.concurrency)),
            "ceiling_bare_32_per_request_parsed": asyncio.run(_bare(url, args.rows, BATCH, args.concurrency,
                                                                    parse=True)),
            "ceiling_bare_1_per_request": asyncio.run(_bare(url, single, 1, args.concurrency)),
        }
        figures["dispatcher_only_packed"] = asyncio.run(_dispatcher_only(url, args.rows, args.concurrency))
        packed, per_request = _batchrun(url, folder, args.rows, args.concurrency, None)
        figures["batchrun_packed"] = packed
        if single != args.rows:
            pq.write_table(pa.table({"id": list(range(single)), "text": [_text(i) for i in range(single)]}),
                           folder / "in.parquet")
        figures["batchrun_1_per_request"], _ = _batchrun(url, folder, single, args.concurrency, 1)
        for name, value in figures.items():
            print(json.dumps({"run": name, "rows_per_second": round(value)}))
        print(json.dumps({"batchrun_packed_rows_per_request": per_request,
                          "packed_over_ceiling": round(figures["batchrun_packed"] /
                                                       figures["ceiling_bare_32_per_request"], 2),
                          "packed_over_parsed_ceiling": round(figures["batchrun_packed"] /
                                                              figures["ceiling_bare_32_per_request_parsed"], 2),
                          "packed_over_one_per_request": round(figures["batchrun_packed"] /
                                                               figures["batchrun_1_per_request"], 1)}))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        server.terminate()
        server.join()


if __name__ == "__main__":
    main()
