"""The endpoint lifecycle wrapped around dispatch: resume, scale, wait until ready, release.

    EndpointSnapshot      what the control plane says about an endpoint, parsed from its raw object
    ControlPlane          the seam: get / resume / pause / scale_to_zero / update (a Protocol)
    HfControlPlane        the production implementation, through huggingface_hub
    EndpointLifecycle     acquire() -> a ready data-plane url; release() on every exit path
    StaticEndpoint        a plain url (`endpoint: {url: ...}`): no lifecycle at all

The built-in emulator (`endpoint: {local: ...}`) is driven through HfControlPlane exactly as a real
endpoint is, with the control-plane base pointed at the emulator: there is no demo-mode branch.

huggingface_hub's calls are blocking, so they run in threads. Its own ``wait()`` is never used: it
ignores the replica count and, without a timeout, waits forever. A call already on the wire is never
abandoned: if the task awaiting it is cancelled, the call is allowed to land first, so a late resume
can never arrive after the pause that release() sends (see ``HfControlPlane._call``).

The sequence and its guarantees are described in docs/lifecycle.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from .errors import AuthError, EndpointError, EndpointNotReadyError, RequestFailed, redact
from .holder import process_alive as _process_alive
from .holder import process_started as _process_started

__all__ = [
    "ControlPlane",
    "ControlPlaneUnavailableError",
    "EndpointLifecycle",
    "EndpointSnapshot",
    "EndpointUnusableError",
    "HfControlPlane",
    "LifecycleSettings",
    "StaticEndpoint",
    "control_plane_base",
    "endpoint_state_path",
    "state_dir",
]

log = logging.getLogger("batchrun.endpoint")

DEFAULT_API_URL = "https://api.endpoints.huggingface.cloud/v2"

#: The states from which a resume brings the endpoint up.
RESUMABLE = {"paused", "scaledToZero"}
#: States that will become running without any call from us.
STARTING = {"pending", "initializing", "updating"}
FAILED = {"failed", "updateFailed"}
#: States in which an endpoint bills nothing (protocols.md §3).
AT_REST = {"paused", "scaledToZero", "failed"}
#: Once the endpoint is running and only replicas are still coming up, poll at least this often, so
#: that the moment it becomes ready is seen quickly (the wait before that is minutes; this is seconds).
FAST_POLL_S = 0.5
#: How often release() tries the final pause (or scale-to-zero) before giving up and saying so.
RELEASE_ATTEMPTS = 4


def state_dir() -> Path:
    """batchrun's own state folder: $BATCHRUN_STATE_DIR, else $XDG_CACHE_HOME/batchrun, else ~/.cache/batchrun."""
    explicit = os.environ.get("BATCHRUN_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "batchrun"


def endpoint_state_path(api_url: str | None, namespace: str, name: str) -> Path:
    """Where the user's settings of one endpoint are kept while a job has changed them.

    One file per endpoint (control plane + namespace + name), outside any job's output folder, so
    that any later run on that endpoint finds it: after `--fresh`, with another output folder, or
    from another job. The name is readable (``ns__name``) and unique (a hash of all three).
    """
    api = (api_url or DEFAULT_API_URL).rstrip("/")
    digest = hashlib.sha256(f"{api}/{namespace}/{name}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{namespace}__{name}")[:96]
    return state_dir() / "endpoints" / f"{readable}-{digest}.json"


#: State files held by lifecycles alive in this process (between saving or adopting one and release).
_HELD: set[str] = set()


class ControlPlaneUnavailableError(EndpointError):
    """The control plane could not be reached or answered 5xx/429: worth asking again."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class EndpointUnusableError(EndpointError):
    """Found before anything was changed: the endpoint is missing, failed, or serves another task.

    Exit code 2 (nothing ran), unlike an endpoint that breaks once the job has started (3).
    """

    exit_code = 2


@dataclass(frozen=True, slots=True)
class EndpointSnapshot:
    """An endpoint as the control plane describes it at one moment."""

    name: str
    namespace: str
    state: str
    url: str | None
    message: str
    task: str
    repository: str
    health_route: str
    ready_replicas: int
    target_replicas: int
    min_replica: int
    max_replica: int
    scale_to_zero_timeout: int | None

    @classmethod
    def from_raw(cls, raw: dict[str, Any], namespace: str) -> EndpointSnapshot:
        status = raw.get("status") or {}
        scaling = ((raw.get("compute") or {}).get("scaling")) or {}
        model = raw.get("model") or {}
        return cls(
            name=raw["name"],
            namespace=namespace,
            state=status.get("state", "unknown"),
            url=status.get("url") or None,
            message=status.get("message") or "",
            task=model.get("task", ""),
            repository=model.get("repository", ""),
            health_route=raw.get("healthRoute") or "/health",
            ready_replicas=int(status.get("readyReplica") or 0),
            target_replicas=int(status.get("targetReplica") or 0),
            min_replica=int(scaling.get("minReplica") or 0),
            max_replica=int(scaling.get("maxReplica") or 0),
            scale_to_zero_timeout=scaling.get("scaleToZeroTimeout"),
        )


class ControlPlane(Protocol):
    """What batchrun needs from an Inference Endpoints control plane."""

    namespace: str
    name: str

    async def get(self) -> EndpointSnapshot: ...
    async def resume(self) -> EndpointSnapshot: ...
    async def pause(self) -> EndpointSnapshot: ...
    async def scale_to_zero(self) -> EndpointSnapshot: ...
    async def update(
        self,
        *,
        min_replica: int | None = None,
        max_replica: int | None = None,
        scale_to_zero_timeout: int | None = None,
    ) -> EndpointSnapshot: ...


@contextlib.contextmanager
def control_plane_base(api_url: str | None) -> Iterator[None]:
    """Point huggingface_hub's control-plane base at ``api_url`` for the duration of a job.

    huggingface_hub reads ``constants.INFERENCE_ENDPOINTS_ENDPOINT`` on every call and offers no
    other way to change it, so this sets the attribute and puts the old value back afterwards.
    """
    from huggingface_hub import constants

    if not api_url:
        yield
        return
    previous = constants.INFERENCE_ENDPOINTS_ENDPOINT
    constants.INFERENCE_ENDPOINTS_ENDPOINT = api_url.rstrip("/")
    try:
        yield
    finally:
        constants.INFERENCE_ENDPOINTS_ENDPOINT = previous


class HfControlPlane:
    """The production control plane: huggingface_hub's Inference Endpoints API, run in threads."""

    def __init__(
        self,
        *,
        name: str,
        namespace: str,
        token: str | None,
        call_timeout_s: float = 60.0,
        api_url: str | None = None,
    ) -> None:
        from huggingface_hub import HfApi

        self.name = name
        self.namespace = namespace
        self._token = token
        self._api = HfApi()
        self._call_timeout_s = call_timeout_s
        self._api_url = api_url.rstrip("/") if api_url else None

    @property
    def api_url(self) -> str:
        """The control-plane base the calls go to: as given, else huggingface_hub's current one."""
        if self._api_url:
            return self._api_url
        from huggingface_hub import constants

        return constants.INFERENCE_ENDPOINTS_ENDPOINT.rstrip("/")

    def __repr__(self) -> str:  # never show the token
        return f"HfControlPlane(namespace={self.namespace!r}, name={self.name!r})"

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> EndpointSnapshot:
        # The blocking call runs in a thread that cancellation cannot stop. So when the awaiting task
        # is cancelled (a signal during the wait), the call is let land before CancelledError goes on:
        # otherwise a resume still on the wire could reach the control plane after release()'s pause.
        call = asyncio.ensure_future(
            asyncio.to_thread(fn, self.name, namespace=self.namespace, token=self._token, **kwargs)
        )
        # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives
        # as the call completes, and the cancelled acquire() would then go on waiting for the endpoint.
        try:
            done, _ = await asyncio.wait({call}, timeout=self._call_timeout_s)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.wait({call}, timeout=self._call_timeout_s)
            raise
        if not done:
            raise ControlPlaneUnavailableError(
                f"{what} on {self.namespace}/{self.name}: the control plane did not answer within "
                f"{self._call_timeout_s:.0f}s"
            )
        try:
            endpoint = call.result()
        except Exception as exc:  # noqa: BLE001 - translated into batchrun's errors below
            raise self._translate(what, exc) from None
        return EndpointSnapshot.from_raw(endpoint.raw, self.namespace)

    def _translate(self, what: str, exc: Exception) -> Exception:
        from huggingface_hub.errors import HfHubHTTPError

        ref = f"{self.namespace}/{self.name}"
        if isinstance(exc, HfHubHTTPError):
            response = exc.response
            status = response.status_code if response is not None else None
            body = redact(response.text[:300]) if response is not None else ""
            if status in (401, 403):
                return AuthError(
                    f"the control plane refused the token ({status}) for {what} on {ref}: set HF_TOKEN or run "
                    "`hf auth login` with a token that may manage Inference Endpoints in this namespace",
                    status=status,
                )
            if status == 404:
                return EndpointUnusableError(
                    f"endpoint {ref} was not found ({what}): check the endpoint's name and namespace, and the control-plane base (endpoint.api_url or --api-url, ending in /v2)"
                )
            if status is None or status == 429 or status >= 500:
                return ControlPlaneUnavailableError(f"{what} on {ref} failed with HTTP {status}: {body}", status=status)
            return EndpointError(f"{what} on {ref} failed with HTTP {status}: {body}")
        # Connection refused, DNS, TLS, reset: huggingface_hub 2.x raises its HTTP library's transport
        # errors, which are not OSError.
        detail = redact(f"{type(exc).__name__}: {exc}")[:300]
        return ControlPlaneUnavailableError(f"{what} on {ref}: cannot reach the control plane ({detail})")

    async def get(self) -> EndpointSnapshot:
        return await self._call("get", self._api.get_inference_endpoint)

    async def resume(self) -> EndpointSnapshot:
        return await self._call("resume", self._api.resume_inference_endpoint, running_ok=True)

    async def pause(self) -> EndpointSnapshot:
        return await self._call("pause", self._api.pause_inference_endpoint)

    async def scale_to_zero(self) -> EndpointSnapshot:
        return await self._call("scale-to-zero", self._api.scale_to_zero_inference_endpoint)

    async def update(
        self,
        *,
        min_replica: int | None = None,
        max_replica: int | None = None,
        scale_to_zero_timeout: int | None = None,
    ) -> EndpointSnapshot:
        return await self._call(
            "update",
            self._api.update_inference_endpoint,
            min_replica=min_replica,
            max_replica=max_replica,
            scale_to_zero_timeout=scale_to_zero_timeout,
        )


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
    # Where the user's settings are kept while the job has changed them, so that a job killed with
    # SIGKILL is followed by a run that restores the user's values, not the killed run's. None: the
    # endpoint's own file in batchrun's state folder (endpoint_state_path), shared by every job.
    state_file: str | None = None


@dataclass(slots=True)
class LifecycleRecord:
    """What the lifecycle did, for the summary and the cost figures."""

    initial_state: str | None = None
    resumed: bool = False
    scaled: bool = False
    backstop_set: bool = False
    acquired_at: float | None = None  # monotonic time the resume (or first use) began
    ready_at: float | None = None
    released_at: float | None = None  # when the final action (pause, scale-to-zero) was accepted
    final_action: str | None = None  # pause | scale-to-zero | keep | none | "pause failed" ...
    note: str | None = None
    replicas: int = 1
    #: (wall-clock time, event) for every event, for benchmarks and post-mortems.
    timeline: list[tuple[float, str]] = field(default_factory=list)
    release_started_at: float | None = None  # monotonic time release() began

    @property
    def events(self) -> list[str]:
        """The events' messages, in order."""
        return [message for _, message in self.timeline]


class StaticEndpoint:
    """A plain url: any TGI or OpenAI-compatible server. Nothing to resume, nothing to release."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.record = LifecycleRecord(initial_state="static")
        self.extra_headers: dict[str, str] = {}

    async def preflight(self) -> None:
        return None

    async def acquire(self) -> str:
        self.record.acquired_at = self.record.ready_at = time.monotonic()
        return self.url

    async def release(self) -> None:
        self.record.released_at = time.monotonic()
        self.record.final_action = "none"

    def replicas_ready(self) -> int:
        return 1

    def is_cold(self) -> bool:
        return False

    def no_burn(self, failure: RequestFailed) -> bool:
        return False


class EndpointLifecycle:
    """Brings a Dedicated Inference Endpoint up for a job and puts it back afterwards.

    ``acquire()`` applies the job's scaling and the server-side idle backstop, resumes the endpoint
    when paused or scaled to zero, and polls until it is running, healthy and every target replica
    is ready. ``release()`` applies ``on_finish`` and restores the user's scaling and idle timeout;
    it is safe to call on every exit path, more than once, and even if ``acquire()`` failed half way.
    The caller must stop all data-plane traffic before calling ``release()``.
    """

    def __init__(
        self,
        control: ControlPlane,
        settings: LifecycleSettings,
        *,
        token: str | None,
        on_event: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.settings = settings
        self._token = token
        self._on_event = on_event or (lambda message: None)
        self._clock = clock
        self.record = LifecycleRecord()
        self.extra_headers: dict[str, str] = {}
        self._original: EndpointSnapshot | None = None
        self._last_seen: EndpointSnapshot | None = None  # as preflight saw it, before any change
        self._saved: dict[str, Any] = {}
        self._last: EndpointSnapshot | None = None
        self._changed: dict[str, int] = {}  # what acquire() changed, to be put back by release()
        self._touched = False  # a state-changing call was sent (or may have been)
        self._released = False
        self._release_task: asyncio.Task[None] | None = None
        self._cold = True
        self._cold_since: float | None = None  # when the current cold spell began (first excused 503)
        self._cold_reported = False  # the "503s now count" event was shown for this spell
        self._refreshing: asyncio.Task[Any] | None = None
        self._last_refresh = float("-inf")
        self._state_path: str | None = None
        self._owns_state = False  # this run wrote (or took over) the state file: it deletes it after release
        self._foreign_owner: str | None = None  # a live process that holds the state file

    def _event(self, message: str) -> None:
        self.record.timeline.append((time.time(), message))
        log.info("endpoint_event %s", message)
        self._on_event(message)

    @property
    def ref(self) -> str:
        return f"{self.control.namespace}/{self.control.name}"

    # ------------------------------------------------------------------ preflight

    async def preflight(self) -> EndpointSnapshot:
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
        self._original = self._last_seen = snapshot
        return snapshot

    # ------------------------------------------------------------------ acquire

    def _final_action(self, original: EndpointSnapshot) -> str:
        on_finish = self.settings.on_finish
        if on_finish is None:
            started = self._saved.get("initial_state", original.state) if self._saved else original.state
            return "keep" if started == "running" else "pause"
        return on_finish

    def state_path(self) -> str:
        """The file that keeps the user's settings while the job has changed them (see endpoint_state_path)."""
        if self._state_path is None:
            if self.settings.state_file:
                self._state_path = self.settings.state_file
            else:
                api_url = getattr(self.control, "api_url", None)
                if api_url is None:
                    from huggingface_hub import constants

                    api_url = constants.INFERENCE_ENDPOINTS_ENDPOINT
                self._state_path = str(endpoint_state_path(api_url, self.control.namespace, self.control.name))
        return self._state_path

    def _load_saved(self) -> dict[str, Any]:
        """The user's settings saved by an earlier run that never reached release().

        A file held by a run that is still alive (another job on the same endpoint) is not taken over:
        that run will put the endpoint back itself.
        """
        path = self.state_path()
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get("endpoint") != self.ref:
            return {}
        pid, host = saved.get("pid"), saved.get("host")
        if isinstance(pid, int) and host == socket.gethostname():
            if pid == os.getpid():
                alive = path in _HELD
            else:
                alive = _process_alive(pid, saved.get("process_started"))
            if alive:
                self._foreign_owner = f"pid {pid}"
                self._event(
                    f"another batchrun run (pid {pid}) is using {self.ref} and will put it back; "
                    "this job leaves its saved settings alone"
                )
                return {}
        return saved

    def _save_user_settings(self, original: EndpointSnapshot) -> None:
        if self._foreign_owner is not None:
            return
        path = self.state_path()
        if self._saved:
            # Left by a dead run: now this run's to put back and delete.
            self._owns_state = True
            _HELD.add(path)
            return
        record = {
            "endpoint": self.ref,
            "api_url": getattr(self.control, "api_url", None),
            "initial_state": original.state,
            "min_replica": original.min_replica,
            "max_replica": original.max_replica,
            "scale_to_zero_timeout": original.scale_to_zero_timeout,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pid": os.getpid(),
            "process_started": _process_started(os.getpid()),
            "host": socket.gethostname(),
        }
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            # Before any change: without this record a SIGKILL would leave the next run unable to restore.
            raise EndpointError(
                f"cannot save {self.ref}'s settings to {path} before changing them ({exc}); "
                "set BATCHRUN_STATE_DIR to a writable folder"
            ) from None
        self._owns_state = True
        _HELD.add(path)
        self._saved = record

    def _forget_user_settings(self) -> None:
        if self._state_path is None or not self._owns_state:
            return  # never saved nor taken over by this run: not ours to delete
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._state_path)

    def _min_target(self, original: EndpointSnapshot) -> int:
        wanted = self.settings.scale_min if self.settings.scale_min is not None else original.min_replica
        top = self.settings.scale_max if self.settings.scale_max is not None else original.max_replica
        return max(1, min(wanted, top) if top else wanted)

    async def acquire(self) -> str:
        """Make the endpoint ready and return its data-plane url."""
        original = self._original or await self.preflight()
        self.record.initial_state = original.state
        self.record.acquired_at = self._clock()
        self._event(f"{self.ref} is {original.state}")
        self._saved = self._load_saved()
        if self._saved:
            # An earlier run changed the endpoint and died before putting it back: its settings are
            # the job's, not the user's. Restore to what the user had before that run.
            original = dataclasses.replace(
                original,
                min_replica=self._saved["min_replica"],
                max_replica=self._saved["max_replica"],
                scale_to_zero_timeout=self._saved["scale_to_zero_timeout"],
            )
            self._original = original
            self._event(
                f"an earlier run left {self.ref} changed; the settings it found are restored at the end "
                f"(min_replica={original.min_replica}, max_replica={original.max_replica}, "
                f"scale_to_zero_timeout={original.scale_to_zero_timeout})"
            )
        s = self.settings
        changes: dict[str, int] = {}
        if s.scale_min is not None and s.scale_min != original.min_replica:
            changes["min_replica"] = s.scale_min
        if s.scale_max is not None and s.scale_max != original.max_replica:
            changes["max_replica"] = s.scale_max
        final = self._final_action(original)
        if s.idle_backstop_s is not None and final != "keep":
            # The server-side safety net should this process die with SIGKILL or the machine lose power:
            # the endpoint's own idle timeout. Set whenever the job will put the endpoint down at the end.
            minutes = max(1, round(s.idle_backstop_s / 60))
            if minutes != original.scale_to_zero_timeout:
                changes["scale_to_zero_timeout"] = minutes
            self.record.backstop_set = True
            min_after = changes.get("min_replica", original.min_replica)
            if min_after > 0:
                self._event(
                    f"note: the idle backstop ({minutes} min) only scales an endpoint to zero when min_replica is 0; "
                    f"with min_replica={min_after}, a job killed with SIGKILL leaves it running until "
                    f"`batchrun endpoint pause {self.control.name} --namespace {self.control.namespace}`"
                )
        if self._saved:
            # Whatever differs from the user's settings now is put back at release, changed by us or not.
            current = self._last_seen if self._last_seen is not None else original
            for key in _SNAPSHOT_FIELD:
                if getattr(current, _SNAPSHOT_FIELD[key]) != getattr(original, _SNAPSHOT_FIELD[key]):
                    self._changed.setdefault(key, 0)
        if changes or self._saved or original.state in RESUMABLE:
            self._save_user_settings(original)
        if changes:
            self._touched = True
            self._changed.update(changes)
            await self.control.update(**changes)
            self.record.scaled = "min_replica" in changes or "max_replica" in changes
            self._event(f"updated {', '.join(f'{k}={v}' for k, v in changes.items())}")
        if original.state == "scaledToZero" or changes.get("min_replica", original.min_replica) == 0:
            # The proxy holds a request to a scaled-to-zero endpoint until a replica is up instead of
            # answering 503 (protocols.md §3).
            self.extra_headers["X-Scale-Up-Timeout"] = str(max(1, int(s.ready_timeout_s)))
        if original.state in RESUMABLE:
            self._touched = True
            await self.control.resume()
            self.record.resumed = True
            self._event(f"resume requested for {self.ref}")
        return await self._wait_ready(original)

    async def _wait_ready(self, original: EndpointSnapshot) -> str:
        target = self._min_target(original)
        deadline = self._clock() + self.settings.ready_timeout_s
        last_line = ""
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    snapshot = await self.control.get()
                except ControlPlaneUnavailableError as exc:  # a hiccup is not a reason to give up the wait
                    log.warning("endpoint_poll_failed %s", exc)
                    snapshot = self._last
                if snapshot is not None:
                    self._last = snapshot
                    line = f"{self.ref}: {snapshot.state}, replicas {snapshot.ready_replicas}/{target}"
                    if line != last_line:
                        self._event(line)
                        last_line = line
                    if snapshot.state in FAILED:
                        raise EndpointError(
                            f"endpoint {self.ref} became {snapshot.state} while starting: "
                            f"{snapshot.message or 'no message'}",
                            state=snapshot.state,
                        )
                    if snapshot.state == "running" and snapshot.url and snapshot.ready_replicas >= target:
                        if await self._healthy(http, snapshot):
                            self.record.ready_at = self._clock()
                            self.record.replicas = snapshot.ready_replicas
                            self._cold = False
                            self._event(f"{self.ref} is ready at {snapshot.url} ({snapshot.ready_replicas} replica{'s' if snapshot.ready_replicas != 1 else ''})")
                            return snapshot.url
                now = self._clock()
                if now >= deadline:
                    state = snapshot.state if snapshot else "unknown"
                    ready = snapshot.ready_replicas if snapshot else 0
                    raise EndpointNotReadyError(
                        f"endpoint {self.ref} was not ready after {self.settings.ready_timeout_s:.0f}s "
                        f"(last state {state}, replicas {ready}/{target}); "
                        "raise endpoint.ready_timeout or check the endpoint's logs",
                        state=state,
                    )
                interval = self.settings.poll_interval_s
                if snapshot is not None and snapshot.state in ("running", "updating"):
                    interval = min(interval, FAST_POLL_S)
                await asyncio.sleep(max(0.0, min(interval, deadline - now)))

    async def _healthy(self, http: aiohttp.ClientSession, snapshot: EndpointSnapshot) -> bool:
        assert snapshot.url is not None
        url = f"{snapshot.url.rstrip('/')}/{snapshot.health_route.lstrip('/')}"
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    # ------------------------------------------------------------------ during the run

    def replicas_ready(self) -> int:
        return self.record.replicas

    def is_cold(self) -> bool:
        """True until the endpoint is ready, and whenever the last refresh saw it not running or short of replicas.

        While cold, a 503 is the endpoint starting (or a replica restarting), not a row's fault.
        """
        return self._cold

    def no_burn(self, failure: RequestFailed) -> bool:
        """The dispatcher's hook: a 503 while the endpoint is cold does not burn the row's attempts.

        Only for a bounded cold spell: once 503s have been excused for longer than ``ready_timeout_s``
        (the patience the job has for a start) they count again, so a replica that never comes back
        (a crash loop) ends in failure rows and the failure threshold instead of endless retries. A
        refresh that sees the endpoint warm again ends the spell.

        A 503 also asks for a refresh (at most once per poll interval, in the background), and until that
        answer arrives the 503 is given the benefit of the doubt: a replica restart is then seen within
        one control-plane round trip instead of at the next periodic refresh.
        """
        if failure.status != 503 or self._released:
            return False
        now = self._clock()
        if self._refreshing is None and now - self._last_refresh >= self.settings.poll_interval_s:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule
                self._refreshing = asyncio.get_running_loop().create_task(self._background_refresh())
        if not (self._cold or self._refreshing is not None):
            return False
        # Excused only for as long as the job would wait for a start: a replica that crash-loops must
        # not keep the job retrying (and billing) forever.
        if self._cold_since is None:
            self._cold_since = now
        spell = now - self._cold_since
        if spell > self.settings.ready_timeout_s:
            if not self._cold_reported:
                self._cold_reported = True
                self._event(
                    f"{self.ref} still not ready after {spell:.1f}s (endpoint.ready_timeout "
                    f"{self.settings.ready_timeout_s:g}s): 503s now count against rows' attempts"
                )
            return False
        return True

    async def _background_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - a hint for no_burn only; never fails the job
            log.warning("endpoint_refresh_failed %s", exc)
        finally:
            self._refreshing = None

    async def refresh(self) -> EndpointSnapshot:
        """Read the endpoint's state during the run (replica count, failure, cold)."""
        self._last_refresh = self._clock()
        snapshot = await self.control.get()
        previous = self._last
        self._last = snapshot
        target = self._min_target(self._original) if self._original is not None else 1
        if snapshot.state == "running":
            self.record.replicas = max(1, snapshot.ready_replicas)
        if self.record.ready_at is not None:
            self._cold = snapshot.state != "running" or snapshot.ready_replicas < target
            if self._cold:
                if self._cold_since is None:
                    self._cold_since = self._last_refresh
            else:  # warm again: the next cold spell gets the full patience
                self._cold_since = None
                self._cold_reported = False
        if previous is None or (previous.state, previous.ready_replicas) != (snapshot.state, snapshot.ready_replicas):
            self._event(f"{self.ref}: {snapshot.state}, replicas {snapshot.ready_replicas}/{target}")
        return snapshot

    # ------------------------------------------------------------------ release

    async def release(self) -> None:
        """Apply on_finish and restore the user's settings. Data-plane traffic must already be stopped.

        Idempotent. Runs to the end even if the task awaiting it is cancelled, and SIGINT/SIGTERM
        arriving meanwhile are reported but cannot cut it short (when called from the main thread).
        """
        if self._release_task is None:
            self.record.release_started_at = self._clock()
            self._release_task = asyncio.ensure_future(self._release())
        task = self._release_task
        with _signals_deferred(self._event):
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.done():
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(task)
                raise

    async def _release(self) -> None:
        try:
            await self._release_once()
        finally:
            # Released (well or not): a later run in this process may take the file over if it is left.
            if self._owns_state and self._state_path is not None:
                _HELD.discard(self._state_path)

    async def _release_once(self) -> None:
        original = self._original
        if self._refreshing is not None:
            self._refreshing.cancel()
        self._released = True
        if original is None or self.record.acquired_at is None:
            # acquire() never began: nothing was changed, so nothing is put back.
            self.record.released_at = self._clock()
            self.record.final_action = "none"
            return
        action = self._final_action(original)
        if action == "keep" and self.settings.on_finish is None:
            self.record.note = (
                f"{self.ref} was already running when the job started, so it was left running "
                "(set endpoint.on_finish: pause to pause it anyway)"
            )
        problems: list[str] = []
        self.record.final_action = action
        if action in ("pause", "scale-to-zero"):
            # First: the billing stops here. Restoring settings can wait the few milliseconds it takes.
            done = await self._put_down(action)
            if not done:
                problems.append(
                    f"could not {action} {self.ref}: it may still be billing. Run "
                    f"`batchrun endpoint pause {self.control.name} --namespace {self.control.namespace}`"
                )
        self.record.released_at = self._clock()
        restore = {key: getattr(original, _SNAPSHOT_FIELD[key]) for key in self._changed}
        restore = {key: value for key, value in restore.items() if value is not None}
        if restore:
            try:
                await _with_retries(lambda: self.control.update(**restore))
                self._event(f"restored {', '.join(f'{k}={v}' for k, v in restore.items())}")
            except EndpointError as exc:
                problems.append(f"could not restore {self.ref}'s settings ({', '.join(restore)}): {exc}")
        if problems:
            for problem in problems:
                self._event(problem)
            raise EndpointError("; ".join(problems))
        self._forget_user_settings()

    async def _put_down(self, action: str) -> bool:
        call = self.control.pause if action == "pause" else self.control.scale_to_zero
        try:
            await _with_retries(call)
        except AuthError:
            raise
        except EndpointError as exc:
            # A refusal may mean it is already at rest (a failed endpoint cannot be paused everywhere).
            try:
                snapshot = await self.control.get()
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


_SNAPSHOT_FIELD = {
    "min_replica": "min_replica",
    "max_replica": "max_replica",
    "scale_to_zero_timeout": "scale_to_zero_timeout",
}


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


@contextlib.contextmanager
def _signals_deferred(event: Callable[[str], None]) -> Iterator[None]:
    """While the endpoint is being put down, SIGINT/SIGTERM say so instead of cutting it short.

    The runner removes its own handlers before release() runs, which would leave SIGTERM with its
    default action (die at once, endpoint running) and SIGINT raising KeyboardInterrupt anywhere.
    Only the main thread may set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def deferred(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        event(f"{name} received while putting the endpoint down; finishing that first")

    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, deferred)
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
