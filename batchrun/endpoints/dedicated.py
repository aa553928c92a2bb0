"""A Dedicated Inference Endpoint: resume, scale, wait until ready, watch, release.

Entering a :class:`DedicatedEndpoint` applies the job's scaling and a server-side idle backstop,
resumes the endpoint when it is paused or scaled to zero, and polls until it is running, healthy and
every target replica is ready (huggingface_hub's own ``wait()`` is never used: it ignores the replica
count and, without a timeout, waits forever). While the job runs, a watcher follows the replica count
(for the cost meter and the cold-start policy) and stops the job if the endpoint fails. Leaving applies
``on_finish`` (pause by default) and restores the user's settings, on every way out, even when the
task awaiting it is cancelled. The sequence and its guarantees are in docs/lifecycle.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from batchrun.cost import CostMeter
from batchrun.endpoints.base import DataPlane, EndpointCheck, LifecycleRecord
from batchrun.endpoints.cold_start import ColdStartPolicy
from batchrun.endpoints.control_plane import ControlPlane, EndpointSnapshot
from batchrun.endpoints.ready import FAILED, ReadyWait
from batchrun.endpoints.saved_settings import SavedSettings, UserSettings, endpoint_state_path
from batchrun.endpoints.sharing import BRACKET, SharedUse
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

#: The states from which a resume brings the endpoint up.
RESUMABLE = {"paused", "scaledToZero"}
#: States in which an endpoint bills nothing (protocols.md §3).
AT_REST = {"paused", "scaledToZero", "failed"}
#: How often the release tries the final pause (or scale-to-zero) before giving up and saying so.
RELEASE_ATTEMPTS = 4
#: The settings a job may change, and the snapshot fields they are read from.
_SETTINGS = ("min_replica", "max_replica", "scale_to_zero_timeout")


@dataclass(frozen=True, slots=True, kw_only=True)
class LifecycleSettings:
    """How a job drives its endpoint; built from the spec's `endpoint:` section."""

    scale_min: int | None = None
    scale_max: int | None = None
    ready_timeout_s: float = 1200.0
    on_finish: str | None = None  # "pause" | "scale-to-zero" | "keep"; None: pause unless it was already running
    idle_backstop_s: float | None = 900.0
    poll_interval_s: float = 2.0
    supported_tasks: tuple[str, ...] = ()
    # Where the user's settings are kept while the job has changed them. None: the endpoint's own file
    # in batchrun's state folder (endpoint_state_path), shared by every job on that endpoint.
    state_file: str | None = None
    # The shards of one job share the endpoint through their output folder (sharing.py): the last one
    # out puts it down. None: this job is the endpoint's only user.
    shared: SharedUse | None = None


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
    ) -> None:
        self.control = control
        self.settings = settings
        self.record = LifecycleRecord()
        self.meter = CostMeter(price_per_replica_hour, clock=clock)
        self._token = token
        self._stop = stop or Stop()
        self._on_event = on_event or (lambda message: None)
        self._clock = clock
        self._cold = ColdStartPolicy(settings.ready_timeout_s, clock=clock, on_event=self._event)
        self._saved_settings: SavedSettings | None = None
        self._extra_headers: dict[str, str] = {}
        self._original: EndpointSnapshot | None = None  # the user's endpoint, as the check saw it
        self._last: EndpointSnapshot | None = None
        self._changed: dict[str, int] = {}  # what the acquire changed, to be put back by the release
        self._released = False
        self._release_task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[Any] | None = None
        self._last_refresh = float("-inf")
        self._unconfirmed_503_at: float | None = None  # a 503 no later look at the endpoint has explained
        self._serving: contextlib.AbstractAsyncContextManager[DataPlane] | None = None
        self._initial_state: str | None = None  # as an earlier, killed run found it

    def __repr__(self) -> str:
        return f"DedicatedEndpoint({self.ref!r})"

    @property
    def ref(self) -> str:
        return f"{self.control.namespace}/{self.control.name}"

    @property
    def _saved(self) -> SavedSettings:
        # Made on first use: the control-plane base (part of the file's name) may be set only then.
        if self._saved_settings is None:
            self._saved_settings = SavedSettings(self.state_path(), self.ref, self.control.api_url,
                                                 shared=self.settings.shared is not None)
        return self._saved_settings

    def state_path(self) -> str:
        """The file that keeps the user's settings while the job has changed them."""
        if self._saved_settings is not None:
            return self._saved_settings.path
        if self.settings.shared is not None:
            return str(self.settings.shared.settings_path)
        if self.settings.state_file:
            return self.settings.state_file
        return str(endpoint_state_path(self.control.api_url, self.control.namespace, self.control.name))

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
        self._original = snapshot
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
                yield DataPlane(url=url, headers=dict(self._extra_headers), token=self._token)
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
            original = await self._start(self._original or await self._checked_snapshot())
        else:  # one user at a time joins: the endpoint as it is now, the first user's saved settings
            async with shared.guard():
                await asyncio.to_thread(shared.join, beat=shared.user != BRACKET)
                self._original = None  # another shard may have resumed or scaled it since the check
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
        original = self._adopt_left_settings(current)
        changes = self._changes(original)
        if changes or self._saved.owned or original.state in RESUMABLE:
            self._saved.save(original)
        self._changed.update(changes)
        # What another user (a shard) has already set is not sent again; it is still put back at the end.
        changes = {key: value for key, value in changes.items() if getattr(current, key) != value}
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
        assert self._original is not None
        return self._original

    def _adopt_left_settings(self, original: EndpointSnapshot) -> EndpointSnapshot:
        """An earlier run that changed the endpoint and died left the user's settings on disk: restore those."""
        left = self._saved.load()
        from_host = False
        if left is None and self.settings.shared is not None:
            left = self._take_host_record(original)
            from_host = left is not None
        if self._saved.foreign_owner is not None:
            self._event(
                f"another batchrun run ({self._saved.foreign_owner}) is using {self.ref} and will put it back; "
                "this job leaves its saved settings alone"
            )
        if left is None:
            return original
        self._initial_state = left.initial_state
        adopted = dataclasses.replace(
            original,
            min_replica=left.min_replica,
            max_replica=left.max_replica,
            scale_to_zero_timeout=left.scale_to_zero_timeout,
        )
        self._original = adopted
        found = (f"min_replica={adopted.min_replica}, max_replica={adopted.max_replica}, "
                 f"scale_to_zero_timeout={adopted.scale_to_zero_timeout}")
        if self.settings.shared is not None and not from_host:
            self._event(f"{self.ref} is shared with the job's other shards; the settings its first user found "
                        f"({found}) are restored by the last one out")
        else:
            self._event(f"an earlier run left {self.ref} changed; the settings it found are restored at the end "
                        f"({found})")
        # Whatever differs from the user's settings now is put back at the release, changed by us or not.
        for key in _SETTINGS:
            if getattr(original, key) != getattr(adopted, key):
                self._changed.setdefault(key, 0)
        return adopted

    def _take_host_record(self, current: EndpointSnapshot) -> UserSettings | None:
        """A single run killed earlier on this machine left the user's settings in batchrun's own state folder:
        the first shard carries them into the shards' shared file, so that the last one out restores those
        (not what the killed run set) and the machine's file is done with."""
        host = SavedSettings(endpoint_state_path(self.control.api_url, self.control.namespace, self.control.name),
                             self.ref, self.control.api_url)
        left = host.load()  # None when there is none, or its writer still runs (it will put the endpoint back)
        if left is None:
            return None
        self._saved.save(dataclasses.replace(
            current, state=left.initial_state, min_replica=left.min_replica, max_replica=left.max_replica,
            scale_to_zero_timeout=left.scale_to_zero_timeout,
        ))
        host.release(forget=True)
        return left

    def _changes(self, original: EndpointSnapshot) -> dict[str, int]:
        s = self.settings
        changes: dict[str, int] = {}
        if s.scale_min is not None and s.scale_min != original.min_replica:
            changes["min_replica"] = s.scale_min
        if s.scale_max is not None and s.scale_max != original.max_replica:
            changes["max_replica"] = s.scale_max
        if s.idle_backstop_s is not None and self._final_action(original) != "keep":
            # The server-side safety net should this process die with SIGKILL or the machine lose power:
            # the endpoint's own idle timeout. Set whenever the job will put the endpoint down at the end.
            minutes = max(1, round(s.idle_backstop_s / 60))
            if minutes != original.scale_to_zero_timeout:
                changes["scale_to_zero_timeout"] = minutes
            self.record.backstop_set = True
            min_after = changes.get("min_replica", original.min_replica)
            if min_after > 0:
                self._event(
                    f"note: the idle backstop ({minutes} min) only scales an endpoint to zero when min_replica "
                    f"is 0; with min_replica={min_after}, a job killed with SIGKILL leaves it running until "
                    f"`batchrun endpoint pause {self.control.name} --namespace {self.control.namespace}`"
                )
        return changes

    def _min_target(self, original: EndpointSnapshot) -> int:
        wanted = self.settings.scale_min if self.settings.scale_min is not None else original.min_replica
        top = self.settings.scale_max if self.settings.scale_max is not None else original.max_replica
        return max(1, min(wanted, top) if top else wanted)

    async def _wait_ready(self, original: EndpointSnapshot) -> str:
        wait = ReadyWait(self.ref, target=self._min_target(original), timeout_s=self.settings.ready_timeout_s,
                         poll_interval_s=self.settings.poll_interval_s, token=self._token, poll=self._poll,
                         on_event=self._event, clock=self._clock)
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
        target = self._min_target(self._original) if self._original is not None else 1
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

    async def _release(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        self._released = True
        shared = self.settings.shared
        if shared is None or not shared.joined:
            await self._release_alone()
            return
        async with shared.guard():  # a shard joining now waits: it finds the endpoint up, or resumes it after
            others = await asyncio.to_thread(shared.leave)
            if not others:
                if self._original is None or self.record.acquired_at is None:
                    # Joined, but stopped before reading the endpoint (a control-plane error, a stop): the
                    # others left it to this one, so it is put down from what the first user saved.
                    await self._read_for_put_back()
                await self._release_alone()
                return
            self.meter.stop()
            self.record.released_at = self._clock()
            self.record.final_action = "left to the other users"
            self.record.note = (f"{self.ref} is still used by {len(others)} other user(s), {', '.join(others)}: "
                                "the last of them to finish puts it down and restores its settings")
            self._event(self.record.note)
            self._saved.release(forget=False)

    async def put_back_for_bracket(self) -> None:
        """`batchrun endpoint down JOB.yaml`: the bracket leaves; when no shard is left, put the endpoint down
        and restore what the first user saved (on_finish: as the user had it before, paused by default)."""
        shared = self.settings.shared
        assert shared is not None and shared.user == BRACKET
        shared.joined = True  # `endpoint up` joined, in an earlier process
        await self.release()

    async def _read_for_put_back(self) -> None:
        """The endpoint as it is now, and the user's settings the first user saved: what a release puts back."""
        current = await self.control.get()
        self.record.initial_state = self.record.initial_state or current.state
        self.record.acquired_at = self._clock()
        self._original = self._adopt_left_settings(current)

    async def _release_alone(self) -> None:
        original = self._original
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
            self._saved.release(forget=False)
            raise EndpointError("; ".join(problems))
        self._saved.release(forget=True)

    async def _put_back(self, original: EndpointSnapshot) -> list[str]:
        action = self._final_action(original)
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
        restore = {key: getattr(original, key) for key in self._changed}
        restore = {key: value for key, value in restore.items() if value is not None}
        if restore:
            try:
                await _with_retries(lambda: self.control.update(**restore))
                self._event(f"restored {', '.join(f'{k}={v}' for k, v in restore.items())}")
            except EndpointError as exc:
                problems.append(f"could not restore {self.ref}'s settings ({', '.join(restore)}): {exc}")
        return problems

    def _final_action(self, original: EndpointSnapshot) -> str:
        if self.settings.on_finish is not None:
            return self.settings.on_finish
        started = self._initial_state or original.state
        return "keep" if started == "running" else "pause"

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


async def _with_retries(call: Callable[[], Any], attempts: int = RELEASE_ATTEMPTS) -> Any:
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
