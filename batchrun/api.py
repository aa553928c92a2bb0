"""batchrun from Python and notebooks: :func:`run`, :func:`arun` and the :class:`Result` they return.

``run`` works whether or not an event loop is already running in the calling thread (Jupyter runs
one): the job runs on a thread of its own with its own loop, and the calling thread only waits. A
KeyboardInterrupt while it waits (Ctrl-C, or the kernel's interrupt button) is what SIGINT is to
``batchrun run``: the job stops taking rows, finishes what is in flight within the grace, commits,
releases the endpoint and writes its summary; a second interrupt abandons what is in flight, and the
endpoint is still released. Then the KeyboardInterrupt is raised again, and rerunning resumes.

In the main thread, ``run`` also takes SIGTERM, SIGHUP (a closed terminal or ssh session) and SIGQUIT
for the job's length, as ``batchrun run`` does: the job stops the same way (SIGQUIT abandons what is in
flight at once) and the endpoint is released. Then the previous handlers are put back and the signal
is delivered again, to them: by default it ends the script, as it would have without batchrun, only
after the endpoint is paused. A signal the process ignores (``nohup`` ignores SIGHUP) stays ignored.

``arun`` is the same for code that is already a coroutine: it runs the job on the caller's loop.
Cancelling it is an interrupt, handled the same way (``asyncio.run`` cancels its main task on
Ctrl-C). Signals stay the caller's: ``arun`` takes only the ones nobody handles (SIGTERM, SIGHUP or
SIGQUIT left to their default action, which would end the process with the endpoint running), and only
when the loop runs in the main thread; it releases the endpoint, then delivers the signal again to its
default action. A program with handlers of its own should cancel the ``arun`` task in them.

The output folder is the one ``batchrun run`` writes, so ``batchrun status``, ``runs`` and
``compare`` read it as they read any other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batchrun.errors import OutputError
from batchrun.facts import GRACE_S, ExitCode
from batchrun.runner import RunOptions, run_job
from batchrun.spec import JobSpec, load_spec, parse_spec
from batchrun.steps import JobStop, run_steps
from batchrun.stop import SignalIntent, Stop, StopReason, catch_signals, forward_signals

if TYPE_CHECKING:
    import datasets
    import pandas

__all__ = ["Result", "arun", "run"]

#: How often the waiting thread wakes (a KeyboardInterrupt is taken at once; this only bounds a wait).
#: It waits on an Event, not on Thread.join: a join interrupted by KeyboardInterrupt may leave is_alive() False
#: while the thread still runs (Python < 3.13), and the job would be left releasing the endpoint unwatched.
_WAIT_S = 0.2


class Result:
    """What a job left in its output folder: the rows that succeeded, those that failed, and its summary.

    The rows are read from the folder's committed shards when first asked for, in input order, so a
    ``Result`` for a job of millions of rows costs nothing until ``.dataset`` is read. Build one for
    any output folder with :meth:`from_output`.
    """

    def __init__(self, output_path: str | os.PathLike[str], summary: dict[str, Any]) -> None:
        self.output_path = Path(output_path).absolute()
        self.summary = summary
        self._dataset: datasets.Dataset | None = None
        self._failed: datasets.Dataset | None = None

    def __repr__(self) -> str:
        rows = self.summary.get("rows") or {}
        ok, failed = rows.get("total_ok", "?"), rows.get("total_failed", "?")
        return f"<Result exit {self.exit_code}: {ok} ok, {failed} failed, in {self.output_path}>"

    @classmethod
    def from_output(cls, path: str | os.PathLike[str]) -> Result:
        """The result of the last run that wrote the output folder ``path`` (its summary.json)."""
        from batchrun.output import OutputStore

        store = OutputStore(os.fspath(path))
        if not store.exists():
            raise OutputError(f"{store.root}: no batchrun output here")
        return cls(store.root, store.load_summary() or {})

    @property
    def exit_code(self) -> int:
        """The command line's exit code for this run: 0 done, 1 done with failed rows, 3 stopped early."""
        return int(self.summary.get("exit_code", ExitCode.STOPPED_EARLY))

    @property
    def steps(self) -> dict[str, Result]:
        """A job of several steps: each step's own result, by name, in order (those that ran); else empty."""
        return {step["name"]: Result.from_output(step["output"]) for step in self.summary.get("steps") or ()}

    @property
    def _rows_folder(self) -> Path:
        """Where the rows are: the output folder, or for a job of several steps the last step's that ran."""
        steps = self.summary.get("steps") or ()
        return Path(steps[-1]["output"]) if steps else self.output_path

    @property
    def dataset(self) -> datasets.Dataset:
        """The rows that succeeded, as a ``datasets.Dataset`` (image columns as ``Image`` features).

        For a job of several steps, those of its last step (``.steps`` holds each step's)."""
        if self._dataset is None:
            self._dataset = _read_rows(self._rows_folder, "data")
        return self._dataset

    @property
    def failed(self) -> datasets.Dataset:
        """The rows that failed (finally, or retryably when the run stopped early), with their errors."""
        if self._failed is None:
            self._failed = _read_rows(self._rows_folder, "failed")
        return self._failed

    def to_pandas(self) -> pandas.DataFrame:
        """The rows that succeeded, as a pandas DataFrame."""
        return self.dataset.to_pandas()


