"""The Inference Endpoints control plane, through huggingface_hub: the production path.

    EndpointSnapshot   an endpoint as the control plane describes it, parsed from its raw object
    ControlPlane       the seam: get / resume / pause / scale_to_zero / update (a Protocol)
    HfControlPlane     the implementation, huggingface_hub's calls run in threads

The built-in emulator is driven through HfControlPlane exactly as a real endpoint is, with the
control-plane base pointed at the emulator: there is no demo-mode branch.

huggingface_hub reads ``constants.INFERENCE_ENDPOINTS_ENDPOINT`` on every call and offers no other way
to change the base, so a control plane with its own ``api_url`` sets that attribute around each call,
under a lock, and puts the old value back.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from batchrun.errors import AuthError, ControlPlaneUnavailableError, EndpointError, EndpointUnusableError, redact

__all__ = ["DEFAULT_API_URL", "ControlPlane", "EndpointSnapshot", "HfControlPlane", "control_plane_base"]

DEFAULT_API_URL = "https://api.endpoints.huggingface.cloud/v2"

_BASE_LOCK = threading.Lock()


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
    revision: str | None
    health_route: str
    ready_replicas: int
    target_replicas: int
    min_replica: int
    max_replica: int
    scale_to_zero_timeout: int | None
    instance: str | None = None  # "nvidia-a10g x1", where the control plane says
    image: str | None = None  # the container image url, where the control plane says

    @classmethod
    def from_raw(cls, raw: dict[str, Any], namespace: str) -> EndpointSnapshot:
        status = raw.get("status") or {}
        compute = raw.get("compute") or {}
        scaling = compute.get("scaling") or {}
        model = raw.get("model") or {}
        instance = " ".join(str(p) for p in (compute.get("instanceType"), compute.get("instanceSize")) if p) or None
        images = model.get("image") or {}
        image = next((v.get("url") for v in images.values() if isinstance(v, dict) and v.get("url")), None)
        return cls(
            name=raw["name"],
            namespace=namespace,
            state=status.get("state", "unknown"),
            url=status.get("url") or None,
            message=status.get("message") or "",
            task=model.get("task", ""),
            repository=model.get("repository", ""),
            revision=model.get("revision") or None,
            health_route=raw.get("healthRoute") or "/health",
            ready_replicas=int(status.get("readyReplica") or 0),
            target_replicas=int(status.get("targetReplica") or 0),
            min_replica=int(scaling.get("minReplica") or 0),
            max_replica=int(scaling.get("maxReplica") or 0),
            scale_to_zero_timeout=scaling.get("scaleToZeroTimeout"),
            instance=instance,
            image=image,
        )


class ControlPlane(Protocol):
    """What batchrun needs from an Inference Endpoints control plane."""

    namespace: str
    name: str

    @property
    def api_url(self) -> str: ...

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
    """Point huggingface_hub's control-plane base at ``api_url`` while the block runs (None: leave it).

    For a whole program (a test, a benchmark); each :class:`HfControlPlane` with an ``api_url`` of its
    own sets it around its own calls instead.
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


@contextlib.contextmanager
def _pointed_at(api_url: str | None) -> Iterator[None]:
    """control_plane_base for one call, under a lock: two control planes never see each other's base."""
    if not api_url:
        yield
        return
    with _BASE_LOCK, control_plane_base(api_url):
        yield


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

        return str(constants.INFERENCE_ENDPOINTS_ENDPOINT).rstrip("/")

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __repr__(self) -> str:  # never show the token
        return f"HfControlPlane(namespace={self.namespace!r}, name={self.name!r})"

    def _blocking(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        with _pointed_at(self._api_url):
            return fn(self.name, namespace=self.namespace, token=self._token, **kwargs)

    async def _call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> EndpointSnapshot:
        # The blocking call runs in a thread that cancellation cannot stop. So when the awaiting task
        # is cancelled (a stop during the wait), the call is let land before CancelledError goes on:
        # otherwise a resume still on the wire could reach the control plane after the release's pause.
        call = asyncio.ensure_future(asyncio.to_thread(self._blocking, fn, kwargs))
        # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives
        # as the call completes, and a cancelled acquire would then go on waiting for the endpoint.
        try:
            done, _ = await asyncio.wait({call}, timeout=self._call_timeout_s)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.wait({call}, timeout=self._call_timeout_s)
            raise
        if not done:
            raise ControlPlaneUnavailableError(
                f"{what} on {self.ref}: the control plane did not answer within {self._call_timeout_s:.0f}s"
            )
        try:
            endpoint = call.result()
        except Exception as exc:  # translated into batchrun's errors below
            raise self._translate(what, exc) from None
        return EndpointSnapshot.from_raw(endpoint.raw, self.namespace)

    def _translate(self, what: str, exc: Exception) -> Exception:
        from huggingface_hub.errors import HfHubHTTPError

        ref = self.ref
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
                    f"endpoint {ref} was not found ({what}): check the endpoint's name and namespace, and the "
                    "control-plane base (endpoint.api_url or --api-url, ending in /v2)"
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
