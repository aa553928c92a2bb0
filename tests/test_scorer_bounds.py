"""Scorers are code a spec or the data chooses: validate runs none of it, and a run bounds it off the event loop."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from jobkit import NS, TOKEN, emulator, read_rows, running_endpoint, write_spec

import batchrun.scoring
from batchrun.cli import main
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec

#: Backtracks through 2**25 paths on any answer (about 3 s here), holding the GIL all along.
EVIL = r"^(.|.){0,25}QQQ"


def _input(path: Path, patterns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(patterns))],
                             "topic": [f"topic {i}" for i in range(len(patterns))], "pat": patterns}), path)
    return path


def test_validate_finds_a_function_scorer_without_running_its_module(tmp_path, capsys):
    marker = tmp_path / "imported"
    (tmp_path / "my_scorers.py").write_text(
        f"open({str(marker)!r}, 'w').write('the module ran')\n"
        "def judge(row):\n    return {'length': 1}\n")
    input_path = _input(tmp_path / "in.parquet", ["a"])
    spec = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=input_path,
                      score=[{"function": "my_scorers:judge", "columns": ["length"]}])
    assert main(["validate", str(spec)]) == 0
    assert not marker.exists()  # validate promises to send nothing and run nothing
    bad = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=input_path, name="bad",
                     score=[{"function": "my_scorers:jduge", "columns": ["length"]}])
    assert main(["validate", str(bad)]) == 2
    assert "jduge" in capsys.readouterr().err
    assert not marker.exists()
    missing = write_spec(tmp_path, endpoint={"url": "http://127.0.0.1:9"}, input_path=input_path, name="missing",
                         score=[{"function": "no_such_scorers:judge", "columns": ["length"]}])
    assert main(["validate", str(missing)]) == 2
    assert "no_such_scorers" in capsys.readouterr().err


def test_a_backtracking_regex_from_the_data_times_out_off_the_event_loop(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(batchrun.scoring, "SCORE_TIMEOUT_S", 0.3, raising=False)
    input_path = _input(tmp_path / "in.parquet", ["e", "e", EVIL, "e", "e", "e"])
    gaps: list[float] = []

    async def job_and_ticker(spec: Path):
        finished = asyncio.Event()

        async def ticker() -> None:  # how long the event loop went without a turn
            last = time.monotonic()
            while not finished.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        try:
            return await run_job(load_spec(spec), RunOptions(progress="off", handle_signals=False,
                                                             echo=lambda _: None, poll_interval_s=0.02))
        finally:
            finished.set()
            await ticking

    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          concurrency={"max": 1, "initial": 1}, score=[{"regex": "pat"}])
        outcome = asyncio.run(job_and_ticker(spec))
    assert outcome.exit_code == 0
    rows = {r["id"]: r for r in read_rows(tmp_path / "out" / "job" / "data")}
    assert len(rows) == 6  # no answer lost
    assert rows["r2"]["score_regex"] is None and rows["r2"]["score_error"].startswith("timeout")
    assert rows["r2"]["generated_text"]
    others = [r for i, r in rows.items() if i != "r2"]
    assert all(r["score_error"] is None and r["score_regex"] is not None for r in others)  # a new process scored them
    assert outcome.summary["scores"]["errors"] == 1
    assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.2f} s"


def test_a_scorer_module_that_fails_on_import_stops_the_run_before_the_endpoint_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    (tmp_path / "broken_scorers.py").write_text("raise RuntimeError('no judge today')\ndef judge(row):\n    pass\n")
    input_path = _input(tmp_path / "in.parquet", ["a", "b"])
    with emulator(running_endpoint()) as emu:
        spec = write_spec(tmp_path, endpoint={"url": emu.endpoint_url(NS, "gen")}, input_path=input_path,
                          score=[{"function": "broken_scorers:judge", "columns": ["x"]}])
        outcome = asyncio.run(run_job(load_spec(spec), RunOptions(progress="off", handle_signals=False,
                                                                  echo=lambda _: None, poll_interval_s=0.02)))
        requests = emu.stats()["endpoints"][f"{NS}/gen"]["requests"]
    assert outcome.exit_code == 3 and "no judge today" in outcome.summary["stop_reason"]
    assert requests == 0


@pytest.mark.parametrize("source", [
    "def judge(row):\n    return {}\n",
    "try:\n    from fast import judge\nexcept ImportError:\n    def judge(row):\n        return {}\n",
    "judge = lambda row: {}\n",
    "from elsewhere import *\n",
])
def test_the_source_check_accepts_the_ways_a_module_defines_a_name(tmp_path, source):
    (tmp_path / "defs.py").write_text(source)
    batchrun.scoring._check_function("defs:judge", (str(tmp_path),))