def run(
    spec: str | os.PathLike[str] | dict[str, Any] | JobSpec,
    *,
    input: Any = None,
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fresh: bool = False,
    retry_failed: bool = False,
    echo: Callable[[str], None] = print,
) -> Result:
    """Run (or resume) a job and return its :class:`Result`; works in a script and in a notebook.

    ``spec`` is a path to a YAML spec, the same keys as a dict, or a :class:`~batchrun.JobSpec`.
    ``input`` gives the rows from memory (a ``datasets.Dataset``, a pandas DataFrame, a pyarrow
    Table or a list of dicts); then the spec needs no ``input:`` (it may still set ``id_column``,
    ``limit`` and ``keep_columns`` there). ``output`` replaces ``output.path``. ``fresh`` and
    ``retry_failed`` are ``batchrun run``'s flags. ``echo`` receives the lines the command prints.

    Raises the errors ``batchrun run`` exits 2 for (:class:`~batchrun.SpecError`, ...) before
    anything is sent. A KeyboardInterrupt stops the job safely (see the module's docstring), then is
    raised again; SIGTERM, SIGHUP and SIGQUIT stop it the same way, then are delivered again.
    """
    job = _job_spec(spec, input=input, output=output)
    options = _options(progress=progress, fresh=fresh, retry_failed=retry_failed, echo=echo)
    worker = _JobThread(job, options)
    worker.start()  # nothing is resumed before the handlers below are in place: preflight comes first
    interrupts = 0
    with forward_signals(worker.signal):  # the job's loop is on another thread: it cannot take them itself
        while not worker.finished.is_set():
            try:
                worker.finished.wait(_WAIT_S)
            except KeyboardInterrupt:
                interrupts += 1
                worker.interrupt(again=interrupts > 1)
        outcome = worker.outcome()
    if interrupts:
        raise KeyboardInterrupt
    return Result(outcome.summary.get("output") or job.output.path, outcome.summary)


async def arun(
    spec: str | os.PathLike[str] | dict[str, Any] | JobSpec,
    *,
    input: Any = None,
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
    fresh: bool = False,
    retry_failed: bool = False,
    echo: Callable[[str], None] = print,
) -> Result:
    """:func:`run` for a caller that is already a coroutine: the job runs on the running loop.

    Cancelling the call stops the job as an interrupt does (the endpoint released, the output
    resumable) before the cancellation goes on. SIGTERM, SIGHUP or SIGQUIT that nobody handles stop it
    too, when the loop runs in the main thread (see the module's docstring).
    """
    job = await asyncio.to_thread(_job_spec, spec, input=input, output=output)
    stop = _job_stop(job, grace_s=GRACE_S, echo=echo)
    options = dataclasses.replace(_options(progress=progress, fresh=fresh, retry_failed=retry_failed, echo=echo),
                                  stop=stop)
    task = asyncio.ensure_future(run_steps(job, options) if job.steps else run_job(job, options))
    with catch_signals(stop, echo=echo, borrowed=True):
        try:
            outcome = await asyncio.shield(task)
        except asyncio.CancelledError:
            _interrupt(stop, echo, again=False)
            await asyncio.wait({task})  # the release and the summary run to their end
            raise
    return Result(outcome.summary.get("output") or job.output.path, outcome.summary)


# --------------------------------------------------------------------------- the spec and the options


