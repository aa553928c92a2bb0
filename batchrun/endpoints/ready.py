"""The ready wait of a Dedicated endpoint: poll the control plane until it is running, every target
replica is ready and its health route answers 200, within the job's ``ready_timeout``.

huggingface_hub's own ``wait()`` is never used: it ignores the replica count and, without a timeout,
waits forever. A control-plane hiccup during the wait is not a reason to give it up (the poll returns
the last snapshot it has); a failed state is (it cannot be resumed). The sequence is in docs/lifecycle.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from batchrun.endpoints.control_plane import EndpointSnapshot
from batchrun.errors import EndpointError, EndpointNotReadyError
from batchrun.facts import CHECK_MAX_BYTES, CHECK_TIMEOUT_S

__all__ = ["FAILED", "FAST_POLL_S", "ReadyWait"]

#: States an endpoint cannot be resumed from.
FAILED = {"failed", "updateFailed"}
#: Once the endpoint is running and only replicas are still coming up, poll at least this often, so
#: that the moment it becomes ready is seen quickly (the wait before that is minutes; this is seconds).
FAST_POLL_S = 0.5


class ReadyWait:
    """One wait until ``ref`` is ready with ``target`` replicas; ``await wait()`` returns the ready snapshot.

    ``poll`` reads the endpoint (None: nothing read yet), ``on_event`` hears each new state line, and
    ``clock`` and ``sleep`` keep the time (the unit tests script them).
    """

    def __init__(
        self,
        ref: str,
        *,
        target: int,
        timeout_s: float,
        poll_interval_s: float,
        token: str | None,
        send_token: bool = False,
        poll: Callable[[], Awaitable[EndpointSnapshot | None]],
        on_event: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.ref = ref
        self.target = target
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self._token = token
        self._send_token = send_token
        self._poll = poll
        self._on_event = on_event
        self._clock = clock
        self._sleep = sleep

    async def __call__(self) -> EndpointSnapshot:
        """Wait, checking the health route through the transport."""
        return await self.until_ready(self._healthy)

    async def until_ready(self, healthy: Callable[[EndpointSnapshot], Awaitable[bool]]) -> EndpointSnapshot:
        """Poll until ready and ``healthy``; EndpointError for a failed state, EndpointNotReadyError at the end."""
        deadline = self._clock() + self.timeout_s
        last_line = ""
        while True:
            snapshot = await self._poll()
            if snapshot is not None:
                line = f"{self.ref}: {snapshot.state}, replicas {snapshot.ready_replicas}/{self.target}"
                if line != last_line:
                    self._on_event(line)
                    last_line = line
                if snapshot.state in FAILED:
                    raise EndpointError(
                        f"endpoint {self.ref} became {snapshot.state} while starting: "
                        f"{snapshot.message or 'no message'}",
                        state=snapshot.state,
                    )
                up = snapshot.state == "running" and snapshot.url and snapshot.ready_replicas >= self.target
                if up and await healthy(snapshot):
                    return snapshot
            now = self._clock()
            if now >= deadline:
                raise self._not_ready(snapshot)
            interval = self.poll_interval_s
            if snapshot is not None and snapshot.state in ("running", "updating"):
                interval = min(interval, FAST_POLL_S)
            await self._sleep(max(0.0, min(interval, deadline - now)))

    def _not_ready(self, snapshot: EndpointSnapshot | None) -> EndpointNotReadyError:
        state = snapshot.state if snapshot else "unknown"
        ready = snapshot.ready_replicas if snapshot else 0
        return EndpointNotReadyError(
            f"endpoint {self.ref} was not ready after {self.timeout_s:.0f}s "
            f"(last state {state}, replicas {ready}/{self.target}); "
            "raise endpoint.ready_timeout or check the endpoint's logs",
            state=state,
        )

    async def _healthy(self, snapshot: EndpointSnapshot) -> bool:
        from batchrun.transport import Request, TransportError, auth_headers, current_transport

        assert snapshot.url is not None
        url = f"{snapshot.url.rstrip('/')}/{snapshot.health_route.lstrip('/')}"
        headers = auth_headers(url, self._token, send_token=self._send_token)
        try:
            check = Request("GET", url, headers, timeout=CHECK_TIMEOUT_S, max_bytes=CHECK_MAX_BYTES)
            response = await current_transport().send(check)
        except TransportError:
            return False
        return response.status == 200
