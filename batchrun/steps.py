"""A job of several steps (``steps:``): each step a job of its own, run in order on the rows of the one before.

    OUTPUT/
      steps/<name>/        each step's own output folder, with the layout of any job's (output/)
      state/summary.json   the job's summary: each step's outcome, and the exit code of the whole

Each step is run by :func:`~batchrun.runner.run_job` with its own spec, so it owns its output folder,
its fingerprint, its endpoint (brought up for it and released when it ends) and its resume: a rerun
skips a finished step without touching its endpoint, and finishes a stopped one. A later step reads
the rows the step before it committed (:class:`~batchrun.sources.StepSource`), filtered; its input
fingerprint covers those rows and the filter. So editing step k (its prompt, parameters or filter)
makes step k's output refuse a resume: that step is started over (its old folder set aside, never
deleted), and each step after it sees a changed input and is started over too, while the steps
before it are finished and send nothing. A row that a later step drops stays in the earlier step's
output.

Steps run one after another: step k+1 starts when step k has ended with every row recorded. A step
that stops early (a signal, the budget, an outage) ends the job there, resumable (exit 3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchrun import run_record
from batchrun.errors import ConfigMismatchError
from batchrun.facts import ID_COLUMN, ExitCode
from batchrun.runner import RunOptions, run_job
from batchrun.spec import JobSpec, StepSpec
from batchrun.stop import Stop
from batchrun.summary import JobOutcome

__all__ = ["STEPS_FOLDER", "run_steps", "step_folder", "step_folders", "steps_of_output"]

#: Where each step's output folder lives, under the job's.
STEPS_FOLDER = "steps"


def step_folders(root: str | Path, spec: JobSpec) -> dict[str, Path]:
    """Each step's output folder, by step name, under the job's output folder ``root``."""
    return {step.name: Path(root) / STEPS_FOLDER / step.name for step in spec.steps}


def steps_of_output(root: str | Path) -> list[dict[str, Any]] | None:
    """The steps of the job whose output folder is ``root`` (name, task; task None for a filter), or None
    when ``root`` is not the folder of a job of several steps."""
    from batchrun.output import OutputStore

    store = OutputStore(root)
    job = store.load_job() if Path(root).is_dir() and store.exists() else None
    steps = (job or {}).get("steps")
    if not isinstance(steps, list):
        return None
    return [step if isinstance(step, dict) else {"name": str(step), "task": None} for step in steps]


def step_folder(root: str | Path, step: str | None = None, *, sending: bool = False) -> Path:
    """The folder a command reads for ``root``: ``root`` itself, or for a job of several steps the folder
    of ``step`` (by default its last step; ``sending``: its last that sends requests, such as a judge
    before a filter).

    Raises :class:`ValueError` naming the steps when ``step`` is not one of them, or is given for a
    folder that is not a job of several steps."""
    steps = steps_of_output(root)
    if steps is None:
        if step is not None:
            raise ValueError(f"{root} is not the output of a job of several steps: --step does not apply")
        return Path(root)
    names = [s["name"] for s in steps]
    if step is None:
        senders = [s["name"] for s in steps if s.get("task")] if sending else []
        step = senders[-1] if senders else names[-1]
    if step not in names:
        raise ValueError(f"{root} has no step {step!r}; its steps: {', '.join(names)}")
    return Path(root) / STEPS_FOLDER / step


async def run_steps(spec: JobSpec, options: RunOptions | None = None,
                    new_stop: Callable[[], Stop] | None = None) -> JobOutcome:
    """Run (or resume) every step of ``spec`` in order; the outcome's summary says how each ended.

    ``new_stop`` makes each step's :class:`Stop` (the Python API's, to reach the running step with an
    interrupt); None: each step makes its own.
    """
    options = options or RunOptions()
    started = time.time()
    spec, _ = run_record.this_run(spec)  # a templated output.path: one folder for the run, its steps inside
    root = Path(spec.output.path)
    folders = step_folders(root, spec)
    ended: list[dict[str, Any]] = []
    exit_code = ExitCode.OK
    previous: Path | None = None
    for step in spec.steps:
        reads = "the job's input" if previous is None else f"the rows of {previous.name}"
        doing = "filtering" if step.job is None else f"{step.job.task} on"
        options.echo(f"step {step.name}: {doing} {reads}")
        job = _placed(step, folders[step.name], previous, spec)
        if job is None:
            summary = await asyncio.to_thread(_write_filtered, step, folders[step.name], previous, spec)
            code = ExitCode(summary["exit_code"])
        else:
            outcome = await _run_step(job, options, new_stop, step.name)
            summary, code = outcome.summary, outcome.exit_code
        ended.append({"name": step.name, "exit_code": int(code), "outcome": summary.get("outcome"),
                      "rows": summary.get("rows"), "output": str(folders[step.name])})
        exit_code = max(exit_code, code)
        previous = folders[step.name]
        if code >= ExitCode.STOPPED_EARLY:  # the rest waits for this step to finish
            break
    summary = _job_summary(spec, ended, exit_code, started)
    await asyncio.to_thread(_save, root, spec, summary)
    options.echo(f"job {spec.name}: " + ", ".join(f"{s['name']} {s['outcome']}" for s in ended))
    return JobOutcome(exit_code=exit_code, summary=summary)


def _placed(step: StepSpec, folder: Path, previous: Path | None, spec: JobSpec) -> JobSpec | None:
    """The step's job with this run's folders: its output, and (after the first) the folder it reads."""
    if step.job is None:
        return None
    job = dataclasses.replace(step.job, output=dataclasses.replace(step.job.output, path=str(folder)))
    if previous is not None:
        job = dataclasses.replace(job, input=dataclasses.replace(job.input, path=str(previous)))
    elif spec.input.kind == "memory":  # rows from Python reach the first step
        job = dataclasses.replace(job, input=spec.input)
    return job


async def _run_step(job: JobSpec, options: RunOptions, new_stop: Callable[[], Stop] | None, name: str) -> JobOutcome:
    stop = new_stop() if new_stop is not None else None
    try:
        return await run_job(job, dataclasses.replace(options, stop=stop))
    except ConfigMismatchError as exc:
        # This step (or one before it) changed: its output no longer matches; start it over.
        options.echo(f"step {name}: its settings or its input changed ({exc}); starting it over, the old output "
                     "set aside")
        stop = new_stop() if new_stop is not None else None
        return await run_job(job, dataclasses.replace(options, stop=stop, fresh=True, retry_failed=False))


# --------------------------------------------------------------------------- a step that only filters


def _write_filtered(step: StepSpec, folder: Path, previous: Path | None, spec: JobSpec) -> dict[str, Any]:
    """Write the rows of the step before that pass the filter, as an output folder of their own.

    Nothing is sent, so nothing needs resuming row by row: the folder is written whole, and kept
    while the rows and the filter it came from are the same (its fingerprint).
    """
    import pyarrow as pa

    from batchrun.output import OutputLock, OutputStore, ParquetSink, build_data_schema
    from batchrun.records import RowResult
    from batchrun.sources import StepSource
    from batchrun.spec import InputSpec

    assert previous is not None
    id_column = spec.input.id_column or ID_COLUMN
    source = StepSource(InputSpec(kind="step", path=str(previous), id_column=id_column, step_filter=step.filter))
    fingerprint = source.fingerprint()
    store = OutputStore(folder)
    stored = store.load_job() if store.exists() else None
    summary = store.load_summary() if stored is not None else None
    if stored is not None and stored.get("fingerprint") == fingerprint and summary is not None:
        return summary  # the same rows through the same filter: written already
    if store.exists():
        store.set_aside()
    started = time.time()
    schema = build_data_schema(source.schema, id_column=id_column, keep_columns=None, output_schema=pa.schema([]))
    kept = [name for name in source.schema.names if name != id_column]
    lock = OutputLock(store)
    lock.acquire()
    try:
        record = {"name": step.name, "filter": step.filter, "input": {"id_column": id_column}}
        store.save_job({"name": f"{spec.name}-{step.name}", "identity": {"filter": step.filter, "input": fingerprint},
                        "fingerprint": fingerprint, "spec": record,
                        "kept_columns": kept, "created_at": dt.datetime.now(dt.UTC).isoformat(), "runs": 1})
        sink = ParquetSink(store, data_schema=schema, id_column=id_column, shard_rows=spec.output.shard_rows,
                           shard_bytes=spec.output.shard_bytes, kept_columns=kept)
        sink.open()
        rows = 0
        for batch in source.batches():
            for row in batch:
                sink.add(RowResult(position=row.position, id=row.id, output={}, latency_s=0.0, attempts=0,
                                   kept={name: row.columns.get(name) for name in kept}))
                rows += 1
        sink.close()
        summary = {"job": f"{spec.name}-{step.name}", "outcome": "finished, every row succeeded",
                   "exit_code": int(ExitCode.OK), "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
                   "wall_s": round(time.time() - started, 3),
                   "rows": {"ok": rows, "failed": 0, "skipped": 0, "pending": 0, "total_ok": rows, "total_failed": 0,
                            "total_failed_retryable": 0},
                   "filter": step.filter, "output": str(store.root), "stop_reason": None, "stop_kind": None}
        store.write_summary(summary)
    finally:
        lock.release()
    return summary


# --------------------------------------------------------------------------- the job's summary


def _job_summary(spec: JobSpec, ended: list[dict[str, Any]], exit_code: ExitCode, started: float) -> dict[str, Any]:
    last = ended[-1] if ended else {}
    finished = len(ended) == len(spec.steps) and exit_code < ExitCode.STOPPED_EARLY
    outcome = (f"every step finished{' (with failed rows)' if exit_code == ExitCode.ROWS_FAILED else ''}" if finished
               else f"stopped early in step {last.get('name')}")
    return {
        "job": spec.name,
        "outcome": outcome,
        "exit_code": int(exit_code),
        "started_at": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(),
        "wall_s": round(time.time() - started, 3),
        "rows": last.get("rows") if finished else None,  # what the last step kept
        "steps": ended,
        "output": str(Path(spec.output.path).absolute()),
        "stop_reason": None if finished else f"step {last.get('name')}: {last.get('outcome')}",
    }


def _save(root: Path, spec: JobSpec, summary: dict[str, Any]) -> None:
    from batchrun.output import OutputStore

    store = OutputStore(root)
    store.state_dir.mkdir(parents=True, exist_ok=True)
    store.save_job({"name": spec.name, "spec": dict(spec.raw), "spec_file": spec.file,
                    "steps": [{"name": step.name, "task": step.job.task if step.job else None, "filter": step.filter}
                              for step in spec.steps]})
    store.write_summary(summary)
