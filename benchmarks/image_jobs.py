"""Image jobs: images per second, and peak memory as the number of images grows.

Every job is a full `batchrun` text-to-image job (Parquet in, preflight, dispatch, every image
checked by Pillow, Parquet shards out, rotated by bytes) run in a child process of its own, which
reports its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) when the job ends.
The server runs in another process on loopback.

1. throughput: N small images (64x64 PNG by default) from the batchrun emulator (8 replicas, no
   image latency). Reports images/s and the job's peak RSS.
2. memory: ~1 MB images (incompressible 580x580 PNGs), for several row counts. The emulator's
   pictures (gradients and shapes) compress to under 100 KB even at 2048x2048, so a stand-in server
   speaking the same protocol (protocols.md §2: POST /, Accept: image/png, raw bytes back) serves a
   pool of pre-made 1 MB PNGs, one picked by the request's seed. Flat memory means the peak RSS
   does not grow with the number of rows.

    .venv/bin/python benchmarks/image_jobs.py                                  # both, default sizes
    .venv/bin/python benchmarks/image_jobs.py --only throughput --rows 20000
    .venv/bin/python benchmarks/image_jobs.py --only memory --big-rows 500 2000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

TOKEN = "hf_benchmark_token_not_real"
NS = "bench"
BIG_SIDE = 580  # 580 * 580 * 3 bytes of noise: a PNG of about 1.0 MB
POOL = 32


# --------------------------------------------------------------------------------------------------
# Servers, each in its own process


def _serve_emulator(replicas: int, conn) -> None:
    from batchrun.emulator import EmulatorConfig, EndpointConfig, serve

    endpoint = EndpointConfig.from_dict({
        "name": "sdxl", "namespace": NS, "task": "text-to-image", "initial_state": "running",
        "min_replica": replicas, "max_replica": replicas, "image_latency_s": 0.0,
    })  # fmt: skip

    def ready(emu) -> None:
        conn.send(emu.endpoint_url(NS, "sdxl"))

    asyncio.run(serve(EmulatorConfig(token=TOKEN, endpoints=[endpoint]), ready=ready))


def _serve_big_images(conn) -> None:
    """A text-to-image stand-in that answers each request with one of POOL pre-made 1 MB PNGs.

    Each answer carries its seed in a PNG text chunk, so no two stored images are the same bytes:
    otherwise Parquet's dictionary encoding would store the pool once and flatter the disk figures.
    """
    import struct
    import zlib

    from aiohttp import web
    from PIL import Image

    rng = random.Random(0)
    pool = []
    for _ in range(POOL):
        noise = Image.frombytes("RGB", (BIG_SIDE, BIG_SIDE), rng.randbytes(BIG_SIDE * BIG_SIDE * 3))
        out = io.BytesIO()
        noise.save(out, format="PNG")
        pool.append(out.getvalue())

    async def generate(request: web.Request) -> web.Response:
        payload = await request.json()
        if request.headers.get("Accept") != "image/png":
            return web.json_response({"error": "this stand-in only draws PNG"}, status=400)
        seed = payload["parameters"]["seed"]
        png = pool[seed % POOL]
        text = b"seed\x00" + str(seed).encode()
        chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
        # After the 8-byte signature and the 25-byte IHDR chunk: still a valid PNG, now unique.
        return web.Response(body=png[:33] + chunk + png[33:], content_type="image/png")

    async def main() -> None:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/", generate)
        app.router.add_get("/health", lambda request: web.Response(text="Ok"))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}")
        await asyncio.Event().wait()

    asyncio.run(main())


class ServerProcess:
    def __init__(self, target, *args) -> None:
        self.target, self.args = target, args

    def __enter__(self) -> str:
        parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=self.target, args=(*self.args, child), daemon=True)
        self.process.start()
        return parent.recv()

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(5)


# --------------------------------------------------------------------------------------------------
# The job, in a child process that reports its own peak RSS


def _job_child(spec_path: str, conn) -> None:
    os.environ["HF_TOKEN"] = TOKEN
    from batchrun.runner import RunOptions, run_job
    from batchrun.spec import load_spec

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    outcome = asyncio.run(run_job(load_spec(spec_path), RunOptions(progress="off", handle_signals=False,
                                                                  echo=lambda m: None)))
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    conn.send({"wall_s": wall, "peak_rss_mib": peak_kib / 1024, "rss_before_job_mib": before / 1024,
               "exit_code": outcome.exit_code, "rows": outcome.summary["rows"]})


def run_job_in_child(spec_path: Path) -> dict:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=_job_child, args=(str(spec_path), child))
    process.start()
    result = parent.recv()
    process.join()
    return result


def write_job(folder: Path, url: str, rows: int, *, size: int, concurrency: int, shard_bytes: str = "64MiB") -> Path:
    input_path = folder / "prompts.parquet"
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": [f"picture {i % 997}" for i in range(rows)]}),
                   input_path)
    spec = {
        "name": "bench-images",
        "task": "text-to-image",
        "input": {"parquet": str(input_path), "id_column": "id"},
        "prompt": {"column": "prompt"},
        "parameters": {"width": size, "height": size, "num_inference_steps": 4},
        "image": {"format": "png"},
        "endpoint": {"url": url},
        "concurrency": {"max": concurrency, "initial": min(8, concurrency)},
        "retries": {"max_attempts": 5},
        "request_timeout": "60s",
        "output": {"path": str(folder / "out"), "shard_bytes": shard_bytes},  # and 10,000 rows, the default
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _output_summary(folder: Path) -> str:
    shards = sorted((folder / "out" / "data").glob("*.parquet"))
    total = sum(p.stat().st_size for p in shards)
    return f"{len(shards)} shards, {total / 2**20:.0f} MiB on disk"


# --------------------------------------------------------------------------------------------------
# The benchmarks


def throughput(rows: int, size: int, concurrency: int, replicas: int) -> None:
    print(f"throughput: {rows} images of {size}x{size} PNG from the emulator ({replicas} replicas), "
          f"concurrency.max {concurrency}")
    with ServerProcess(_serve_emulator, replicas) as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result = run_job_in_child(write_job(folder, url, rows, size=size, concurrency=concurrency))
        assert result["exit_code"] == 0, result
        print(f"  {rows / result['wall_s']:.0f} images/s ({result['wall_s']:.1f} s wall, whole job), "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB (after imports {result['rss_before_job_mib']:.0f} MiB); "
              f"{_output_summary(folder)}")


def memory(row_counts: list[int], concurrency: int, shard_bytes: str) -> None:
    print(f"memory: ~1 MB PNGs ({BIG_SIDE}x{BIG_SIDE} noise) from a stand-in server, concurrency.max {concurrency}, "
          f"shard_bytes {shard_bytes}")
    with ServerProcess(_serve_big_images) as url:
        for rows in row_counts:
            folder = Path(tempfile.mkdtemp(prefix="bench-images-"))
            try:
                spec = write_job(folder, url, rows, size=BIG_SIDE, concurrency=concurrency, shard_bytes=shard_bytes)
                result = run_job_in_child(spec)
                assert result["exit_code"] == 0, result
                print(f"  {rows:>6} rows: peak RSS {result['peak_rss_mib']:.0f} MiB "
                      f"(after imports {result['rss_before_job_mib']:.0f} MiB), "
                      f"{rows / result['wall_s']:.0f} images/s, {_output_summary(folder)}")
            finally:
                shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["throughput", "memory"])
    parser.add_argument("--rows", type=int, default=20_000, help="images in the throughput run")
    parser.add_argument("--size", type=int, default=64, help="side of the throughput run's images")
    parser.add_argument("--replicas", type=int, default=8, help="emulator replicas (each draws one image at a time)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--big-rows", type=int, nargs="+", default=[500, 2000], help="row counts of the 1 MB runs")
    parser.add_argument("--shard-bytes", default="64MiB", help="output.shard_bytes of the 1 MB runs (default: 64MiB)")
    args = parser.parse_args()
    if args.only in (None, "throughput"):
        throughput(args.rows, args.size, args.concurrency, args.replicas)
    if args.only in (None, "memory"):
        memory(args.big_rows, args.concurrency, args.shard_bytes)


if __name__ == "__main__":
    main()
