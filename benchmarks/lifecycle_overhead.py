"""Billable overhead of the endpoint lifecycle: ready -> first request, last request -> pause.

Runs whole jobs (run_job, in-process, production polling defaults) against an EmulatorThread whose
endpoint starts paused and is scaled to ``--replicas``. Prints, per run and as a median:

  ready -> first request   emulator-side: from the moment the emulated endpoint was running with every
                           target replica ready (a 1 ms watcher thread reads the emulator's state) to the
                           first data-plane request it received (stats first_request_at). Also shown:
                           the lifecycle's own "is ready" event -> first request.
  last request -> pause    from the last data-plane request the emulator received (stats last_request_at)
                           to the pause call in its control_log ('t'). It includes that last request's
                           service time (--latency), which is not overhead; it is printed separately.

Both are billed time with nothing useful happening: the goal is under 1 s each.

    .venv/bin/python benchmarks/lifecycle_overhead.py --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

TOKEN = "hf_benchmark_token_not_real_0000"
NS = "bench"


def one_run(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    from jobkit import write_spec, write_topics

    from batchrun.emulator import EmulatorConfig, EmulatorThread, EndpointConfig
    from batchrun.runner import RunOptions, run_job
    from batchrun.spec import load_spec

    config = EndpointConfig.from_dict({
        "name": "gen", "namespace": NS, "initial_state": "paused", "pending_s": 0.3, "initializing_s": 1.0,
        "replica_start_s": 0.5, "latency_base_s": args.latency,
    })
    with EmulatorThread(EmulatorConfig(token=TOKEN, endpoints=[config])) as emu:
        state = emu.state(NS, "gen")
        ready_wall: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                if state.state == "running" and state.target_replicas and state.ready_replicas >= state.target_replicas:
                    ready_wall.append(time.time())
                    return
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        input_path = write_topics(workdir / "in.parquet", args.rows)
        endpoint = {"name": "gen", "namespace": NS, "api_url": emu.api_url, "ready_timeout": 60,
                    "scale": {"min_replica": args.replicas, "max_replica": args.replicas}}
        spec_path = write_spec(workdir, endpoint=endpoint, input_path=input_path, name="bench",
                               concurrency={"max": 32, "initial": 16})
        events: list[tuple[float, str]] = []
        options = RunOptions(progress="off", handle_signals=False, echo=lambda m: events.append((time.time(), m)))
        outcome = asyncio.run(run_job(load_spec(spec_path), options))
        stop.set()
        stats = emu.stats()
        if outcome.exit_code != 0:  # the figures still hold; the row accounting is another module's concern
            rows = outcome.summary["rows"]
            print(f"  warning: exit {outcome.exit_code}, sent ok {rows['ok']}, committed {rows['total_ok']}",
                  file=sys.stderr)
        endpoint_stats = stats["endpoints"][f"{NS}/gen"]
        pause_t = next(e["t"] for e in stats["control_log"] if e["path"].endswith("/pause"))
        lifecycle_ready = next(t for t, m in events if "is ready at" in m)
        return {
            "ready_to_first_request_s": endpoint_stats["first_request_at"] - ready_wall[0],
            "lifecycle_ready_to_first_request_s": endpoint_stats["first_request_at"] - lifecycle_ready,
            "last_request_to_pause_s": pause_t - endpoint_stats["last_request_at"],
            "wall_s": outcome.summary["wall_s"],
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.01, help="emulated request latency, seconds")
    args = parser.parse_args()
    os.environ["HF_TOKEN"] = TOKEN
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            result = one_run(args, Path(tmp))
        results.append(result)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
    print(f"median of {args.runs} runs ({args.rows} rows, {args.replicas} replicas, latency {args.latency}s, "
          "production poll interval):")
    for key in results[0]:
        print(f"  {key}: {statistics.median(r[key] for r in results):.3f}")


if __name__ == "__main__":
    main()
