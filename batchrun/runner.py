"""One job, start to finish: preflight, endpoint lifecycle, dispatch, sink, summary.

    preflight()  spec -> source -> prompt rendering -> output -> token -> endpoint (read-only)
                 Anything wrong here raises before a single billable call.
    run_job()    open the sink (resume state), find the first pending row, acquire the endpoint
                 while the reader prefetches, dispatch, commit, release the endpoint on every
                 exit path, write summary.json.

The pieces it wires together each live in their own module; this one only orders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .cost import BudgetGuard, CostMeter
from .dispatch import DispatchConfig, Dispatcher
from .endpoint import (
    EndpointLifecycle,
    HfControlPlane,
    LifecycleSettings,
    StaticEndpoint,
    control_plane_base,
)
from .errors import (
    AuthError,
    BatchrunError,
    ConfigMismatchError,
    EndpointError,
    InputError,
    RequestFailed,
    SpecError,
    redact,
    register_secret,
)
from .output import OutputStore, ParquetSink, build_data_schema, read_status
from .progress import ProgressReporter, Snapshot, format_summary
from .records import Row, RowFailure, RowResult
from .retry import RetryPolicy
from .sources import Source, open_source
from .spec import JobSpec
from .tasks import Task, make_task

__all__ = ["JobOutcome", "Preflight", "RunOptions", "preflight", "run_job"]

log = logging.getLogger("batchrun.runner")

#: Tasks an endpoint must serve for each job task (Inference Endpoints' `model.task`).
ENDPOINT_TASKS = {
    "text-generation": ("text-generation", "text2text-generation", "image-text-to-text"),
    "chat-completion": ("text-generation", "text2text-generation", "image-text-to-text", "conversational"),
    "text-to-image": ("text-to-image",),
    "image-text-to-text": ("image-text-to-text", "text-generation"),
}
LOCAL_NAMESPACE = "batchrun-local"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """How to run a job, beyond its spec: CLI flags and test seams."""

    fresh: bool = False
    progress: str = "auto"  # auto | bar | lines | off
    summary_interval_s: float = 30.0
    grace_s: float = 30.0
    commit_interval_s: float = 10.0
    poll_interval_s: float | None = None  # endpoint polling; None: the lifecycle default
    handle_signals: bool = True
    echo: Callable[[str], None] = print


@dataclass(slots=True)
class Preflight:
    """Everything checked before anything costs money, and what the checks found."""

    spec: JobSpec
    source: Source
    task: Task
    data_schema: Any  # pyarrow.Schema of the data shards
    keep_columns: tuple[str, ...] | None  # the input columns copied to the output (None: all)
    store: OutputStore
    token: str | None = field(repr=False)
    identity: dict[str, Any]
    fingerprint: str
    count: int | None
    samples: list[tuple[Any, str]] = field(default_factory=list)  # (row id, rendered prompt or error)
    endpoint_note: str | None = None
    stored_job: dict[str, Any] | None = None  # the output's job.json from an earlier run, if any


@dataclass(slots=True)
class JobOutcome:
    """How a job ended: the exit code (reliability.md §6) and the summary written to summary.json."""

    exit_code: int
    summary: dict[str, Any]


# --------------------------------------------------------------------------- preflight


def _resolve_token(spec: JobSpec) -> str | None:
    """The token: huggingface_hub's (HF_TOKEN or the saved login). Never from the command line."""
    from huggingface_hub import get_token

    token = get_token()
    register_secret(token)
    return token


