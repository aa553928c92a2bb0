"""Routes: one per endpoint a job sends to, each with its own concurrency limit and circuit breaker.

A job with one endpoint has one route; a job with several (``endpoint:`` as a list) has one per endpoint,
added as each becomes ready. The dispatcher's one retry loop asks :func:`pick` for a route before every
attempt, so routing is the only thing the number of endpoints changes:

    pick            the live route with the most free room under its limit (limit - in flight); a
                    retry avoids the route that just failed it while another one is live
    drain           an endpoint in trouble (failed, a refused token, errors past a threshold while the
                    others answer) takes no more requests; its rows are retried on the others

Each route is a lane: its rate gate (:class:`~batchrun.rate.RateGate`: requests and tokens per window,
and the pause after a rate 429) is asked before a slot of its limit is taken, and a lane waiting on its
gate counts as full, so rows go to the others meanwhile. Each route does its own accounting
(:meth:`Route.record`: its limit, its breaker, its figures for the summary's per-endpoint shares), and
shows :func:`batchrun.retry.next_step` what the decision reads of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import yarl

from batchrun.breaker import CircuitBreaker
from batchrun.endpoints.base import DataPlane
from batchrun.errors import AuthError, BatchrunError, EndpointError, RequestFailed, redact, register_secret
from batchrun.limit import AdaptiveLimit
from batchrun.rate import RateGate
from batchrun.retry import Drain, Step, is_unavailable
from batchrun.tasks import PreparedRequest, join_url
from batchrun.tasks.base import dump_json
from batchrun.transport import Transport, auth_headers, current_transport, new_pool_key

__all__ = ["DRAIN_AFTER", "Route", "drain_error", "named", "outage_error", "pick"]

#: Consecutive unavailable answers (5xx, timeouts, refused connections) after which an endpoint is
#: drained, when another endpoint of the job answers meanwhile. A lone endpoint is never drained for
#: them: its circuit breaker and the outage timeout decide, as they always did.
DRAIN_AFTER = 20


class Route:
    """One endpoint as the dispatcher sees it: where to send, how much at once, and whether it is healthy."""

    def __init__(
        self,
        plane: DataPlane,
        *,
        name: str,
        initial: int,
        maximum: int,
        clock: Callable[[], float],
        excuses: Callable[[RequestFailed], bool] | None = None,
    ) -> None:
        url = yarl.URL(plane.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"the endpoint url must be an http(s) URL, got {redact(plane.url)!r}")
        if any(key.lower() == "authorization" for key in plane.headers):
            raise ValueError("the data plane's headers may not set Authorization: the token comes from huggingface_hub")
        self.name = name
        self.base_url = plane.url
        self.model = plane.model  # a serverless target's model, sent in every body
        self.limits = plane.limits  # its limits spec, for the lane's limiter
        self.token_name = plane.token_name  # an API's key, not the HF token: messages say which
        register_secret(plane.token)
        # The token goes only where it may (transport.token_problem): not to a host the spec did not opt in.
        auth = auth_headers(plane.url, plane.token, send_token=plane.send_token)
        self.has_token = bool(auth)
        self.token_withheld = bool(plane.token) and not auth  # a token the url may not receive
        self.headers: dict[str, str] = {"Content-Type": "application/json", **plane.headers, **auth}
        self.excuses = excuses
        self.limit = AdaptiveLimit(min(initial, maximum), maximum=maximum, clock=clock)
        self.gate = RateGate(plane.limits, clock=clock)
        self._clock = clock
        self.breaker = CircuitBreaker()
        self.breaker_changed = asyncio.Event()
        self.good_limit = self.limit.value  # the limit while the endpoint last answered well
        self.transport: Transport = current_transport()
        self.pool: str | None = None  # the route's connection pool in the transport, once opened
        self.drained: BatchrunError | None = None  # why it takes no more requests
        self._urls: dict[str, str] = {}
        # Figures for the summary's per-endpoint shares.
        self.ok = 0
        self.throttled = 0  # 429 answers
        self.latency_sum = 0.0
        self.unavailable_streak = 0
        self.throttled_since: float | None = None  # when its answers became nothing but 429s

    def record(self, failure: RequestFailed | None, latency: float, *, probe: bool, row: int, now: float) -> bool:
        """Count one attempt's outcome (``failure``, or None for an answer): the breaker, the limit, the
        figures. True when it is the DRAIN_AFTER-th unavailable answer in a row (drain it if others answer).
        When the breaker closes again, the limit goes back to where it was while the endpoint answered well.
        """
        unavailable = failure is not None and is_unavailable(failure)
        throttled = failure is not None and failure.status == 429
        self.note_answer(throttled=throttled, now=now)
        breaker = self.breaker
        if unavailable:
            self.unavailable_streak += 1
        else:
            self.unavailable_streak = 0
            if breaker.closed:
                self.good_limit = max(self.good_limit * 0.99, self.limit.value)
        if breaker.record(unavailable=unavailable, now=now, probe=probe, row=row):
            if breaker.closed:
                self.limit.raise_to(self.good_limit)
            self._wake()
        elif probe:  # a failed probe: the waiters look again at the next probe time
            self._wake()
        if failure is None:
            self.limit.on_success(latency)
            self.ok += 1
            self.latency_sum += latency
        elif throttled and self.drained is None:
            self.throttled += 1
        return unavailable and self.unavailable_streak >= DRAIN_AFTER

    def _wake(self) -> None:
        self.breaker_changed.set()
        self.breaker_changed.clear()

    # What the retry decision reads (batchrun.retry.EndpointView).

    @property
    def is_drained(self) -> bool:
        return self.drained is not None

    @property
    def succeeded(self) -> bool:
        """Whether any request to it succeeded in this run."""
        return self.ok > 0

    @property
    def suspects_outage(self) -> bool:
        return self.breaker.suspects_outage

    def excused(self, failure: RequestFailed) -> bool:
        """Whether the endpoint excuses ``failure`` (a 503 while a scaled-to-zero endpoint wakes up)."""
        return self.excuses is not None and self.excuses(failure)

    def note_answer(self, *, throttled: bool, now: float) -> None:
        """Remember whether the endpoint answers only 429s, and since when (any other outcome ends that)."""
        if not throttled:
            self.throttled_since = None
        elif self.throttled_since is None:
            self.throttled_since = now

    def throttled_for(self, now: float) -> float:
        """How long the endpoint has answered nothing but 429s (0 when its last answer was another)."""
        return 0.0 if self.throttled_since is None else now - self.throttled_since

    def __repr__(self) -> str:
        return f"Route({self.name!r}, limit={self.limit.limit}, in_flight={self.limit.in_flight})"

    def url(self, request: PreparedRequest) -> str:
        url = self._urls.get(request.path)
        if url is None:
            path = request.path
            if self.model is not None and path.startswith("/v1/"):  # a serverless base is the API's, /v1 included
                path = path[len("/v1"):]
            url = self._urls[request.path] = join_url(self.base_url, path)
        return url

    def body(self, request: PreparedRequest, body: bytes) -> bytes:
        """The body to send here: ``body`` (the request's payload, dumped once per row), with this route's
        model in place of the task's where the target names one."""
        if self.model is None or request.payload.get("model") == self.model:
            return body
        return dump_json({**request.payload, "model": self.model})

    def room(self) -> int:
        """Free slots under the limit now; a route whose breaker is not closed, or that waits on its rate gate
        (a pause after a 429, a spent window), counts as full."""
        if not self.breaker.closed:
            return -2 * self.limit.controller.maximum - 1
        if not self.gate.idle and not self.gate.ready(self._clock()):
            return -self.limit.controller.maximum - 1
        return self.limit.limit - self.limit.in_flight

    def open_session(self, connections: int) -> str:
        """The route's own connection pool in the transport (its headers, ``connections`` connections
        at most, kept alive), made once the loop runs. Returns the pool's key."""
        if self.pool is None:
            self.pool = new_pool_key(self.name)
        self.transport.open_pool(self.pool, headers=self.headers, connections=connections)
        return self.pool

    async def close(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            await self.transport.close_pool(pool)

    def drain(self, error: BatchrunError) -> bool:
        """Take no more requests; True the first time. Waiters for a slot or the breaker are woken so
        they pick another route."""
        if self.drained is not None:
            return False
        self.drained = error
        self.limit.raise_to(float(self.limit.controller.maximum))
        self._wake()
        return True

    def figures(self) -> dict[str, object]:
        """This route's share, for the summary."""
        mean = self.latency_sum / self.ok if self.ok else None
        info: dict[str, object] = {"rows_ok": self.ok, "http_429": self.throttled,
                                "latency_mean_s": None if mean is None else round(mean, 4)}
        if self.drained is not None:
            info["drained"] = str(self.drained)
        return info


def pick(routes: list[Route], avoid: Route | None = None) -> Route | None:
    """The live route with the most free room; ``avoid`` only when no other route is live. None: none is."""
    best: Route | None = None
    best_room = 0
    for route in routes:
        if route.drained is not None or route is avoid:
            continue
        room = route.room()
        if best is None or room > best_room:
            best, best_room = route, room
    if best is None and avoid is not None and avoid.drained is None:
        return avoid
    return best


# --------------------------------------------------------------------------- why an endpoint is drained


def named(route: Route, *, alone: bool) -> str:
    """How a message names the endpoint: "the endpoint " ``alone``, or with its name among several."""
    return "the endpoint " if alone else f"the endpoint {route.name} "


def drain_error(route: Route, step: Step, failure: RequestFailed, *, alone: bool,
                outage_timeout_s: float) -> BatchrunError:
    """Why the endpoint is drained, in words, for a :attr:`~batchrun.retry.Step.drain`."""
    if step.drain is Drain.AUTH:
        assert failure.status is not None
        return _auth_error(route, failure.status, alone=alone)
    if step.drain is Drain.PAUSED:
        return _paused_error(route, failure, alone=alone)
    if step.drain is Drain.MISSING_ROUTE:
        return EndpointError(
            f"{named(route, alone=alone)}at {redact(route.base_url)} has no such route ({failure.message}): that "
            "is the url's fault, not the rows'. Check endpoint.url (its path, http or https), then run the job "
            "again: the rows not done are kept for the next run.",
            state="not_found",
        )
    if step.drain is Drain.UNREACHED:
        return outage_error(route, "has not answered", step.for_s, why="connections refused; ", alone=alone,
                            outage_timeout_s=outage_timeout_s)
    return outage_error(route, "has answered only 429 (too many requests)", step.for_s, alone=alone,
                        outage_timeout_s=outage_timeout_s)


def outage_error(route: Route, what: str, for_s: float, *, why: str = "", state: str = "unavailable",
                 alone: bool, outage_timeout_s: float) -> EndpointError:
    """The endpoint ``what`` (has not answered, ...) for ``for_s``, past outage_timeout: it is drained, and
    the rows not done wait for the next run (or go to another endpoint)."""
    return EndpointError(
        f"{named(route, alone=alone)}{what} for {for_s:.0f}s ({why}outage_timeout {outage_timeout_s:g}s); "
        "the rows not done are kept for the next run",
        state=state,
    )


def _paused_error(route: Route, failure: RequestFailed, *, alone: bool) -> EndpointError:
    """The endpoint answered that it is paused: how to resume it."""
    return EndpointError(
        f"{named(route, alone=alone)}answered that it is paused ({failure.message}). Resume it (for a Dedicated "
        "endpoint: `batchrun endpoint resume NAME --namespace NS`, or let batchrun manage it with "
        "endpoint.name), then run the job again: it continues where it stopped.",
        state="paused",
    )


def _auth_error(route: Route, status: int, *, alone: bool) -> AuthError:
    which = "" if alone else f" {route.name}"
    if route.has_token and route.token_name:
        message = (f"The endpoint{which} refused {route.token_name} (HTTP {status}): check it, then run the "
                   "job again.")
    elif route.has_token:
        message = (
            f"The endpoint{which} refused the token (HTTP {status}): it is invalid, expired, or cannot access "
            f"this endpoint. Set HF_TOKEN to a token with access, or run `hf auth login`."
        )
    elif route.token_withheld:
        message = (
            f"The endpoint{which} requires a token (HTTP {status}), and the Hugging Face token was not sent "
            "to it: it is not a Hugging Face host. If it should receive your token, set endpoint.send_token: "
            "true (https only)."
        )
    else:
        message = (
            f"The endpoint{which} requires a token (HTTP {status}) and none was found. "
            f"Set HF_TOKEN, or run `hf auth login`."
        )
    return AuthError(message, status=status)
