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

Steps stream: step k+1 starts as soon as step k has opened its output, and reads step k's rows as
they are committed (only closed, listed shards), so both endpoints work at once; it ends when step k
has ended and every row it committed is read. Each step's endpoint is released when that step ends.
A step that only filters waits for the steps before it to end, and so does a step on the same
Dedicated endpoint as one still running (each step brings its endpoint up and puts it down, and
would put it down under the other). A step that stops early (a signal,
the budget, an outage) ends the job there, resumable (exit 3): the steps already running finish
what they can read, and no later step starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchrun import run_record
from batchrun.errors import BatchrunError, ConfigMismatchError
from batchrun.facts import GRACE_S, ID_COLUMN, ExitCode
from batchrun.runner import RunOptions, run_job
from batchrun.spec import JobSpec, StepSpec
from batchrun.stop import Stop, StopCause, StopReason, catch_signals
from batchrun.summary import JobOutcome

__all__ = ["STEPS_FOLDER", "JobStop", "run_steps", "step_folder", "step_folders", "steps_of_output"]

#: How often the runner looks whether a step it started has opened its output (then the next may start).
OPENED_POLL_S = 0.1

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
    try:
        job = store.load_job() if Path(root).is_dir() and store.exists() else None
    except BatchrunError:  # an unreadable job.json: the command reading the folder says what is wrong
        return None
    steps = job.get("steps") if isinstance(job, dict) else None
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


class JobStop(Stop):
    """The stop of a job of several steps: a request or an abort reaches every step running.

    Steps run at once, each with its own :class:`Stop` (its own first reason); signals, the Python
    API's interrupt and a cancellation reach this one, which passes them on.
    """

    def __init__(self, *, grace_s: float = GRACE_S, echo: Callable[[str], None] | None = None) -> None:
        super().__init__(grace_s=grace_s, echo=echo)
        self._steps: list[Stop] = []

    def for_step(self) -> Stop:
        """A new step's stop, requested at once if the job already is."""
        stop = Stop(grace_s=self.grace_s)
        if self.cause is not None:
            stop.request(self.cause.reason, self.cause.detail)
        self._steps.append(stop)
        return stop

    def request(self, reason: StopReason, detail: str) -> bool:
        first = super().request(reason, detail)
        for stop in self._steps:
            stop.request(reason, detail)
        return first

    def abort(self) -> None:
        super().abort()
        for stop in self._steps:
            if stop.requested:
                stop.abort()


async def run_steps(spec: JobSpec, options: RunOptions | None = None) -> JobOutcome:
    """Run (or resume) every step of ``spec``; the outcome's summary says how each ended.

    Steps stream: a step starts as soon as the one before it has opened its output, and reads its rows
    as they are committed. ``options.stop``, when given, stops the whole job (a :class:`JobStop` passes
    its requests on to every step; another stop is followed).
    """
    options = options or RunOptions()
    started = time.time()
    spec, _ = run_record.this_run(spec)  # a templated output.path: one folder for the run, its steps inside
    root = Path(spec.output.path)
    folders = step_folders(root, spec)
    job_stop = options.stop if isinstance(options.stop, JobStop) else JobStop(grace_s=options.grace_s,
                                                                              echo=options.echo)
    if options.stop is not None and options.stop is not job_stop:
        def follow(cause: StopCause) -> None:
            job_stop.request(cause.reason, cause.detail)

        options.stop.on_request(follow)
    # One place takes signals for every step running: each step's own handlers would replace one another.
    step_options = dataclasses.replace(options, handle_signals=False)
    with catch_signals(job_stop, echo=options.echo, enabled=options.handle_signals):
        ended = await _run_in_order(spec, folders, step_options, job_stop)
    exit_code = max((ExitCode(step["exit_code"]) for step in ended), default=ExitCode.OK)
    summary = _job_summary(spec, ended, exit_code, started)
    await asyncio.to_thread(_save, root, spec, summary)
    options.echo(f"job {spec.name}: " + ", ".join(f"{s['name']} {s['outcome']}" for s in ended))
    return JobOutcome(exit_code=exit_code, summary=summary)


async def _run_in_order(spec: JobSpec, folders: dict[str, Path], options: RunOptions,
                        job_stop: JobStop) -> list[dict[str, Any]]:
    """Start each step once the one before has opened its output; a step that only filters waits for
    the steps before it to end. Every step started is awaited, whatever happens to the others."""
    running: list[tuple[StepSpec, asyncio.Task[JobOutcome]]] = []
    ended: dict[str, dict[str, Any]] = {}
    previous: Path | None = None
    upstream_done: threading.Event | None = None
    try:
        for step in spec.steps:
            folder = folders[step.name]
            reads = "the job's input" if previous is None else f"the rows of {previous.name}"
            if step.job is None:
                await _settle(running, ended, folders)
                if any(e["exit_code"] >= ExitCode.STOPPED_EARLY for e in ended.values()) or job_stop.requested:
                    break  # the steps before did not finish: their rows are not all there to filter
                options.echo(f"step {step.name}: filtering {reads}")
                summary = await asyncio.to_thread(_write_filtered, step, folder, previous, spec)
                ended[step.name] = _ended(step.name, folder, ExitCode(summary["exit_code"]), summary)
            else:
                shared = [(other, task) for other, task in running
                          if not task.done() and _managed(other) & _managed(step)]
                if shared:
                    # Two steps on one Dedicated endpoint do not overlap: each brings it up and puts it
                    # down, and one would put it down under the other.
                    options.echo(f"step {step.name}: waits for step {shared[-1][0].name}, which uses the same "
                                 "endpoint")
                    await asyncio.wait({task for _, task in shared})
                options.echo(f"step {step.name}: {step.job.task} on {reads}")
                done = threading.Event()
                job = _placed(step, folder, previous, spec, upstream_done)
                runs_before = await asyncio.to_thread(_runs_of, folder)
                task = asyncio.create_task(_run_step(job, options, job_stop, step.name, done))
                running.append((step, task))
                await _opened(folder, runs_before, task)
                if task.done() and (task.exception() is not None or task.result().exit_code >= ExitCode.STOPPED_EARLY):
                    break
                upstream_done = done
            previous = folder
    finally:
        await _settle(running, ended, folders)
    return [ended[step.name] for step in spec.steps if step.name in ended]


