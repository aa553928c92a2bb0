"""A Dedicated Inference Endpoint: resume, scale, wait until ready, watch, release.

Entering a :class:`DedicatedEndpoint` applies the job's scaling and a server-side idle backstop,
resumes the endpoint when it is paused or scaled to zero, and polls until it is running, healthy and
every target replica is ready (huggingface_hub's own ``wait()`` is never used: it ignores the replica
count and, without a timeout, waits forever). While the job runs, a watcher follows the replica count
(for the cost meter and the cold-start policy) and stops the job if the endpoint fails. Leaving applies
``on_finish`` (pause by default) and restores the user's settings, on every way out, even when the
task awaiting it is cancelled. The sequence and its guarantees are in docs/lifecycle.md.

The ready wait is ready.py's; what the user's settings were and what goes back, settings_ledger.py's.
The shards of a job share the endpoint through shared_endpoint.py, and `batchrun endpoint up|down` holds it up
between them (:meth:`DedicatedEndpoint.up`, :meth:`DedicatedEndpoint.down`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from batchrun.cost import CostMeter
from batchrun.endpoints.base import Bracketed, BracketResult, DataPlane, EndpointCheck, LifecycleRecord
from batchrun.endpoints.cold_start import ColdStartPolicy
from batchrun.endpoints.control_plane import ControlPlane, EndpointSnapshot
from batchrun.endpoints.ready import FAILED, ReadyWait
from batchrun.endpoints.settings_ledger import RESUMABLE, LifecycleSettings, SettingsLedger
from batchrun.endpoints.shared_endpoint import BRACKET, SharedUse
from batchrun.errors import (
    AuthError,
    ControlPlaneUnavailableError,
    EndpointError,
    EndpointUnusableError,
    JobStopped,
    RequestFailed,
)
from batchrun.stop import Stop, StopReason

__all__ = ["DedicatedEndpoint", "LifecycleSettings"]

log = logging.getLogger("batchrun.endpoint")

#: States in which an endpoint bills nothing (protocols.md §3).
AT_REST = {"paused", "scaledToZero", "failed"}
#: How often the release tries the final pause (or scale-to-zero) before giving up and saying so.
RELEASE_ATTEMPTS = 4
#: The final action of a user (a shard, the bracket) that leaves the endpoint up to the others still using it.
LEFT_TO_OTHERS = "left to the other users"

_T = TypeVar("_T")


class DedicatedEndpoint:
    """A Dedicated Inference Endpoint driven through its control plane. See the module docstring."""

    def __init__(
        self,
        control: ControlPlane,
        settings: LifecycleSettings,
        *,
        token: str | None,
        stop: Stop | None = None,
        on_event: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        price_per_replica_hour: float | None = None,
        send_token: bool = False,
    ) -> None:
        self.control = control
        self.settings = settings
        self.record = LifecycleRecord()
        self.meter = CostMeter(price_per_replica_hour, clock=clock)
        self._token = token
        self._send_token = send_token
        self._stop = stop or Stop()
        self._on_event = on_event or (lambda message: None)
        self._clock = clock
        self._cold = ColdStartPolicy(settings.ready_timeout_s, clock=clock, on_event=self._event)
        self._ledger = SettingsLedger(control, settings, on_event=self._event)  # the user's settings and ours
        self._extra_headers: dict[str, str] = {}
        self._last: EndpointSnapshot | None = None
        self._released = False
        self._release_task: asyncio.Task[bool] | None = None  # its result: left to other users
        self._refreshing: asyncio.Task[Any] | None = None
        self._last_refresh = float("-inf")
        self._unconfirmed_503_at: float | None = None  # a 503 no later look at the endpoint has explained
        self._serving: contextlib.AbstractAsyncContextManager[DataPlane] | None = None

    def __repr__(self) -> str:
        return f"DedicatedEndpoint({self.ref!r})"

    @property
    def ref(self) -> str:
        return f"{self.control.namespace}/{self.control.name}"

    def state_path(self) -> str:
        """The file that keeps the user's settings while the job has changed them."""
        return self._ledger.state_path()

    def _event(self, message: str) -> None:
        self.record.timeline.append((time.time(), message))
        log.info("endpoint_event %s", message)
        self._on_event(message)

    # ------------------------------------------------------------------ the interface

    async def check(self) -> EndpointCheck:
        """Read-only checks before anything bills: the endpoint exists, has a usable task, is not failed."""
        snapshot = await self.control.get()
        if snapshot.state in FAILED:
            raise EndpointUnusableError(
                f"endpoint {self.ref} is {snapshot.state}: {snapshot.message or 'no message'}. "
                "A failed endpoint cannot be resumed; fix or recreate it in the Inference Endpoints UI.",
                state=snapshot.state,
            )
        if self.settings.supported_tasks and snapshot.task not in self.settings.supported_tasks:
            raise EndpointUnusableError(
                f"endpoint {self.ref} serves task {snapshot.task!r}, which this job cannot use "
                f"(expected one of {', '.join(self.settings.supported_tasks)})"
            )
        self._ledger.original = snapshot
        details = {"instance": snapshot.instance, "image": snapshot.image, "task": snapshot.task}
        return EndpointCheck(
            note=f"{self.ref}: {snapshot.state}, task {snapshot.task}",
            model=snapshot.repository or None,
            revision=snapshot.revision,
            details={k: v for k, v in details.items() if v},
        )

    async def __aenter__(self) -> DataPlane:
        self._serving = self._serve()
        return await self._serving.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._serving is not None
        await self._serving.__aexit__(exc_type, exc, tb)

    def excuses(self, failure: RequestFailed) -> bool:
        """A 503 while the endpoint is cold does not burn the row's attempts (see cold_start.py).

        A 503 also asks for a refresh of the endpoint's state (at most once per poll interval, in the
        background); until that answer arrives the 503 gets the benefit of the doubt, so a replica
        restart is seen within one control-plane round trip instead of at the next periodic refresh.
        """
        if failure.status != 503 or self._released:
            return False
        now = self._clock()
        if self._unconfirmed_503_at is None:
            self._unconfirmed_503_at = now
        if self._refreshing is None and now - self._last_refresh >= self.settings.poll_interval_s:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule
                self._refreshing = asyncio.get_running_loop().create_task(self._background_refresh())
        # The doubt lasts until a look at the endpoint that began after this 503 says it is warm: a look
        # begun just before a replica was lost would otherwise end it too early.
        return self._cold.excuses(failure, doubt=self._unconfirmed_503_at is not None)

    @property
    def cold(self) -> bool:
        """True until the endpoint is ready, and whenever the last look saw it not running or short of replicas."""
        return self._cold.cold

    @contextlib.asynccontextmanager
    async def _serve(self) -> AsyncIterator[DataPlane]:
        try:
            async with self._stop.until_requested() as wait:
                url = await self.acquire()
            if wait.cancelled:
                cause = self._stop.cause
                raise JobStopped(cause.detail if cause else "stopped while the endpoint was starting")
            watcher = asyncio.create_task(self._watch(), name="endpoint-watch")
            try:
                yield DataPlane(url=url, headers=dict(self._extra_headers), token=self._token,
                                send_token=self._send_token)
            finally:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        finally:
            await self.release()

    # ------------------------------------------------------------------ acquire

    async def acquire(self) -> str:
        """Make the endpoint ready and return its data-plane url."""
        shared = self.settings.shared
        if shared is None:
            original = await self._start(self._ledger.original or await self._checked_snapshot())
        else:  # one user at a time joins: the endpoint as it is now, the first user's saved settings
            async with shared.guard():
                await asyncio.to_thread(shared.join, beat=shared.user != BRACKET)
                self._ledger.original = None  # another shard may have resumed or scaled it since the check
                original = await self._start(await self._checked_snapshot())
        url = await self._wait_ready(original)
        self.meter.set_replicas(self.record.replicas)
        return url

    async def _start(self, current: EndpointSnapshot) -> EndpointSnapshot:
        """Save the user's settings, apply the job's, ask for the resume; returns the user's endpoint."""
        self.record.initial_state = current.state
        self.record.acquired_at = self._clock()
        self.meter.start(self.settings.scale_min or 1)
        self._event(f"{self.ref} is {current.state}")
        start = self._ledger.start(current)
        original = start.original
        if start.backstop_min is not None:
            self.record.backstop_set = True
        # What another user (a shard) has already set is not sent again; it is still put back at the end.
        changes = {key: value for key, value in start.values.items() if getattr(current, key) != value}
        if changes:
            await self.control.update(**changes)
            self.record.scaled = "min_replica" in changes or "max_replica" in changes
            self._event(f"updated {', '.join(f'{k}={v}' for k, v in changes.items())}")
        if original.state == "scaledToZero" or changes.get("min_replica", original.min_replica) == 0:
            # The proxy holds a request to a scaled-to-zero endpoint until a replica is up instead of
            # answering 503 (protocols.md §3).
            self._extra_headers["X-Scale-Up-Timeout"] = str(max(1, int(self.settings.ready_timeout_s)))
        if original.state in RESUMABLE:
            await self.control.resume()
            self.record.resumed = True
            self._event(f"resume requested for {self.ref}")
        return original

    async def _checked_snapshot(self) -> EndpointSnapshot:
        await self.check()
        assert self._ledger.original is not None
        return self._ledger.original

    async def _wait_ready(self, original: EndpointSnapshot) -> str:
        wait = ReadyWait(self.ref, target=self._ledger.min_target(original), timeout_s=self.settings.ready_timeout_s,
                         poll_interval_s=self.settings.poll_interval_s, token=self._token,
                         send_token=self._send_token, poll=self._poll, on_event=self._event, clock=self._clock)
        return self._ready(await wait())

    async def _poll(self) -> EndpointSnapshot | None:
        try:
            self._last = await self.control.get()
        except ControlPlaneUnavailableError as exc:  # a hiccup is not a reason to give up the wait
            log.warning("endpoint_poll_failed %s", exc)
        return self._last

    def _ready(self, snapshot: EndpointSnapshot) -> str:
        assert snapshot.url is not None
        self.record.ready_at = self._clock()
        self.record.replicas = snapshot.ready_replicas
        self._cold.set_warm(True)
        plural = "s" if snapshot.ready_replicas != 1 else ""
        self._event(f"{self.ref} is ready at {snapshot.url} ({snapshot.ready_replicas} replica{plural})")
        return snapshot.url

    # ------------------------------------------------------------------ during the run

    async def _watch(self) -> None:
        """Follow the endpoint while the job runs: replicas for the meter, failure for the stop."""
        every = max(0.1, 5 * self.settings.poll_interval_s)
        while True:
            await asyncio.sleep(every)
            try:
                snapshot = await self.refresh()
            except AuthError as exc:
                self._stop.request(StopReason.AUTH, str(exc))
                return
            except EndpointError as exc:  # a control-plane hiccup is not a reason to stop
                log.warning("endpoint_refresh_failed %s", exc)
                continue
            if snapshot.state in FAILED:
                self._stop.request(
                    StopReason.ENDPOINT, f"endpoint {self.ref} became {snapshot.state}: {snapshot.message}"
                )
                return

    async def _background_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # a hint for excuses() only; never fails the job
            log.warning("endpoint_refresh_failed %s", exc)
        finally:
            self._refreshing = None

    async def refresh(self) -> EndpointSnapshot:
        """Read the endpoint's state during the run (replica count, failure, cold)."""
        started = self._last_refresh = self._clock()
        snapshot = await self.control.get()
        previous, self._last = self._last, snapshot
        original = self._ledger.original
        target = self._ledger.min_target(original) if original is not None else 1
        if snapshot.state == "running":
            self.record.replicas = max(1, snapshot.ready_replicas)
        if self.record.ready_at is not None:
            warm = snapshot.state == "running" and snapshot.ready_replicas >= target
            self._cold.set_warm(warm)
            if warm and self._unconfirmed_503_at is not None and started >= self._unconfirmed_503_at:
                self._unconfirmed_503_at = None
            self.meter.set_replicas(max(snapshot.ready_replicas, snapshot.target_replicas))
        if previous is None or (previous.state, previous.ready_replicas) != (snapshot.state, snapshot.ready_replicas):
            self._event(f"{self.ref}: {snapshot.state}, replicas {snapshot.ready_replicas}/{target}")
        return snapshot

    # ------------------------------------------------------------------ release

    async def release(self) -> None:
        """Apply on_finish and restore the user's settings. Data-plane traffic must already be stopped.

        Idempotent, and runs to its end even if the task awaiting it is cancelled.
        """
        if self._release_task is None:
            self.record.release_started_at = self._clock()
            self._release_task = asyncio.ensure_future(self._release())
        task = self._release_task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                with contextlib.suppress(BaseException):
                    await asyncio.shield(task)
            raise

    async def _release(self) -> bool:
        """Put the endpoint back; True when it was left up to the other users of a shared endpoint."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        self._released = True
        shared = self.settings.shared
        if shared is None or not shared.joined:
            await self._release_alone()
            return False
        async with shared.guard():  # a shard joining now waits: it finds the endpoint up, or resumes it after
            others = await asyncio.to_thread(shared.leave)
            if not others:
                if self._ledger.original is None or self.record.acquired_at is None:
                    # Joined, but stopped before reading the endpoint (a control-plane error, a stop): the
                    # others left it to this one, so it is put down from what the first user saved.
                    await self._read_for_put_back()
                await self._release_alone()
                return False
            self.meter.stop()
            self.record.released_at = self._clock()
            self.record.final_action = LEFT_TO_OTHERS
            self.record.note = (f"{self.ref} is still used by {len(others)} other user(s), {', '.join(others)}: "
                                "the last of them to finish puts it down and restores its settings")
            self._event(self.record.note)
            self._ledger.saved.release(forget=False)
            return True

    # ------------------------------------------------------------------ the bracket (`batchrun endpoint up|down`)

    async def up(self) -> BracketResult:
        """`batchrun endpoint up JOB.yaml`: join the job's shards as the bracket, resume, scale, wait until ready.

        Not up (a timeout, Ctrl-C): nothing would ever put down what was resumed, since a bracket never
        goes stale. It leaves at once, and the endpoint is put back unless a shard uses it.
        """
        self._bracket()
        try:
            await self.check()
            await self.acquire()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.release()
            raise
        return BracketResult(self.ref, Bracketed.UP)

    async def down(self) -> BracketResult:
        """`batchrun endpoint down JOB.yaml`: the bracket leaves; when no shard is left, put the endpoint down
        and restore what the first user saved (on_finish: as the user had it before, paused by default)."""
        self._bracket().joined = True  # `endpoint up` joined, in an earlier process
        await self.release()
        assert self._release_task is not None
        outcome = Bracketed.IN_USE if self._release_task.result() else Bracketed.PUT_BACK
        return BracketResult(self.ref, outcome, final_action=self.record.final_action, note=self.record.note)

    def _bracket(self) -> SharedUse:
        shared = self.settings.shared
        if shared is None or shared.user != BRACKET:
            raise ValueError(f"{self!r} is not opened as the bracket of a job's shards (open_endpoint(user=BRACKET))")
        return shared

    async def _read_for_put_back(self) -> None:
        """The endpoint as it is now, and the user's settings the first user saved: what a release puts back."""
        current = await self.control.get()
        self.record.initial_state = self.record.initial_state or current.state
        self.record.acquired_at = self._clock()
        self._ledger.original = self._ledger.adopt_left(current)

    async def _release_alone(self) -> None:
        original = self._ledger.original
        try:
            if original is None or self.record.acquired_at is None:
                # acquire() never began: nothing was changed, so nothing is put back.
                self.record.released_at = self._clock()
                self.record.final_action = "none"
                return
            problems = await self._put_back(original)
        finally:
            self.meter.stop()
        if problems:
            for problem in problems:
                self._event(problem)
            self._ledger.saved.release(forget=False)
            raise EndpointError("; ".join(problems))
        self._ledger.saved.release(forget=True)

    async def _put_back(self, original: EndpointSnapshot) -> list[str]:
        action = self._ledger.final_action(original)
        if action == "keep" and self.settings.on_finish is None:
            self.record.note = (
                f"{self.ref} was already running when the job started, so it was left running "
                "(set endpoint.on_finish: pause to pause it anyway)"
            )
        problems: list[str] = []
        self.record.final_action = action
        if action in ("pause", "scale-to-zero") and not await self._put_down(action):
            # First: the billing stops here. Restoring settings can wait the few milliseconds it takes.
            problems.append(
                f"could not {action} {self.ref}: it may still be billing. Run "
                f"`batchrun endpoint pause {self.control.name} --namespace {self.control.namespace}`"
            )
        self.record.released_at = self._clock()
        restore = self._ledger.restore(original)
        if restore:
            try:
                await _with_retries(lambda: self.control.update(**restore))
                self._event(f"restored {', '.join(f'{k}={v}' for k, v in restore.items())}")
            except EndpointError as exc:
                problems.append(f"could not restore {self.ref}'s settings ({', '.join(restore)}): {exc}")
        return problems

    async def _put_down(self, action: str) -> bool:
        call = self.control.pause if action == "pause" else self.control.scale_to_zero
        try:
            await _with_retries(call)
        except AuthError:
            raise
        except EndpointError as exc:
            # A refusal may mean it is already at rest (a failed endpoint cannot be paused everywhere).
            try:
                snapshot: EndpointSnapshot | None = await self.control.get()
            except EndpointError:
                snapshot = None
            if snapshot is None or snapshot.state not in AT_REST:
                self.record.final_action = f"{action} failed"
                self._event(f"{action} of {self.ref} failed: {exc}")
                return False
            self._event(f"{self.ref} is {snapshot.state} (the {action} call answered: {exc})")
            return True
        self._event(f"paused {self.ref}" if action == "pause" else f"scaled {self.ref} to zero")
        return True


async def _with_retries(call: Callable[[], Awaitable[_T]], attempts: int = RELEASE_ATTEMPTS) -> _T:
    """Call a control-plane coroutine factory, retrying only what is worth retrying (5xx, 429, no answer)."""
    delay = 0.25
    for attempt in range(attempts):
        try:
            return await call()
        except ControlPlaneUnavailableError as exc:
            if attempt == attempts - 1:
                raise
            log.warning("endpoint_call_retry %s", exc)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")
