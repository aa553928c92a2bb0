"""The endpoint lifecycle wrapped around dispatch: resume, scale, wait until ready, release.

    EndpointSnapshot      what the control plane says about an endpoint, parsed from its raw object
    ControlPlane          the seam: get / resume / pause / scale_to_zero / update (a Protocol)
    HfControlPlane        the production implementation, through huggingface_hub
    EndpointLifecycle     acquire() -> a ready data-plane url; release() on every exit path
    StaticEndpoint        a plain url (`endpoint: {url: ...}`): no lifecycle at all

The built-in emulator (`endpoint: {local: ...}`) is driven through HfControlPlane exactly as a real
endpoint is, with the control-plane base pointed at the emulator: there is no demo-mode branch.

huggingface_hub's calls are blocking, so they run in threads. Its own ``wait()`` is never used: it
ignores the replica count and, without a timeout, waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from .errors import AuthError, EndpointError, EndpointNotReadyError, redact

__all__ = [
    "ControlPlane",
    "EndpointLifecycle",
    "EndpointSnapshot",
    "HfControlPlane",
    "LifecycleSettings",
    "StaticEndpoint",
    "control_plane_base",
]

log = logging.getLogger("batchrun.endpoint")

DEFAULT_API_URL = "https://api.endpoints.huggingface.cloud/v2"

#: The states from which a resume brings the endpoint up.
RESUMABLE = {"paused", "scaledToZero"}
#: States that will become running without any call from us.
STARTING = {"pending", "initializing", "updating"}
FAILED = {"failed", "updateFailed"}


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

    def __init__(self, *, name: str, namespace: str, token: str | None, call_timeout_s: float = 60.0) -> None:
        from huggingface_hub import HfApi

        self.name = name
        self.namespace = namespace
        self._token = token
        self._api = HfApi()
        self._call_timeout_s = call_timeout_s

    def __repr__(self) -> str:  # never show the token
        return f"HfControlPlane(namespace={self.namespace!r}, name={self.name!r})"

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> EndpointSnapshot:
        from huggingface_hub.errors import HfHubHTTPError

        try:
            endpoint = await asyncio.wait_for(
                asyncio.to_thread(fn, self.name, namespace=self.namespace, token=self._token, **kwargs),
                timeout=self._call_timeout_s,
            )
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            body = redact(exc.response.text[:300]) if exc.response is not None else ""
            ref = f"{self.namespace}/{self.name}"
            if status in (401, 403):
                raise AuthError(
                    f"the control plane refused the token ({status}) for {what} on {ref}: set HF_TOKEN or run "
                    "`hf auth login` with a token that may manage Inference Endpoints in this namespace",
                    status=status,
                ) from None
            if status == 404:
                raise EndpointError(
                    f"endpoint {ref} was not found ({what}): check endpoint.name and endpoint.namespace in the spec"
                ) from None
            raise EndpointError(f"{what} on {ref} failed with HTTP {status}: {body}") from None
        except asyncio.TimeoutError:
            raise EndpointError(
                f"{what} on {self.namespace}/{self.name}: the control plane did not answer within "
                f"{self._call_timeout_s:.0f}s"
            ) from None
        except OSError as exc:  # connection refused, DNS, TLS
            raise EndpointError(f"{what} on {self.namespace}/{self.name}: cannot reach the control plane ({exc})") from None
        return EndpointSnapshot.from_raw(endpoint.raw, self.namespace)

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


@dataclass(slots=True)
class LifecycleRecord:
    """What the lifecycle did, for the summary and the cost figures."""

    initial_state: str | None = None
    resumed: bool = False
    scaled: bool = False
    backstop_set: bool = False
    acquired_at: float | None = None  # monotonic time the resume (or first use) began
    ready_at: float | None = None
    released_at: float | None = None
    final_action: str | None = None
    note: str | None = None
    replicas: int = 1
    events: list[str] = field(default_factory=list)


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


class EndpointLifecycle:
    """Brings a Dedicated Inference Endpoint up for a job and puts it back afterwards.

    ``acquire()`` resumes it when paused or scaled to zero, applies the job's scaling, sets the
    server-side idle backstop, and polls until it is running, healthy and every target replica is
    ready. ``release()`` restores the user's scaling and idle timeout and applies ``on_finish``.
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
        self._last: EndpointSnapshot | None = None
        self._touched = False

    def _event(self, message: str) -> None:
        self.record.events.append(message)
        log.info("endpoint_event %s", message)
        self._on_event(message)

    @property
    def ref(self) -> str:
        return f"{self.control.namespace}/{self.control.name}"

    async def preflight(self) -> EndpointSnapshot:
        """Read-only checks before anything bills: the endpoint exists, has a usable task, is not failed."""
        snapshot = await self.control.get()
        if snapshot.state in FAILED:
            raise EndpointError(
                f"endpoint {self.ref} is {snapshot.state}: {snapshot.message or 'no message'}. "
                "A failed endpoint cannot be resumed; fix or recreate it in the Inference Endpoints UI.",
                state=snapshot.state,
            )
        if self.settings.supported_tasks and snapshot.task not in self.settings.supported_tasks:
            raise EndpointError(
                f"endpoint {self.ref} serves task {snapshot.task!r}, which this job cannot use "
                f"(expected one of {', '.join(self.settings.supported_tasks)})"
            )
        self._original = snapshot
        return snapshot

    async def acquire(self) -> str:
        """Make the endpoint ready and return its data-plane url."""
        original = self._original or await self.preflight()
        self.record.initial_state = original.state
        self.record.acquired_at = self._clock()
        self._event(f"{self.ref} is {original.state}")
        s = self.settings
        changes: dict[str, int] = {}
        if s.scale_min is not None and s.scale_min != original.min_replica:
            changes["min_replica"] = s.scale_min
        if s.scale_max is not None and s.scale_max != original.max_replica:
            changes["max_replica"] = s.scale_max
        if s.idle_backstop_s is not None and original.state != "running":
            # Server-side safety net should this process die with SIGKILL: the endpoint scales itself to
            # zero after this much idle time. Only set on endpoints this job brings up.
            minutes = max(1, round(s.idle_backstop_s / 60))
            if minutes != original.scale_to_zero_timeout:
                changes["scale_to_zero_timeout"] = minutes
                self.record.backstop_set = True
        if changes:
            self._touched = True
            await self.control.update(**changes)
            self.record.scaled = "min_replica" in changes or "max_replica" in changes
            self._event(f"updated {', '.join(f'{k}={v}' for k, v in changes.items())}")
        if original.state in RESUMABLE:
            self._touched = True
            await self.control.resume()
            self.record.resumed = True
            self._event(f"resume requested for {self.ref}")
        return await self._wait_ready()

    def _target_replicas(self, snapshot: EndpointSnapshot) -> int:
        wanted = self.settings.scale_min if self.settings.scale_min is not None else 1
        return max(1, wanted, snapshot.min_replica if snapshot.min_replica else 0)

    async def _wait_ready(self) -> str:
        deadline = self._clock() + self.settings.ready_timeout_s
        last_line = ""
        async with aiohttp.ClientSession() as http:
            while True:
                snapshot = await self.control.get()
                self._last = snapshot
                target = self._target_replicas(snapshot)
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
                        self._event(f"{self.ref} is ready at {snapshot.url}")
                        return snapshot.url
                if self._clock() >= deadline:
                    raise EndpointNotReadyError(
                        f"endpoint {self.ref} was not ready after {self.settings.ready_timeout_s:.0f}s "
                        f"(last state {snapshot.state}, replicas {snapshot.ready_replicas}/{target}); "
                        "raise endpoint.ready_timeout or check the endpoint's logs",
                        state=snapshot.state,
                    )
                await asyncio.sleep(self.settings.poll_interval_s)

    async def _healthy(self, http: aiohttp.ClientSession, snapshot: EndpointSnapshot) -> bool:
        url = f"{snapshot.url.rstrip('/')}/{snapshot.health_route.lstrip('/')}"
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        try:
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    def replicas_ready(self) -> int:
        return self.record.replicas

    async def refresh(self) -> EndpointSnapshot:
        """Read the endpoint's state during the run (replica count, failure)."""
        snapshot = await self.control.get()
        self._last = snapshot
        if snapshot.state == "running":
            self.record.replicas = max(1, snapshot.ready_replicas)
        return snapshot

    async def release(self) -> None:
        """Restore the user's settings and apply on_finish. Data-plane traffic must already be stopped."""
        original = self._original
        self.record.released_at = self._clock()
        if original is None:
            self.record.final_action = "none"
            return
        on_finish = self.settings.on_finish
        if on_finish is None:
            if original.state == "running":
                on_finish = "keep"
                self.record.note = (
                    f"{self.ref} was already running when the job started, so it was left running "
                    "(set endpoint.on_finish: pause to pause it anyway)"
                )
            else:
                on_finish = "pause"
        if on_finish == "pause":
            await self.control.pause()
            self._event(f"paused {self.ref}")
        elif on_finish == "scale-to-zero":
            await self.control.scale_to_zero()
            self._event(f"scaled {self.ref} to zero")
        restore: dict[str, int] = {}
        if self._touched:
            current = await self.control.get()
            if current.min_replica != original.min_replica:
                restore["min_replica"] = original.min_replica
            if current.max_replica != original.max_replica:
                restore["max_replica"] = original.max_replica
            if (
                original.scale_to_zero_timeout is not None
                and current.scale_to_zero_timeout != original.scale_to_zero_timeout
            ):
                restore["scale_to_zero_timeout"] = original.scale_to_zero_timeout
        if restore:
            await self.control.update(**restore)
            self._event(f"restored {', '.join(f'{k}={v}' for k, v in restore.items())}")
        self.record.final_action = on_finish
