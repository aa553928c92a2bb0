"""batchrun's own CPU per row, with no socket: what the client ceiling's gap to a bare aiohttp loop is made of.

benchmarks/client_ceiling.py compares whole jobs with a bare loop over a real server, a figure the load of
a shared machine moves by tens of percent. This one takes the network out: the ceiling's job (chat rows,
concurrency 64, Parquet in and out) runs in-process with a ``MockTransport`` that answers at once, so
what is left is batchrun's own work per row (reading the input, preparing and parsing, the limit, the
breaker and the budget, counting, the sink) and nothing of aiohttp's. The start-up is taken out by
difference: (CPU of an N-row job - CPU of an N/10-row job) / (0.9 N), the minimum of ``--repeats`` pairs
run in one interpreter (imports warm), CPU time of every thread.

The client ceiling's ratio is then about bare / (bare + own): with the bare loop at ~128 us of CPU a row
(its rows per client CPU-second within the span), 0.9 needs batchrun's own work at 14 us a row or less.

    .venv/bin/python benchmarks/own_cost.py                       # 20,000 rows, 8 pairs
    .venv/bin/python benchmarks/own_cost.py --before /tmp/src     # also an older tree (it needs MockTransport)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ANSWER = json.dumps({
    "object": "chat.completion", "id": "", "created": 0, "model": "tgi",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "x " * 16}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20},
}).encode()  # fmt: skip
_INFO = json.dumps({"model_id": "stand-in", "model_sha": None}).encode()
_URL = "http://127.0.0.1:9/"  # never dialled: the mock transport answers


def _cpu_of_job(folder: Path, rows: int) -> float:
    """The CPU time (every thread) of one whole job of ``rows`` rows, run in-process on the mock transport."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from client_ceiling import write_job
    from multidict import CIMultiDict, CIMultiDictProxy

    from batchrun.cli import main
    from batchrun.transport import MockTransport, Request, Response, use_transport

    headers = CIMultiDictProxy(CIMultiDict({"content-type": "application/json"}))

    def answer(request: Request) -> Response:
        return Response(200, headers, _INFO if request.url.endswith("/info") else _ANSWER)

    job = write_job(folder / f"job{rows}", _URL, rows, 64, "chat-completion")
    started = time.process_time()
    with (use_transport(MockTransport(answer)), contextlib.redirect_stdout(io.StringIO()),
          contextlib.redirect_stderr(io.StringIO())):
        code = main(["run", str(job), "--progress", "off", "--fresh"])
    spent = time.process_time() - started
    if code != 0:
        raise SystemExit(f"the {rows}-row job exited {code}")
    return spent


def measure(rows: int, repeats: int) -> dict:
    small = max(1, rows // 10)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _cpu_of_job(folder, small)  # imports, caches
        pairs = [(_cpu_of_job(folder, small), _cpu_of_job(folder, rows)) for _ in range(repeats)]
    per_row = sorted((big - little) / (rows - small) * 1e6 for little, big in pairs)
    best = min(big for _, big in pairs) - min(little for little, _ in pairs)
    return {"rows": rows, "repeats": repeats, "own_us_per_row_min": round(best / (rows - small) * 1e6, 1),
            "own_us_per_row_each": [round(v, 1) for v in per_row]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--before", metavar="SRC", help="also measure the batchrun package of this source tree")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # this interpreter's tree only
    args = parser.parse_args()
    os.environ.setdefault("HF_TOKEN", "hf_benchmark_token_not_real")
    if args.one or args.before is None:
        print(json.dumps(measure(args.rows, args.repeats)))
        return
    figures = {}
    for name, path in (("batchrun", None), ("batchrun_before", args.before)):
        env = dict(os.environ)
        if path is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
        done = subprocess.run([sys.executable, __file__, "--one", "--rows", str(args.rows), "--repeats",
                               str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        figures[name] = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
