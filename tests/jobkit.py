"""Helpers for whole-job tests: tiny inputs, specs written to disk, an emulator, and output readers."""

from __future__ import annotations

import asyncio
import glob
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from batchrun.emulator import EmulatorConfig, EmulatorThread, EndpointConfig
from batchrun.runner import RunOptions, run_job
from batchrun.spec import load_spec

TOKEN = "hf_jobtest_token_not_real_000"
NS = "jobs-test"
FAST_LIFECYCLE = dict(pending_s=0.05, initializing_s=0.1, replica_start_s=0.05)
REPO = Path(__file__).resolve().parent.parent


def write_topics(path: Path, n: int, *, empty_every: int | None = None) -> Path:
    """A Parquet input of ``n`` rows: id, topic. Every ``empty_every``-th topic is null."""
    topics = [f"topic number {i}" for i in range(n)]
    if empty_every:
        topics = [None if i % empty_every == 0 else t for i, t in enumerate(topics)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"row-{i:05d}" for i in range(n)], "topic": topics}), path)
    return path


def write_spec(tmp_path: Path, *, endpoint: dict[str, Any], input_path: Path, name: str = "job", **overrides: Any) -> Path:
    """A chat job spec on ``input_path`` with fast retries, written to tmp_path/NAME.yaml."""
    spec: dict[str, Any] = {
        "name": name,
        "task": "chat-completion",
        "input": {"parquet": str(input_path), "id_column": "id"},
        "prompt": {"template": "Write about {topic}.", "system": "Be brief."},
        "parameters": {"max_tokens": 12, "seed": 1},
        "endpoint": endpoint,
        "concurrency": {"max": 32, "initial": 8},
        "retries": {"max_attempts": 3, "backoff_base": 0.01, "backoff_cap": 0.05, "max_retry_after": 0.2},
        "request_timeout": "5s",
        "output": {"path": str(tmp_path / "out" / name), "shard_rows": 40},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            merged = {**spec[key], **value}
            spec[key] = {k: v for k, v in merged.items() if v is not None}  # None removes a default key
        else:
            spec[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run(spec_path: Path, **options: Any):
    """Run a job in-process; returns (outcome, echoed lines)."""
    lines: list[str] = []
    opts = RunOptions(progress="off", handle_signals=False, echo=lines.append, poll_interval_s=0.02, **options)
    outcome = asyncio.run(run_job(load_spec(spec_path), opts))
    return outcome, lines


def emulator(*endpoints: EndpointConfig, token: str | None = TOKEN) -> EmulatorThread:
    return EmulatorThread(EmulatorConfig(token=token, endpoints=list(endpoints)))


def running_endpoint(name: str = "gen", **overrides: Any) -> EndpointConfig:
    values = {"name": name, "namespace": NS, "initial_state": "running", **FAST_LIFECYCLE, **overrides}
    return EndpointConfig.from_dict(values)


def read_ids(folder: Path, column: str = "id") -> list[Any]:
    ids: list[Any] = []
    for file in sorted(glob.glob(str(folder / "*.parquet"))):
        ids.extend(pq.read_table(file, columns=[column]).column(column).to_pylist())
    return ids


def read_rows(folder: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for file in sorted(glob.glob(str(folder / "*.parquet"))):
        rows.extend(pq.read_table(file).to_pylist())
    return rows


def data_requests(emu: EmulatorThread, name: str = "gen") -> int:
    return emu.stats()["endpoints"][f"{NS}/{name}"]["requests"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m batchrun ARGS` as a user would, from the repo root."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "batchrun", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