async def _settle(running: list[tuple[StepSpec, asyncio.Task[JobOutcome]]], ended: dict[str, dict[str, Any]],
                  folders: dict[str, Path]) -> None:
    """Wait for every step started; the first that raised (nothing ran: exit 2) raises once all have ended."""
    await asyncio.gather(*(task for _, task in running), return_exceptions=True)
    for step, task in running:
        if step.name in ended:
            continue
        if task.cancelled():
            raise asyncio.CancelledError
        error = task.exception()
        if error is not None:
            raise error
        outcome = task.result()
        ended[step.name] = _ended(step.name, folders[step.name], outcome.exit_code, outcome.summary)


def _managed(step: StepSpec) -> set[tuple[str | None, str | None]]:
    """The Dedicated endpoints a step brings up and puts down (namespace, name)."""
    if step.job is None:
        return set()
    return {(e.namespace, e.name) for e in step.job.all_endpoints if e.name is not None}


def _ended(name: str, folder: Path, code: ExitCode, summary: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "exit_code": int(code), "outcome": summary.get("outcome"), "rows": summary.get("rows"),
            "output": str(folder)}


def _runs_of(folder: Path) -> tuple[int, int]:
    """Which manifest the step's folder holds (a fresh start sets the old folder aside) and how many runs
    opened it: when either changes, a run has opened the output."""
    import os

    from batchrun.output import OutputStore
    from batchrun.output.manifest import read_manifest

    store = OutputStore(folder)
    try:
        inode = os.stat(store.manifest_path).st_ino
    except OSError:
        return (0, 0)
    return (inode, read_manifest(store.manifest_path).runs)


async def _opened(folder: Path, runs_before: tuple[int, int], task: asyncio.Task[JobOutcome]) -> None:
    """Until the step's run has opened its output (its job.json is this run's) or has ended."""
    while not task.done():
        if await asyncio.to_thread(_runs_of, folder) != runs_before:
            return
        await asyncio.wait({task}, timeout=OPENED_POLL_S)


def _placed(step: StepSpec, folder: Path, previous: Path | None, spec: JobSpec,
            upstream_done: threading.Event | None) -> JobSpec:
    """The step's job with this run's folders: its output, and (after the first) the folder it reads."""
    assert step.job is not None
    job = dataclasses.replace(step.job, output=dataclasses.replace(step.job.output, path=str(folder)))
    if previous is not None:
        job = dataclasses.replace(job, input=dataclasses.replace(job.input, path=str(previous),
                                                                 upstream_done=upstream_done))
    elif spec.input.kind == "memory":  # rows from Python reach the first step
        job = dataclasses.replace(job, input=spec.input)
    return job


async def _run_step(job: JobSpec, options: RunOptions, job_stop: JobStop, name: str,
                    done: threading.Event) -> JobOutcome:
    """Run one step; ``done`` is set when it ends, however it ends (the step after it stops reading then)."""
    try:
        try:
            return await run_job(job, dataclasses.replace(options, stop=job_stop.for_step()))
        except ConfigMismatchError as exc:
            # This step (or one before it) changed: its output no longer matches; start it over.
            options.echo(f"step {name}: its settings or its input changed ({exc}); starting it over, the old "
                         "output set aside")
            return await run_job(job, dataclasses.replace(options, stop=job_stop.for_step(), fresh=True,
                                                          retry_failed=False))
    except BatchrunError as exc:  # nothing of this step ran (exit 2): said now, raised once every step has ended
        options.echo(f"step {name}: error: {exc}; the steps before it finish, then the job ends with this error")
        raise
    finally:
        done.set()


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
    fingerprint = source.content_fingerprint()
    store = OutputStore(folder)
    stored = store.load_job() if store.exists() else None
    summary = store.load_summary() if stored is not None else None
    if stored is not None and stored.get("fingerprint") == fingerprint and summary is not None:
        return summary  # the same rows through the same filter: written already
    # One writer per output: the lock is taken before anything is moved, so a run still writing this
    # folder refuses this one at once and keeps its files where they are.
    existed = store.exists()
    lock = OutputLock(store)
    lock.acquire()
    if existed:
        store.set_aside()  # the lock file moves with it: take it again on the new folder
        lock.release()
        lock = OutputLock(store)
        lock.acquire()
    started = time.time()
    schema = build_data_schema(source.schema, id_column=id_column, keep_columns=None, output_schema=pa.schema([]))
    kept = [name for name in source.schema.names if name != id_column]
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