def _job_spec(spec: Any, *, input: Any, output: Any) -> JobSpec:
    """The :class:`JobSpec` for ``spec``, with the rows from memory and the output folder given."""
    from batchrun.sources import as_arrow_table

    in_memory = input is not None
    if isinstance(spec, JobSpec):
        job = spec
        if in_memory:
            job = dataclasses.replace(job, input=dataclasses.replace(job.input, kind="memory", path=None, dataset=None))
    elif isinstance(spec, dict):
        job = parse_spec(spec, file=None, in_memory=in_memory)
    elif isinstance(spec, (str, os.PathLike)):
        job = load_spec(os.fspath(spec), in_memory=in_memory)
    else:
        raise TypeError(f"spec: expected a path, a dict or a JobSpec, got {type(spec).__name__}")
    if in_memory:
        job = dataclasses.replace(job, input=dataclasses.replace(job.input, memory=as_arrow_table(input)))
    if output is not None:
        job = dataclasses.replace(job, output=dataclasses.replace(job.output, path=os.fspath(output)))
    return job


def _options(*, progress: bool, fresh: bool, retry_failed: bool, echo: Callable[[str], None]) -> RunOptions:
    # Not run_job's own handlers: run's job is on a thread whose loop cannot take signals, and arun's loop is the
    # caller's. An interrupt reaches the job as a KeyboardInterrupt in the waiting thread, or as the cancellation
    # of arun; run and arun take the other signals themselves (the module's docstring).
    return RunOptions(fresh=fresh, retry_failed=retry_failed, progress="notebook" if progress else "off",
                      handle_signals=False, echo=echo)


def _job_stop(job: JobSpec, *, grace_s: float, echo: Callable[[str], None]) -> Stop:
    """The stop an interrupt requests: a job of several steps passes it on to every step running."""
    return JobStop(grace_s=grace_s, echo=echo) if job.steps else Stop(grace_s=grace_s, echo=echo)


def _interrupt(stop: Stop, echo: Callable[[str], None], *, again: bool) -> None:
    """An interrupt, as SIGINT is on the command line: the first stops the job, another abandons what is in flight."""
    if not again and stop.request(StopReason.SIGNAL, "interrupted (KeyboardInterrupt)"):
        echo("interrupted: finishing the requests in flight, then releasing the endpoint; interrupt again to "
             "abandon them")
        return
    echo("interrupted again: abandoning the requests in flight; the endpoint is still released")
    stop.abort()


class _JobThread(threading.Thread):
    """A job on a thread of its own, with its own event loop: the caller's thread may hold a running one."""

    def __init__(self, job: JobSpec, options: RunOptions) -> None:
        super().__init__(name=f"batchrun {job.name}", daemon=True)
        self._job = job
        self._options = options
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._job_stop = _job_stop(job, grace_s=options.grace_s, echo=options.echo)
        self._signals = SignalIntent(self._job_stop, options.echo)
        self._result: Any = None
        self._error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            self._result = asyncio.run(self._run_job())
        except BaseException as exc:  # handed to the waiting thread, which raises it
            self._error = exc
        finally:
            self._ready.set()
            self.finished.set()

    async def _run_job(self) -> Any:
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        options = dataclasses.replace(self._options, stop=self._job_stop)
        return await (run_steps(self._job, options) if self._job.steps else run_job(self._job, options))

    def interrupt(self, *, again: bool) -> None:
        """Stop the job from the waiting thread (the stop is changed on its own loop only)."""
        self._on_loop(functools.partial(_interrupt, self._job_stop, self._options.echo, again=again))

    def signal(self, name: str) -> None:
        """A signal the waiting thread received, for the job's loop to act on as ``batchrun run`` does."""
        self._on_loop(functools.partial(self._signals, name))

    def _on_loop(self, call: Callable[[], None]) -> None:
        self._ready.wait()  # started by then
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop closed meanwhile: the job already ended
            pass

    def outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


# --------------------------------------------------------------------------- reading the output


def _read_rows(root: Path, kind: str) -> datasets.Dataset:
    """The committed rows of ``kind`` (``data`` or ``failed``) that the manifests list, in input order."""
    import datasets
    from datasets.table import InMemoryTable

    from batchrun.sources import committed_rows

    table, _ = committed_rows(root, kind)
    if table is None:
        return datasets.Dataset.from_dict({})
    return datasets.Dataset(InMemoryTable(table))
