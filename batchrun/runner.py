"""One job, start to finish. This module only orders the steps; each lives in its own module:

    preflight      everything checked before anything costs money          preflight.py
    open output    one writer (a lock), job.json, the sink and its done-set  output/
    read           the rows not yet done, on a thread, with backpressure    reader.py
    acquire        resume, scale, wait until ready                          endpoints/
    dispatch       fan-out, adaptive concurrency, retries                   dispatch.py
    commit         records into Parquet shards                              committer.py, output/
    release        pause (or scale to zero, or keep); settings put back     endpoints/
    summarize      summary.json and the lines a person reads                summary.py

One :class:`~batchrun.stop.Stop` carries why the job ends; signals reach it from one place
(:func:`~batchrun.stop.catch_signals`), as do the budget, the failure threshold and the endpoint.

The steps share one frozen :class:`RunContext`, built once after preflight. While rows are sent, the
committer, the progress, the budget guard, the spending ledger and the periodic push run under one
``asyncio.TaskGroup``, ended before the endpoint is released. A committer or budget guard that fails
stops the job (nothing is sent unsaved or unwatched); the others say once what stopped, and it goes
on. The run's extras (its record and provenance, the comparison, the notification, the push) are
:class:`~batchrun.run_record.RunHook` implementations, called by :func:`run_job` at three fixed points:
started, finished, after.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from batchrun import run_record
from batchrun.batches import BatchDispatcher, batch_dispatcher, held_rows, uses_batches
from batchrun.committer import Committer, finish_in_thread
from batchrun.cost import BudgetGuard, CostMeter, Spent
from batchrun.dispatch import DispatchConfig, Dispatcher
from batchrun.endpoints import DataPlane
from batchrun.endpoints.endpoint_shares import endpoint_shares, live_shares
from batchrun.errors import (
    AuthError,
    BatchrunError,
    EmulatorError,
    EndpointError,
    InputError,
    JobStopped,
    OutputError,
    SpecError,
)
from batchrun.facts import GRACE_S, ID_COLUMN, ExitCode
from batchrun.gc_tuning import fewer_collections
from batchrun.packing import Packer, RowsPerRequest, rows_per_request
from batchrun.preflight import Preflight, empty_input_message, preflight, unencodable_note
from batchrun.progress import ProgressReporter, Snapshot
from batchrun.provenance import REVISION_POLL_S, watch_revision
from batchrun.reader import PendingRows
from batchrun.records import SAMPLE_COLUMN, Row
from batchrun.retry import RetryPolicy
from batchrun.scoring import ScoringStage
from batchrun.spec import JobSpec, answer_cap
from batchrun.stop import Stop, StopReason, catch_signals
from batchrun.summary import JobOutcome, build_summary, format_summary
from batchrun.tally import FailureWatch, Tally
from batchrun.transport import Transport, use_transport

__all__ = ["JobOutcome", "RunOptions", "run_job"]

log = logging.getLogger("batchrun.runner")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """How to run a job, beyond its spec: CLI flags and test seams."""

    fresh: bool = False
    retry_failed: bool = False  # final failures of earlier runs are pending again (their records superseded)
    progress: str = "auto"  # auto | bar | lines | off | notebook (tqdm.auto: the Python API)
    summary_interval_s: float = 30.0
    grace_s: float = GRACE_S
    commit_interval_s: float = 10.0
    poll_interval_s: float | None = None  # endpoint polling; None: the lifecycle default
    handle_signals: bool = True
    echo: Callable[[str], None] = print
    revision_poll_s: float = REVISION_POLL_S  # how often the served revision is asked during the run
    compare_with: str | None = None  # a previous run's folder: the notification carries the verdict
    #: What every request of the job goes through (transport.py); None: the real one. Tests pass a MockTransport.
    transport: Transport | None = None
    #: The job's stop, when its caller holds it: the Python API requests it on a KeyboardInterrupt. None: a new one.
    stop: Stop | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RunContext:
    """One run's facts, built once after preflight and handed to each step (and hook) whole.

    The output and the pending rows are not in it: each is a resource opened and closed by its own
    ``async with``, handed to the steps inside it.
    """

    pre: Preflight  # the spec, as this run resolved it, is pre.spec
    options: RunOptions
    tally: Tally
    stop: Stop
    started: _Started
    pusher: run_record.HubPush | None  # output.push_to_hub: the periodic push runs in the background
    hooks: tuple[run_record.RunHook, ...]  # the extras, called at fixed points by run_job

    @property
    def spec(self) -> JobSpec:
        return self.pre.spec

    @property
    def echo(self) -> Callable[[str], None]:
        return self.options.echo


async def run_job(spec: JobSpec, options: RunOptions | None = None) -> JobOutcome:
    """Run (or resume) a job. Returns its outcome; raises exit-2 errors before anything is touched."""
    options = options or RunOptions()
    with use_transport(options.transport):
        return await _run_job(spec, options)


async def _run_job(spec: JobSpec, options: RunOptions) -> JobOutcome:
    started = _Started()
    stop = options.stop if options.stop is not None else Stop(grace_s=options.grace_s, echo=options.echo)
    spec, run_id = run_record.this_run(spec)  # an output.path with {date}, {time} or {run_id}: a folder per run
    pusher = run_record.HubPush.for_spec(spec, options.echo)  # no token or a bad repo: refused before anything runs
    pre = await _preflight(spec, stop, options)
    tally = Tally(stop=stop, watch=FailureWatch(spec.failure_threshold))
    run = RunContext(pre=pre, options=options, tally=tally, stop=stop, started=started, pusher=pusher,
                     hooks=_hooks(pre.spec, run_id, options, pusher))
    for hook in run.hooks:
        await hook.started(run)
    with catch_signals(stop, echo=options.echo, enabled=options.handle_signals):
        summary = await _run_and_summarize(run)
    options.echo(format_summary(summary))
    for hook in run.hooks:
        await hook.after(run, summary)
    return _outcome(run, summary)


async def _preflight(spec: JobSpec, stop: Stop, options: RunOptions) -> Preflight:
    """Everything checked before anything costs money (preflight.py); a replaced value is said."""
    pre = await preflight(spec, check_endpoint=True, fresh=options.fresh, stop=stop, echo=options.echo,
                          poll_interval_s=options.poll_interval_s, retry_failed=options.retry_failed)
    replaced = unencodable_note(pre.unencodable)
    if replaced:
        options.echo(f"note: {replaced}")
    return pre


def _hooks(
    spec: JobSpec, run_id: str, options: RunOptions, pusher: run_record.HubPush | None
) -> tuple[run_record.RunHook, ...]:
    """The run's extras, in the order they are called: the record, the comparison, the notification
    (which carries the comparison's verdict), the push."""
    comparison = run_record.Comparison(options.compare_with)
    hooks: list[run_record.RunHook] = [run_record.RunRecord(run_id, fresh=options.fresh), comparison]
    if spec.notify is not None:
        hooks.append(run_record.Notification(spec.notify, comparison))
    if pusher is not None:
        hooks.append(pusher)
    return tuple(hooks)


async def _run_and_summarize(run: RunContext) -> dict[str, Any]:
    """Open the output, serve the pending rows, close it; the summary built, finished by the hooks, written."""
    async with _open_output(run) as output:
        # Rows in a provider's batch not ended yet are pending for nothing else (batches/).
        held = await asyncio.to_thread(held_rows, output.store, output.done)
        async with _pending_rows(run.pre, held, run.stop) as reader:
            figures = await _serve_pending(run, output, reader, held_batches=len(held) > 0)
            run.tally.skipped = reader.skipped
        await output.close()
        summary = await _summarize(run, output.store, figures)
        for hook in run.hooks:
            await hook.finished(run, output.store, summary)
        await _write_summary(output.store, summary, run.echo)
    return summary


async def _serve_pending(run: RunContext, output: _Output, reader: PendingRows, *,
                         held_batches: bool) -> dict[str, Any]:
    """Serve the pending rows, if any; a finished job sends nothing and never touches the endpoint."""
    spec = run.spec
    if await reader.has_pending() or held_batches:
        return await _serve(run, output, reader, held_batches=held_batches)
    if reader.skipped == 0 and not spec.input.allow_empty:  # a streamed input turned out empty
        raise InputError(empty_input_message(spec))
    run.stop.request(StopReason.DONE, "every row already has its record")
    run.echo(f"nothing to do: every row of {spec.name} already has a result or a final failure")
    return {}


def _outcome(run: RunContext, summary: dict[str, Any]) -> JobOutcome:
    cause = run.stop.cause
    if cause is not None and cause.reason is StopReason.AUTH:
        if run.tally.done == 0:
            raise AuthError(cause.detail)  # exit 2: nothing ran, nor can until the token is fixed
        # rows were saved: stopped early, resumable (no push)
        return JobOutcome(exit_code=ExitCode.STOPPED_EARLY, summary=summary)
    return JobOutcome(exit_code=ExitCode(summary["exit_code"]), summary=summary)


async def _serve(run: RunContext, output: _Output, reader: PendingRows, *, held_batches: bool = False
                 ) -> dict[str, Any]:
    """Acquire the endpoint, dispatch every pending row, commit, release: on every way out.

    Anything batchrun raises once the output is open ends the job as stopped early (resumable): the
    reason goes to the stop, the endpoint is released, and the summary is written.
    """
    pre, stop = run.pre, run.stop
    committer = Committer(output.sink, interval_s=run.options.commit_interval_s)
    dispatcher: Dispatcher | None = None
    batches: BatchDispatcher | None = None
    scores = _scoring_stage(pre, committer, run.tally)
    try:
        if scores is not None:  # the scorers load before the endpoint is touched
            await _start_scoring(scores, pre)
        async with pre.pool as plane:  # every endpoint resumed at once; here once the first is ready
            # TEI's batch routes: rows per request, within every endpoint's /info (the check's answers reused)
            packing = await rows_per_request(pre.task, pre.spec, pre.pool.ready_planes(), pre.infos)
            await _hold_dimension(pre.task, output.store)
            dispatcher = _dispatcher(run, plane, committer, scores, packing)
            pre.pool.attach(dispatcher)  # the others join as they become ready
            if uses_batches(pre.spec) or held_batches:  # mode: batch, or batches an earlier run left
                batches = _batches(run, plane, output, committer)
            try:
                async with watch_revision(pre.run, plane, interval_s=run.options.revision_poll_s, echo=run.echo):
                    await _dispatch(run, reader, committer, dispatcher, scores, batches)
            finally:
                if scores is not None:
                    await _finish_scoring(scores, stop)
                await committer.commit()  # before the release: what finished is kept even if it fails
    except JobStopped:
        pass  # the stop came while the endpoint was starting; its reason is already the stop's
    except EmulatorError:
        raise  # the built-in emulator could not start (a busy port): nothing ran, exit 2
    except AuthError as exc:
        stop.request(StopReason.AUTH, str(exc))
    except EndpointError as exc:
        stop.request(StopReason.ENDPOINT, str(exc))
    except BatchrunError as exc:
        stop.request(StopReason.ERROR, str(exc))
    finally:
        if scores is not None:  # the endpoint never came: the scoring process ends all the same
            await scores.close()
    figures = _dispatch_figures(dispatcher)
    if batches is not None:
        figures["batches"] = {**batches.figures, "states": batches.states()}
    return figures


def _dispatch_config(spec: JobSpec, packing: RowsPerRequest | None) -> DispatchConfig:
    """The dispatcher's settings, from the spec's concurrency, retries and timeouts."""
    initial = min(spec.concurrency.initial, spec.concurrency.max)
    fits = packing.requests_in_flight() if packing is not None else None
    if fits is not None:  # TEI counts inputs in flight: start within its budget, the limit finds the rest
        initial = min(initial, fits)
    return DispatchConfig(
        max_concurrency=spec.concurrency.max,
        initial_concurrency=initial,
        request_timeout_s=spec.request_timeout,
        policy=RetryPolicy.from_spec(spec.retries),
        retry_budget_ratio=spec.retries.budget_ratio,
        outage_timeout_s=spec.outage_timeout,
        invalid_output_retries=spec.retries.invalid_output,
        max_answer_bytes=answer_cap(spec),
    )


def _dispatcher(run: RunContext, plane: DataPlane, committer: Committer,
                scores: ScoringStage | None = None, packing: RowsPerRequest | None = None) -> Dispatcher:
    pre, tally = run.pre, run.tally

    def on_record(record: Any) -> None:
        if scores is not None:  # a ScoredTask: scored off the event loop, then counted and committed
            scores.put(record)
            return
        tally.count(record)
        committer.add(record)

    return Dispatcher(plane=plane, task=pre.task, config=_dispatch_config(pre.spec, packing), on_record=on_record,
                      kept_columns=_kept_columns(pre), excuses=pre.pool.excuses, name=pre.pool.route_name(),
                      rows_per_request=packing)


def _kept_columns(pre: Preflight) -> Callable[[Row], dict[str, Any]]:
    kept = pre.kept_columns
    sampled = pre.spec.samples > 1

    def kept_columns(row: Row) -> dict[str, Any]:
        values = {name: row.columns.get(name) for name in kept}
        if sampled:  # a failure row says which sample failed
            values[SAMPLE_COLUMN] = row.sample
        return values

    return kept_columns


def _batches(run: RunContext, plane: DataPlane, output: _Output, committer: Committer) -> BatchDispatcher:
    """The batch path (batches/): its records are counted and committed as the dispatcher's are."""
    pre, tally = run.pre, run.tally
    if getattr(pre.task, "scoring", None) is not None:
        raise SpecError(pre.spec.file, "endpoint.mode", "mode: batch does not score answers yet; score the "
                        "output afterwards, or run online")

    def on_record(record: Any) -> None:
        tally.count(record)
        committer.add(record)

    return batch_dispatcher(pre, plane, store=output.store, done=output.done, on_record=on_record,
                            commit=committer.commit, kept_columns=_kept_columns(pre),
                            started_at=run.started.monotonic, echo=run.echo, online_now=not uses_batches(pre.spec))


def _scoring_stage(pre: Preflight, committer: Committer, tally: Tally) -> ScoringStage | None:
    """Where a job with scorers has each result scored (a child process, time-bounded) before it is
    counted and committed, so that the answer and its scores land in one shard."""
    scoring = getattr(pre.task, "scoring", None)
    if scoring is None:
        return None

    def sink(record: Any) -> None:
        tally.count(record)
        committer.add(record)

    return ScoringStage(scoring, sink)


async def _start_scoring(scores: ScoringStage, pre: Preflight) -> None:
    try:
        await scores.start()
    except ValueError as exc:  # a scorer's module that fails when imported
        raise SpecError(pre.spec.file, "score", str(exc)) from None


async def _finish_scoring(scores: ScoringStage, stop: Stop) -> None:
    """Score what is queued, within the stop's grace; what is left then is committed unscored."""
    try:
        async with stop.until_aborted():
            await scores.drain()
    finally:
        await scores.close()


async def _dispatch(
    run: RunContext, reader: PendingRows, committer: Committer, dispatcher: Dispatcher,
    scores: ScoringStage | None = None, batches: BatchDispatcher | None = None,
) -> None:
    """Send every pending row; meanwhile commit, show progress and watch the budget (in the background)."""
    pre, stop = run.pre, run.stop
    meter = pre.pool.meter
    reporter = _reporter(run, reader, dispatcher, batches)
    guard = BudgetGuard(max_usd=pre.spec.budget.max_usd, deadline_s=pre.spec.budget.deadline,
                        margin_s=min(run.options.grace_s, pre.spec.request_timeout) + 2.0,
                        started_at=run.started.monotonic, spent_before=pre.spent.usd,
                        in_flight=lambda: dispatcher.stats.in_flight)
    limits = guard.describe(meter)
    if limits:
        run.echo(f"limits: {limits}")
    reporter.start()
    try:
        background = {
            "committer": _stop_on_error(committer.run(), stop),  # a failed commit stops the job
            # It guards money: a guard that fails stops the sending it no longer watches.
            "budget": _stop_on_error(guard.watch(meter, stop), stop, what="the budget and deadline guard"),
            "progress": _warn_on_error(reporter.run(), "the progress display"),
            "spend": _warn_on_error(_keep_spending_ledger(pre, meter), "the spending ledger (spend.json is still "
                                    "written at the end of the run)"),
        }
        if run.pusher is not None and run.pusher.every_s is not None:
            background["push"] = _warn_on_error(run.pusher.run_every(), "the periodic push to the Hub (the push at "
                                                "the end of the run still happens)")
        async with _in_background(background):
            with fewer_collections():  # a row's objects live until their commit: see gc_tuning.py
                await _send(run, reader, dispatcher, scores, batches)
    finally:
        reporter.close()


async def _send(run: RunContext, reader: PendingRows, dispatcher: Dispatcher, scores: ScoringStage | None,
                batches: BatchDispatcher | None) -> None:
    """Every pending row through the dispatcher (or the batch API); the stop then says the job is done."""
    stop = run.stop
    rows: AsyncIterator[Row] = reader.rows() if scores is None else scores.rows(reader.rows())
    if batches is not None:  # the batch API; online only for what the deadline's fallback sends there
        await batches.run(rows, stop, online=lambda more: dispatcher.run(more, stop))
    else:
        if dispatcher.rows_per_request is not None:  # several rows per request (packing.py)
            rows = Packer(rows, dispatcher.rows_per_request, text_of=_text_of(run.pre.task))
        await dispatcher.run(rows, stop)
    stop.request(StopReason.DONE, "every pending row has its record")


def _reporter(run: RunContext, reader: PendingRows, dispatcher: Dispatcher,
              batches: BatchDispatcher | None) -> ProgressReporter:
    """The progress bar (or the periodic line), fed by a snapshot of the tally, the dispatcher and the meter."""
    pre, tally = run.pre, run.tally
    pool = pre.pool
    meter = pool.meter
    total = None if pre.count is None else max(0, pre.count - reader.skipped)

    def snapshot() -> Snapshot:
        stats = dispatcher.stats
        remaining = None if total is None else max(0, total - tally.done)
        return Snapshot(
            done=tally.done, ok=tally.ok, failed=tally.failed, retries=stats.retries, in_flight=stats.in_flight,
            limit=stats.limit, output_tokens=tally.output_tokens, spent_usd=meter.usd,
            projected_usd=meter.projected_usd(done=tally.done, remaining=remaining,
                                              elapsed_s=run.started.elapsed()),
            waiting_for=(batches.waiting_for() if batches is not None else None) or dispatcher.waiting_for(),
            endpoints=live_shares(pool, dispatcher.routes) if pool.several else (),
        )

    return ProgressReporter(snapshot, total=total, mode=run.options.progress,
                            interval_s=run.options.summary_interval_s)


@contextlib.asynccontextmanager
async def _in_background(work: dict[str, Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run ``work`` (by name) as tasks of one TaskGroup while the body runs; when the body ends, however
    it ends, every task is cancelled and awaited before anything goes on (the release of the endpoint:
    nothing is sent after the pause). The body's own exception comes out as it was, not in a group."""
    failure: BaseException | None = None
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(coro, name=name) for name, coro in work.items()]
        try:
            yield
        except BaseException as exc:  # raised again below, once the background has ended
            failure = exc
        finally:
            for task in tasks:
                task.cancel()
    if failure is not None:
        raise failure


def _token_sum(pre: Preflight, which: str) -> int:
    """The tokens this run's answers counted, over every endpoint billed per token."""
    return sum(getattr(m.endpoint.meter, which) for m in pre.pool.members)


def _text_of(task: Any) -> Callable[[Row], str | None]:
    """A packing task's text for a row (for the token bound), None for a row that has none."""

    def text_of(row: Row) -> str | None:
        try:
            return str(task.text_of(row))
        except BatchrunError:
            return None

    return text_of


#: How often a billing run writes its spending to the ledger.
LEDGER_EVERY_S = 5.0


def _spent_so_far(pre: Preflight, meter: CostMeter) -> Spent:
    before = pre.spent
    saved = sum(m.endpoint.meter.saved_usd for m in pre.pool.members)  # batch or flex mode, below the online price
    return Spent(usd=before.usd + (meter.usd or 0.0), replica_hours=before.replica_hours + meter.replica_seconds / 3600,
                 runs=before.runs + 1, saved_usd=before.saved_usd + saved)


async def _keep_spending_ledger(pre: Preflight, meter: CostMeter) -> None:
    """While the run bills, its spending joins the job's ledger every few seconds (a budget is per job).

    A ledger that cannot be written now (a full disk) is written again at the next turn and at the end.
    """
    from batchrun.output import OutputStore

    store = OutputStore.for_spec(pre.spec)
    while True:
        await asyncio.sleep(LEDGER_EVERY_S)
        if meter.billed:
            with contextlib.suppress(OutputError):
                await asyncio.to_thread(store.save_spend, _spent_so_far(pre, meter).record())


async def _warn_on_error(work: Coroutine[Any, Any, None], what: str) -> None:
    """A background step that only informs (the progress, the ledger, the periodic push): its failure ends
    only itself, and is said once, as a warning naming ``what`` stopped; the job goes on."""
    try:
        await work
    except Exception as exc:
        log.warning("background_step_failed: %s stopped working (%s: %s); the job goes on", what,
                    type(exc).__name__, exc)


async def _stop_on_error(work: Any, stop: Stop, *, what: str | None = None) -> None:
    """A background step that fails (a commit on a full disk, the budget guard) stops the job instead of vanishing."""
    try:
        await work
    except Exception as exc:  # a bug must not end the step silently while requests go on being paid for
        detail = str(exc) if isinstance(exc, BatchrunError) else f"{type(exc).__name__}: {exc}"
        stop.request(StopReason.ERROR, detail if what is None else f"{what} failed, so sending stops: {detail}")


def _dispatch_figures(dispatcher: Dispatcher | None) -> dict[str, Any]:
    if dispatcher is None:
        return {}
    figures = {**dispatcher.stats.figures(), "routes": dispatcher.route_figures()}
    dimension = getattr(dispatcher.task, "dimension", None)
    if isinstance(dimension, int):  # an embedding job: the length of every vector, for the next run and the push
        figures["embedding_dimension"] = dimension
    return figures


async def _hold_dimension(task: Any, store: Any) -> None:
    """An embedding job resumed: its vectors keep the length the earlier runs' had (summary.json says it)."""
    hold = getattr(task, "hold_dimension", None)
    if hold is None:
        return
    summary = await asyncio.to_thread(store.load_summary)
    dimension = (summary or {}).get("embedding_dimension")
    if isinstance(dimension, int):
        hold(dimension)


# --------------------------------------------------------------------------- the output


@dataclass(slots=True)
class _Output:
    store: Any  # OutputStore
    sink: Any  # ParquetSink
    done: Any  # DoneSet
    stop: Stop
    closed: bool = False

    async def close(self) -> None:
        """Commit what the sink still holds and close it; a failure (a full disk) stops the job."""
        if self.closed:
            return
        self.closed = True
        try:
            await finish_in_thread(self.sink.close)
        except BatchrunError as exc:
            self.stop.request(StopReason.ERROR, str(exc))
        except Exception as exc:  # the summary is written all the same, and says why
            self.stop.request(StopReason.ERROR, f"committing the output failed: {type(exc).__name__}: {exc}")


@contextlib.asynccontextmanager
async def _open_output(run: RunContext) -> AsyncIterator[_Output]:
    """The output, opened for this run: locked (one writer), set aside with --fresh, job.json saved,
    the sink open; closed and unlocked on the way out."""
    from batchrun.output import OutputStore, new_sink

    pre, echo, fresh = run.pre, run.echo, run.options.fresh
    spec = pre.spec
    store = OutputStore.for_spec(spec)
    lock = await _lock_output(store, echo)
    try:
        stored_job = pre.stored_job
        if stored_job is not None and fresh:
            moved = await asyncio.to_thread(store.set_aside)  # the lock file moves with it
            echo(f"--fresh: the previous output was moved to {moved}")
            lock.release()
            lock = await _lock_output(store, echo)
            stored_job = None
        await asyncio.to_thread(store.save_job, _job_record(pre, stored_job))
        # A failure row says which sample failed: the sample column goes with the kept input columns.
        failed_kept = (*pre.kept_columns, SAMPLE_COLUMN) if spec.samples > 1 else pre.kept_columns
        data_schema = await asyncio.to_thread(pre.data_schema, store)
        sink = new_sink(store, data_schema=data_schema, id_column=spec.input.id_column or ID_COLUMN,
                        shard_rows=spec.output.shard_rows, shard_bytes=spec.output.shard_bytes,
                        kept_columns=failed_kept)
        done = await asyncio.to_thread(sink.open, retry_failed=run.options.retry_failed)
        output = _Output(store=store, sink=sink, done=done, stop=run.stop)
        try:
            yield output
        finally:
            await output.close()
    finally:
        lock.release()


async def _lock_output(store: Any, echo: Callable[[str], None]) -> Any:
    """One writer per output: a second run is refused at once, naming the holder (OutputLockedError)."""
    from batchrun.output import writer_lock

    lock = writer_lock(store)
    stale = await asyncio.to_thread(lock.acquire)
    if stale is not None:
        echo(f"taking over the output's lock from {stale.describe()}, which is no longer running")
    return lock


def _job_record(pre: Preflight, stored_job: dict[str, Any] | None) -> dict[str, Any]:
    """state/job.json: the spec snapshot and the identity a resume is checked against."""
    spec = pre.spec
    return {
        "name": spec.name,
        "identity": pre.identity,
        "fingerprint": pre.fingerprint,
        "spec": spec.raw,
        "spec_file": str(spec.file) if spec.file else None,
        "ids_checked": pre.identity["input"],  # this input's ids were found unique
        "kept_columns": list(pre.kept_columns),  # a resume keeping others is refused (preflight)
        "created_at": (stored_job or {}).get("created_at") or dt.datetime.now(dt.UTC).isoformat(),
        "runs": int((stored_job or {}).get("runs", 0)) + 1,
        **run_record.job_fields(pre, stored_job),
    }


@contextlib.asynccontextmanager
async def _pending_rows(pre: Preflight, done: Any, stop: Stop) -> AsyncIterator[PendingRows]:
    # Rows read ahead of the workers: enough to never starve them, bounded always. Input images can be
    # megabytes each, so a vision job reads less far ahead.
    spec = pre.spec
    ahead = max(64, 2 * spec.concurrency.max) if spec.prompt.image_column else max(1024, 4 * spec.concurrency.max)
    batch_size = min(256, ahead // 2)
    async with PendingRows(pre.source, done, stop, ahead_batches=max(2, ahead // batch_size),
                           batch_size=batch_size) as reader:
        yield reader


# --------------------------------------------------------------------------- the summary


class _Started:
    """When the run started, on the wall clock (for people) and the monotonic one (for durations)."""

    __slots__ = ("monotonic", "wall")

    def __init__(self) -> None:
        self.wall = time.time()
        self.monotonic = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.monotonic


async def _summarize(run: RunContext, store: Any, dispatch: dict[str, Any]) -> dict[str, Any]:
    from batchrun.output import read_status

    pre, tally, started = run.pre, run.tally, run.started

    status = await asyncio.to_thread(read_status, store)  # a shard: its own part
    pending = None
    if pre.count is not None:
        pending = max(0, pre.count - status.ok - status.failed - status.failed_retryable)
    endpoint = pre.pool
    meter = endpoint.meter
    cost: dict[str, Any] = {}
    if meter.billed:  # replica time (a Dedicated or local endpoint), or tokens (a serverless target)
        job = _spent_so_far(pre, meter)
        await asyncio.to_thread(store.save_spend, job.record())
        cost = {"replica_hours": round(meter.replica_seconds / 3600, 6), "usd": meter.usd,
                "job_usd": job.usd if meter.usd is not None else None, "job_replica_hours": round(job.replica_hours, 6)}
        if meter.per_token:
            cost.update(token_usd=round(meter.token_usd, 8), prompt_tokens=_token_sum(pre, "prompt_tokens"),
                        completion_tokens=_token_sum(pre, "completion_tokens"))
            if images := _token_sum(pre, "images"):  # a provider's text-to-image, billed per image
                cost["images"] = images
            saved = sum(m.endpoint.meter.saved_usd for m in pre.pool.members)
            if saved:  # batch (or flex) answers, below the online price
                cost["saved_usd"] = round(saved, 8)
    rows = {
        "ok": tally.ok,
        "failed": tally.failed,
        "skipped": tally.skipped,
        "pending": pending,
        "total_ok": status.ok,
        "total_failed": status.failed + status.failed_retryable,
        "total_failed_retryable": status.failed_retryable,
    }
    dispatch = {"output_tokens": tally.output_tokens, "retries": 0, "status_counts": {},
                "latency_s": {"p50": None, "p95": None}, **dispatch}
    routes = dispatch.pop("routes", {})
    endpoint_info = {"ref": endpoint.ref, **endpoint.record.summary()} if endpoint.record.acquired_at else {}
    if endpoint.several:  # each endpoint's share: rows, 429s, latency, cost, and what became of it
        endpoint_info["endpoints"] = endpoint_shares(endpoint, routes)
    check = pre.endpoint_check
    if check is not None and check.model:
        endpoint_info.update(model=check.model, revision=check.revision)
    if check is not None and check.details:
        endpoint_info["details"] = dict(check.details)  # hardware and container image, where known
    return build_summary(job=pre.spec.name, started_wall=started.wall, wall_s=started.elapsed(), rows=rows,
                         dispatch=dispatch, endpoint=endpoint_info, cost=cost,
                         output=str(getattr(store, "url", store.root)), cause=run.stop.cause, samples=pre.spec.samples)


async def _write_summary(store: Any, summary: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Write summary.json; when that fails (a full disk), say so: the summary is printed all the same."""
    try:
        await asyncio.to_thread(store.write_summary, summary)
    except OutputError as exc:
        echo(f"error: {exc}")
        if summary["exit_code"] != ExitCode.STOPPED_EARLY:
            summary["exit_code"], summary["outcome"] = int(ExitCode.STOPPED_EARLY), "stopped early"
        summary["stop_reason"] = summary.get("stop_reason") or str(exc)