def _check_columns(spec: JobSpec, source: Source) -> None:
    """Every column the spec names exists in the input (the template's were parsed with the spec)."""
    columns = list(source.schema.names)
    available = f"(columns: {', '.join(columns)})"
    missing = [name for name in spec.prompt.columns if name not in columns]
    if missing:
        if spec.prompt.template is not None and set(missing) - {spec.prompt.image_column}:
            names = ", ".join("{" + m + "}" for m in missing if m != spec.prompt.image_column)
            raise SpecError(spec.file, "prompt.template", f"uses {names}, but the input has no such column {available}")
        key = "prompt.column" if missing[0] == spec.prompt.column else "prompt.image_column"
        raise SpecError(spec.file, key, f"{missing[0]!r} is not an input column {available}")
    if spec.prompt.template is not None and spec.prompt.image_column is not None:
        if "{" + spec.prompt.image_column + "}" in spec.prompt.template:
            raise SpecError(spec.file, "prompt.template", f"uses {{{spec.prompt.image_column}}}, the image column: "
                            "the image is sent as an image part beside the text; leave it out of the template")
    seed_column = spec.image.seed_column if spec.image else None
    if seed_column is not None and seed_column not in columns:
        raise SpecError(spec.file, "image.seed_column", f"{seed_column!r} is not an input column {available}")
    missing = [c for c in spec.input.keep_columns or () if c not in columns]
    if missing:
        raise SpecError(spec.file, "input.keep_columns", f"{', '.join(missing)} not in the input {available}")


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _compare_identity(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What changed in the identity, said with old and new values. The served model counts only when
    both runs knew it."""
    changes = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new or (key == "model" and (key not in stored or key not in current)):
            continue
        if key == "input":
            changes.append("input (its files or their content changed)")
        elif isinstance(old, dict) and isinstance(new, dict):
            parts = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            changes.append(f"{key} ({', '.join(parts)})")
        else:
            changes.append(f"{key} ({old!r} -> {new!r})")
    return changes


async def preflight(spec: JobSpec, *, check_endpoint: bool = False, fresh: bool = False) -> Preflight:
    """Validate everything that can be validated without spending money. Raises exit-2 errors."""
    try:
        source = await asyncio.to_thread(open_source, spec.input)
    except InputError as exc:
        raise InputError(f"{spec.file}: {exc}" if spec.file else str(exc)) from None
    _check_columns(spec, source)
    input_fingerprint = await asyncio.to_thread(source.fingerprint)
    store = OutputStore(spec.output.path)
    stored = await asyncio.to_thread(store.load_job) if store.exists() else None
    # The duplicate scan reads every id (8 bytes a row in memory); an input already scanned under the
    # same fingerprint by an earlier run of this job is not scanned again on resume.
    scanned = bool(stored and stored.get("ids_checked") == input_fingerprint)
    duplicates = [] if scanned else await asyncio.to_thread(source.find_duplicate_ids)
    if duplicates:
        shown = ", ".join(repr(d) for d in duplicates[:5])
        raise InputError(
            f"input.id_column {spec.input.id_column!r} has duplicate ids ({shown}); every row needs a unique id "
            "so that it ends in exactly one output record. Fix the input or drop input.id_column to number rows."
        )
    try:
        task = make_task(
            spec.task,
            template=spec.prompt.template,
            column=spec.prompt.column,
            system=spec.prompt.system,
            parameters=dict(spec.parameters),
            image_column=spec.prompt.image_column,
            image=spec.image,
        )
    except ValueError as exc:  # parameters the route cannot take (stream, messages, ...)
        raise SpecError(spec.file, "parameters", str(exc)) from None
    # The output's schema, fixed up front: a clash between input and output columns is a spec problem.
    keep_columns = spec.input.keep_columns
    seed_column = spec.image.seed_column if spec.image is not None else None
    if keep_columns is None and seed_column is not None and seed_column in task.output_schema.names:
        # The output's own `seed` column records the seed used, which is this input column's value (or
        # the derived one where it was null): keeping the input column too would only clash.
        keep_columns = tuple(c for c in source.schema.names if c not in (seed_column, spec.input.id_column))
    data_schema = build_data_schema(
        source.schema,
        id_column=spec.input.id_column,
        keep_columns=keep_columns,
        output_schema=task.output_schema,
    )
    samples: list[tuple[Any, str]] = []
    template_failures: list[str] = []
    for batch in source.batches(batch_size=3):
        for row in batch[:3]:
            try:
                request = task.prepare(row)
                samples.append((row.id, _prompt_of(request.payload)))
            except RequestFailed as exc:
                samples.append((row.id, f"<row will fail without a request: {exc}>"))
                if exc.error_type == "template":
                    template_failures.append(str(exc))
        break
    if samples and len(template_failures) == len(samples):
        # Every row looked at fails to render: a mistake in the template, not in the data. Found now,
        # it costs nothing; found after the resume, it costs a cold start for no request at all.
        raise SpecError(spec.file, "prompt.template", f"cannot render the first rows: {template_failures[0]}")
    token = _resolve_token(spec)
    identity = dict(spec.identity())
    identity["input"] = input_fingerprint
    pre = Preflight(
        spec=spec,
        source=source,
        task=task,
        data_schema=data_schema,
        keep_columns=keep_columns,
        store=store,
        token=token,
        identity=identity,
        fingerprint=_fingerprint(identity),
        count=source.count(),
        samples=samples,
        stored_job=stored,
    )
    if spec.endpoint.name and not token:
        raise AuthError(
            "no Hugging Face token found: set HF_TOKEN or run `hf auth login` (a token that may call and manage "
            f"Inference Endpoints in {spec.endpoint.namespace})"
        )
    if spec.endpoint.local is not None:
        _local_endpoint_config(spec)  # a typo under endpoint.local is a spec error, found now
    if check_endpoint and spec.endpoint.name:
        with control_plane_base(spec.endpoint.api_url):
            lifecycle = _lifecycle_for(spec, _control_for(spec, token), token, options=RunOptions())
            try:
                snapshot = await lifecycle.preflight()
            except EndpointError as exc:
                exc.exit_code = 2  # found before anything was touched: nothing ran
                raise
        pre.endpoint_note = f"{snapshot.namespace}/{snapshot.name}: {snapshot.state}, task {snapshot.task}"
        # The model the endpoint serves is part of the job's identity: an endpoint updated to another
        # model between two runs must not add its answers to the same output.
        pre.identity["model"] = snapshot.repository
        pre.fingerprint = _fingerprint(pre.identity)
    if stored is not None and not fresh:
        changed = _compare_identity(stored.get("identity", {}), pre.identity)
        if changed:
            raise ConfigMismatchError(str(store.root), changed)
    # Last, as it is the only check that writes (a probe file): a job refused above leaves no trace.
    await asyncio.to_thread(store.check_writable)
    return pre


def _prompt_of(payload: dict[str, Any]) -> str:
    """What a request asks, for people: image parts are summarised, never printed as base64."""
    if "inputs" in payload:
        return str(payload["inputs"])

    def content(value: Any) -> str:
        if not isinstance(value, list):
            return str(value)
        parts = []
        for part in value:
            if part.get("type") == "image_url":
                url = str((part.get("image_url") or {}).get("url", ""))
                parts.append(f"<image {url.split(';')[0] if url.startswith('data:') else url}>")
            else:
                parts.append(str(part.get("text", "")))
        return " ".join(parts)

    messages = payload.get("messages") or []
    return " | ".join(f"{m.get('role')}: {content(m.get('content'))}" for m in messages)


# --------------------------------------------------------------------------- endpoint


def _control_for(spec: JobSpec, token: str | None, *, name: str | None = None, namespace: str | None = None) -> HfControlPlane:
    return HfControlPlane(name=name or spec.endpoint.name, namespace=namespace or spec.endpoint.namespace, token=token)


def _lifecycle_for(spec: JobSpec, control: HfControlPlane, token: str | None, *, options: RunOptions) -> EndpointLifecycle:
    e = spec.endpoint
    settings = LifecycleSettings(
        scale_min=e.scale.min_replica if e.scale else None,
        scale_max=e.scale.max_replica if e.scale else None,
        ready_timeout_s=e.ready_timeout,
        on_finish=e.on_finish,
        idle_backstop_s=e.idle_backstop,
        poll_interval_s=options.poll_interval_s if options.poll_interval_s is not None else 1.0,
        supported_tasks=ENDPOINT_TASKS.get(spec.task, ()),
    )
    return EndpointLifecycle(control, settings, token=token, on_event=lambda m: options.echo(f"endpoint: {m}"))


def _local_endpoint_config(spec: JobSpec) -> Any:
    """The emulator endpoint that `endpoint: {local: ...}` describes (SpecError for a bad key)."""
    from .emulator import EndpointConfig

    local = dict(spec.endpoint.local or {})
    local.setdefault("name", "local-" + spec.name.lower().replace("_", "-")[:24])
    local.setdefault("namespace", LOCAL_NAMESPACE)
    # The emulated endpoint serves what the job asks for, unless the spec says otherwise.
    local.setdefault("task", {"text-to-image": "text-to-image", "image-text-to-text": "image-text-to-text"}.get(
        spec.task, "text-generation"))
    try:
        return EndpointConfig.from_dict(local)
    except (ValueError, TypeError) as exc:
        raise SpecError(spec.file, "endpoint.local", str(exc)) from None


@contextlib.asynccontextmanager
async def _endpoint_for(spec: JobSpec, token: str | None, options: RunOptions) -> AsyncIterator[tuple[Any, str | None]]:
    """Yield (lifecycle, data-plane token) for the spec's endpoint; a local one runs an emulator meanwhile."""
    e = spec.endpoint
    if e.url:
        yield StaticEndpoint(e.url), token
        return
    if e.name:
        with control_plane_base(e.api_url):
            yield _lifecycle_for(spec, _control_for(spec, token), token, options=options), token
        return
    # endpoint: {local: {...}}: the built-in emulator plays a Dedicated Inference Endpoint, driven through the
    # same huggingface_hub control-plane code as a real one.
    import secrets

    from .emulator import Emulator, EmulatorConfig

    endpoint_config = _local_endpoint_config(spec)
    local_token = "local-" + secrets.token_hex(16)
    register_secret(local_token)
    async with Emulator(EmulatorConfig(token=local_token, endpoints=[endpoint_config])) as emu:
        options.echo(f"endpoint: started the built-in emulator (control plane {emu.api_url})")
        with control_plane_base(emu.api_url):
            control = _control_for(spec, local_token, name=endpoint_config.name, namespace=endpoint_config.namespace)
            lifecycle = _lifecycle_for(spec, control, local_token, options=options)
            # The emulator ends with this process: no server-side backstop is needed, nor advice about it.
            lifecycle.settings = dataclasses.replace(lifecycle.settings, idle_backstop_s=None)
            yield lifecycle, local_token


# --------------------------------------------------------------------------- reading


class PendingRows:
    """Streams the rows not yet done from the source, on a reader thread, through a bounded queue.

    The source is read in a thread so that Parquet decoding never blocks the event loop. Rows travel
    in batches through a thread-safe queue of ``queue_batches`` slots: that bound is the backpressure
    that keeps memory flat however large the input is. Each row is handed over exactly once: a put
    into ``queue.Queue`` either happens or raises, with no cross-loop cancellation race.
    """

    _END = object()

    def __init__(self, source: Source, done: Any, *, queue_rows: int, batch_size: int = 256) -> None:
        self._source = source
        self._done = done
        self._batch_size = batch_size
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(2, queue_rows // batch_size))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first: asyncio.Future[bool] | None = None
        self.skipped = 0
        self.error: BaseException | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._first = self._loop.create_future()
        self._thread = threading.Thread(target=self._read, name="batchrun-reader", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _signal_first(self, found: bool) -> None:
        assert self._loop is not None and self._first is not None
        first = self._first

        def settle() -> None:
            if not first.done():
                first.set_result(found)

        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(settle)

    def _read(self) -> None:
        pending: list[Row] = []
        signalled = False
        try:
            for batch in self._source.batches(batch_size=self._batch_size):
                if self._stop.is_set():
                    return
                for row in batch:
                    if row.position in self._done:
                        self.skipped += 1
                    else:
                        pending.append(row)
                if pending and not signalled:
                    self._signal_first(True)
                    signalled = True
                # Hand over what each source batch held (rows read before a later read error still run).
                if pending:
                    if not self._put(pending):
                        return
                    pending = []
        except BaseException as exc:  # reported to the job, which stops cleanly
            self.error = exc
        finally:
            self._signal_first(False)
            self._put(self._END)

    async def has_pending(self) -> bool:
        """True once a row that is not done yet has been found; False if every row is done."""
        assert self._first is not None
        return await self._first

    def stop(self) -> None:
        self._stop.set()

    def _get(self) -> Any:
        while not self._stop.is_set():
            try:
                return self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
        return self._END

    async def rows(self) -> AsyncIterator[Row]:
        while not self._stop.is_set():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = await asyncio.to_thread(self._get)
            if item is self._END:
                if self.error is not None:
                    raise InputError(f"reading the input failed: {redact(str(self.error))}") from None
                return
            for row in item:
                if self._stop.is_set():
                    return
                yield row


# --------------------------------------------------------------------------- the run


class _FailureWatch:
    """Stops the job when the failure share over recent rows passes the spec's threshold."""

    def __init__(self, threshold: float | None, window: int = 200) -> None:
        self.threshold = threshold
        self._recent: deque[bool] = deque(maxlen=window)
        self._failures = 0

    def observe(self, failed: bool) -> bool:
        if self.threshold is None:
            return False
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._failures -= 1
        self._recent.append(failed)
        self._failures += failed
        return len(self._recent) >= min(50, self._recent.maxlen or 50) and self._failures / len(self._recent) > self.threshold


async def run_job(spec: JobSpec, options: RunOptions | None = None) -> JobOutcome:
    """Run (or resume) a job. Returns its outcome; raises exit-2 errors before anything is touched."""
    options = options or RunOptions()
    started_wall = time.time()
    started = time.monotonic()
    pre = await preflight(spec, check_endpoint=True, fresh=options.fresh)
    store = pre.store

    stored_job = pre.stored_job
    if stored_job is not None and options.fresh:
        moved = await asyncio.to_thread(store.set_aside)
        options.echo(f"--fresh: the previous output was moved to {moved}")
        await asyncio.to_thread(store.check_writable)
        stored_job = None
    await asyncio.to_thread(
        store.save_job,
        {
            "name": spec.name,
            "identity": pre.identity,
            "fingerprint": pre.fingerprint,
            "spec": spec.raw,
            "spec_file": str(spec.file) if spec.file else None,
            "ids_checked": pre.identity["input"],  # this input's ids were found unique
            "created_at": (stored_job or {}).get("created_at") or dt.datetime.now(dt.timezone.utc).isoformat(),
        },
    )

    id_column = spec.input.id_column or "id"
    keep = pre.keep_columns
    input_columns = [c for c in pre.source.schema.names if c != spec.input.id_column]
    kept_names = [c for c in input_columns if keep is None or c in keep]
    sink = ParquetSink(
        store,
        data_schema=pre.data_schema,
        id_column=id_column,
        shard_rows=spec.output.shard_rows,
        shard_bytes=spec.output.shard_bytes,
        kept_columns=kept_names,
    )
    done = await asyncio.to_thread(sink.open)

    def kept_columns(row: Row) -> dict[str, Any]:
        return {name: row.columns.get(name) for name in kept_names}

    # Rows read ahead of the workers: enough to never starve them, bounded always. Input images can be
    # megabytes each, so a vision job reads less far ahead.
    ahead = max(64, 2 * spec.concurrency.max) if spec.prompt.image_column else max(1024, 4 * spec.concurrency.max)
    reader = PendingRows(pre.source, done, queue_rows=ahead, batch_size=min(256, ahead // 2))
    reader.start()

    state = _RunState(failure_watch=_FailureWatch(spec.failure_threshold))
    lifecycle_record: Any = None
    stop_reason: str | None = None
    error: BaseException | None = None
    endpoint_info: dict[str, Any] = {}
    meter = CostMeter(spec.endpoint.price_per_replica_hour)

    if not await reader.has_pending():
        # A finished job sends nothing and never touches the endpoint.
        reader.stop()
        if reader.error is not None:
            raise InputError(f"reading the input failed: {reader.error}")
        options.echo(f"nothing to do: every row of {spec.name} already has a result or a final failure")
    else:
        try:
            async with _endpoint_for(spec, pre.token, options) as (lifecycle, data_token):
                lifecycle_record = lifecycle.record
                endpoint_info["ref"] = getattr(lifecycle, "ref", None) or spec.endpoint.url
                phase = _DispatchPhase(
                    spec, pre, options, lifecycle, data_token, reader, sink, state, meter, kept_columns, started
                )
                phase.install_signal_handlers()
                try:
                    stop_reason = await phase.run()
                finally:
                    reader.stop()
                    if state.dispatcher is not None:
                        await state.dispatcher.abort()  # nothing may reach the endpoint after the pause
                    try:
                        await state.flush(sink)
                        await asyncio.to_thread(sink.commit)
                    finally:
                        try:
                            await lifecycle.release()
                        finally:
                            meter.stop()
                            phase.remove_signal_handlers()
        except BatchrunError as exc:
            # Anything batchrun raises once the endpoint was acquired ends the job as stopped early: the
            # endpoint was released above, the summary is written below, and the job can be resumed.
            error = exc
            stop_reason = str(exc)
        finally:
            reader.stop()
            try:
                await asyncio.to_thread(sink.close)
            except BatchrunError as exc:
                error = error or exc
                stop_reason = stop_reason or str(exc)

    status = await asyncio.to_thread(read_status, store.root)
    wall = time.monotonic() - started
    stats = state.dispatcher.stats if state.dispatcher is not None else None
    if lifecycle_record is not None:
        endpoint_info.update(
            initial_state=lifecycle_record.initial_state,
            resumed=lifecycle_record.resumed,
            final_action=lifecycle_record.final_action,
            note=lifecycle_record.note,
        )
        if lifecycle_record.acquired_at is not None and lifecycle_record.ready_at is not None:
            endpoint_info["ready_wait_s"] = round(lifecycle_record.ready_at - lifecycle_record.acquired_at, 3)
    cost_info: dict[str, Any] = {}
    if spec.endpoint.url is None and meter.replica_seconds:
        cost_info = {"replica_hours": round(meter.replica_seconds / 3600, 6), "usd": meter.usd}
    total = pre.count
    pending = None
    if total is not None:
        pending = max(0, total - status.ok - status.failed - status.failed_retryable)
    summary: dict[str, Any] = {
        "job": spec.name,
        "outcome": "",
        "started_at": dt.datetime.fromtimestamp(started_wall, dt.timezone.utc).isoformat(),
        "wall_s": round(wall, 3),
        "rows": {
            "ok": state.ok,
            "failed": state.failed,
            "skipped": reader.skipped,
            "pending": pending,
            "total_ok": status.ok,
            "total_failed": status.failed + status.failed_retryable,
            "total_failed_retryable": status.failed_retryable,
        },
        "throughput_rows_per_s": round((state.ok + state.failed) / wall, 2) if wall > 0 else 0.0,
        "output_tokens": state.output_tokens,
        "retries": stats.retries if stats is not None else 0,
        "status_counts": dict(stats.status_counts) if stats is not None else {},
        "latency_s": {
            "p50": stats.latencies.quantile(0.5) if stats is not None else None,
            "p95": stats.latencies.quantile(0.95) if stats is not None else None,
        },
        "endpoint": endpoint_info,
        "cost": cost_info,
        "output": str(store.root),
        "stop_reason": stop_reason,
    }
    if stop_reason is not None:
        exit_code, outcome = 3, "stopped early"
    elif pending:
        exit_code, outcome = 3, "stopped early"
    elif status.failed or status.failed_retryable:
        exit_code, outcome = 1, "finished with failed rows"
    else:
        exit_code, outcome = 0, "finished, every row succeeded"
    summary["outcome"] = outcome
    summary["exit_code"] = exit_code
    await asyncio.to_thread(store.write_summary, summary)
    options.echo(format_summary(summary))
    if isinstance(error, AuthError):
        raise error  # exit 2: nothing more can run until the token is fixed
    return JobOutcome(exit_code=exit_code, summary=summary)


@dataclass(slots=True)
class _RunState:
    """Counters of this run and the records waiting to be handed to the sink."""

    failure_watch: _FailureWatch
    ok: int = 0
    failed: int = 0
    output_tokens: int = 0
    pending: list[RowResult | RowFailure] = field(default_factory=list)
    stop: Callable[[str], None] | None = None
    dispatcher: Dispatcher | None = None
    last_record_at: float | None = None

    def on_record(self, record: RowResult | RowFailure) -> None:
        self.pending.append(record)
        self.last_record_at = time.monotonic()
        if isinstance(record, RowResult):
            self.ok += 1
            self.output_tokens += int(record.output.get("completion_tokens") or 0)
            failed = False
        else:
            self.failed += 1
            failed = True
        if self.failure_watch.observe(failed) and self.stop is not None:
            self.stop(f"more than {self.failure_watch.threshold:.0%} of recent rows failed (failure_threshold)")

    async def flush(self, sink: ParquetSink) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []

        def add_all() -> None:
            for record in batch:
                sink.add(record)

        await asyncio.to_thread(add_all)


class _DispatchPhase:
    """Acquire the endpoint, dispatch every pending row, and stop cleanly when asked to.

    Stops come from signals, the budget guard, the failure watch or an endpoint that fails during
    the run. A stop is graceful: intake ends, requests in flight get ``grace_s`` to finish, then
    whatever is left is abandoned (its rows stay undone and run again next time).
    """

    def __init__(
        self,
        spec: JobSpec,
        pre: Preflight,
        options: RunOptions,
        lifecycle: Any,
        data_token: str | None,
        reader: PendingRows,
        sink: ParquetSink,
        state: _RunState,
        meter: CostMeter,
        kept_columns: Callable[[Row], dict[str, Any]],
        started: float,
    ) -> None:
        self.spec, self.pre, self.options = spec, pre, options
        self.lifecycle, self.data_token = lifecycle, data_token
        self.reader, self.sink, self.state, self.meter = reader, sink, state, meter
        self.kept_columns = kept_columns
        self.started = started
        self.stop_reason: str | None = None
        self.stop_requested = asyncio.Event()
        self.abort_now = asyncio.Event()
        self.signals_seen = 0
        self._first_signal_at = 0.0
        self._installed: list[int] = []
        self._committer_stop = asyncio.Event()
        self.guard = BudgetGuard(
            max_usd=spec.budget.max_usd,
            deadline_s=spec.budget.deadline,
            margin_s=min(options.grace_s, spec.request_timeout) + 2.0,
            started_at=started,
        )

    # ---- stopping

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.options.echo(f"stopping: {reason}; finishing requests in flight (up to {self.options.grace_s:.0f}s)")
            asyncio.get_running_loop().call_later(self.options.grace_s, self.abort_now.set)
        self.stop_requested.set()
        self.reader.stop()
        if self.state.dispatcher is not None:
            self.state.dispatcher.stop_intake()

    def on_signal(self, signame: str) -> None:
        now = time.monotonic()
        if self.signals_seen and now - self._first_signal_at < 1.0:
            # `timeout` and some supervisors signal the process and then its group: one intent, two
            # signals. Only a second signal a moment later means "abandon requests in flight".
            return
        if not self.signals_seen:
            self._first_signal_at = now
        self.signals_seen += 1
        if self.signals_seen > 1:
            self.options.echo(f"{signame} again: abandoning requests in flight now")
            self.abort_now.set()
        self.request_stop(f"interrupted by {signame}")

    # ---- the phase

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM stop the job gracefully; kept until the endpoint is released."""
        if not self.options.handle_signals:
            return
        loop = asyncio.get_running_loop()
        for sig, name in ((signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")):
            try:
                loop.add_signal_handler(sig, self.on_signal, name)
                self._installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self._installed:
            loop.remove_signal_handler(sig)
        self._installed.clear()

    async def run(self) -> str | None:
        self.state.stop = self.request_stop
        monitor = asyncio.ensure_future(self._monitor())
        try:
            base_url = await self._acquire()
            if base_url is None or self.stop_reason is not None:
                return self.stop_reason or "interrupted"
            await self._dispatch(base_url)
            return self.stop_reason
        finally:
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await monitor

    async def _acquire(self) -> str | None:
        """The endpoint's url once ready, or None when a stop came first (the wait is abandoned)."""
        settings = getattr(self.lifecycle, "settings", None)
        self.meter.start(getattr(settings, "scale_min", None) or 1)
        acquire = asyncio.ensure_future(self.lifecycle.acquire())
        stop = asyncio.ensure_future(self.stop_requested.wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await acquire
            return None
        url = acquire.result()
        self.meter.set_replicas(self.lifecycle.replicas_ready())
        return url

    async def _monitor(self) -> None:
        """Budget and deadline every quarter second; the endpoint's state every few seconds."""
        refresh_every = max(0.1, 5 * (self.options.poll_interval_s or 1.0))
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(0.25 if refresh_every > 0.25 else refresh_every / 2)
            reason = self.guard.check(self.meter)
            if reason is not None:
                self.request_stop(reason)
            ready = self.lifecycle.record.ready_at is not None
            if ready and isinstance(self.lifecycle, EndpointLifecycle) and time.monotonic() - last_refresh >= refresh_every:
                last_refresh = time.monotonic()
                try:
                    snapshot = await self.lifecycle.refresh()
                except BatchrunError as exc:  # a control-plane hiccup is not a reason to stop
                    log.warning("endpoint_refresh_failed %s", exc)
                    continue
                self.meter.set_replicas(max(snapshot.ready_replicas, snapshot.target_replicas))
                if snapshot.state in ("failed", "updateFailed"):
                    self.request_stop(f"endpoint {self.lifecycle.ref} became {snapshot.state}: {snapshot.message}")

    def _snapshot(self) -> Snapshot:
        s = self.state.dispatcher.stats if self.state.dispatcher is not None else None
        done = self.state.ok + self.state.failed
        total = self.pre.count
        remaining = None if total is None else max(0, total - self.reader.skipped - done)
        return Snapshot(
            done=done,
            ok=self.state.ok,
            failed=self.state.failed,
            retries=s.retries if s else 0,
            in_flight=s.in_flight if s else 0,
            limit=s.limit if s else 0,
            output_tokens=self.state.output_tokens,
            spent_usd=self.meter.usd,
            projected_usd=self.meter.projected_usd(
                done=done, remaining=remaining, elapsed_s=time.monotonic() - self.started
            ),
        )

    def _dispatcher(self, base_url: str) -> Dispatcher:
        spec, r = self.spec, self.spec.retries
        config = DispatchConfig(
            max_concurrency=spec.concurrency.max,
            initial_concurrency=min(spec.concurrency.initial, spec.concurrency.max),
            request_timeout_s=spec.request_timeout,
            policy=RetryPolicy(
                max_attempts=r.max_attempts,
                backoff_base=r.backoff_base,
                backoff_cap=r.backoff_cap,
                max_retry_after=r.max_retry_after,
            ),
            retry_budget_ratio=r.budget_ratio,
            extra_headers=dict(self.lifecycle.extra_headers),
        )
        return Dispatcher(
            base_url=base_url,
            task=self.pre.task,
            config=config,
            token=self.data_token,
            on_record=self.state.on_record,
            kept_columns=self.kept_columns,
            # 503s while the endpoint starts or a replica restarts are expected: they back off but
            # do not burn the row's attempts (reliability.md §2, cold start).
            no_burn=self.lifecycle.no_burn,
        )

    async def _dispatch(self, base_url: str) -> None:
        dispatcher = self._dispatcher(base_url)
        self.state.dispatcher = dispatcher
        if self.stop_reason is not None:
            dispatcher.stop_intake()
        total = None if self.pre.count is None else max(0, self.pre.count - self.reader.skipped)
        reporter = ProgressReporter(
            self._snapshot, total=total, mode=self.options.progress, interval_s=self.options.summary_interval_s
        )
        reporter.start()
        commit_task = asyncio.ensure_future(self._commit_periodically())
        run_task = asyncio.ensure_future(dispatcher.run(self.reader.rows()))
        abort_task = asyncio.ensure_future(self.abort_now.wait())
        try:
            await asyncio.wait({run_task, abort_task, commit_task}, return_when=asyncio.FIRST_COMPLETED)
            if commit_task.done():
                commit_task.result()  # a failed commit stops the job (and the finally pauses the endpoint)
            if not run_task.done():
                await dispatcher.abort()
                run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await run_task
            else:
                run_task.result()  # re-raises AuthError and friends
        finally:
            for task in (abort_task, run_task):
                task.cancel()
            # Never cancel the committer: a cancelled await leaves its sink call running in a thread,
            # racing the final commit. Ask it to stop and wait for its current step to finish.
            self._committer_stop.set()
            with contextlib.suppress(Exception):
                await commit_task
            reporter.close()

    async def _commit_periodically(self) -> None:
        last_commit = time.monotonic()
        while not self._committer_stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._committer_stop.wait(), 0.25)
            await self.state.flush(self.sink)
            if time.monotonic() - last_commit >= self.options.commit_interval_s:
                await asyncio.to_thread(self.sink.commit)
                last_commit = time.monotonic()
