"""The progress display: the periodic line (and the bar) a person reads while a job runs.

A job with one endpoint shows the summed figures it always showed; a job with several adds each
endpoint's share: its rows, in flight under its own limit, its 429s, drained or not ready yet.
"""

from __future__ import annotations

import asyncio
import io
from types import SimpleNamespace

from batchrun.endpoints import DataPlane
from batchrun.endpoints.endpoint_shares import live_shares
from batchrun.errors import AuthError, EndpointError
from batchrun.progress import EndpointProgress, ProgressReporter, Snapshot
from batchrun.routing import Route


def line_for(snap: Snapshot, *, total: int | None = 2000, elapsed: float = 10.0) -> str:
    """The one progress line the reporter prints for ``snap``, ``elapsed`` seconds into the job."""
    stream = io.StringIO()
    times = iter([0.0, elapsed])
    reporter = ProgressReporter(lambda: snap, total=total, mode="lines", stream=stream, clock=lambda: next(times))
    reporter.refresh()
    reporter.close()
    (line,) = stream.getvalue().splitlines()
    return line


FIGURES = {"done": 1072, "ok": 1070, "failed": 2, "retries": 5, "in_flight": 56, "limit": 64, "output_tokens": 1000}


def test_a_job_with_one_endpoint_prints_the_summed_line_it_always_printed():
    assert line_for(Snapshot(**FIGURES)) == (
        "progress: 1072/2000 rows, 107.2 rows/s, eta 8s, tok/s 100, inflight 56, limit 64, retries 5, failed 2"
    )


def test_a_job_with_several_endpoints_adds_each_ones_rows_share_in_flight_429s_and_state():
    endpoints = (
        EndpointProgress("a", rows=812, in_flight=40, limit=48, throttled=3),
        EndpointProgress("b", rows=260, in_flight=16, limit=16),
        EndpointProgress("c", state="drained", reason="401"),
        EndpointProgress("d", rows=0, state="starting"),
    )
    line = line_for(Snapshot(**FIGURES, endpoints=endpoints))
    summed, *parts = line.split(" | ")
    assert summed == line_for(Snapshot(**FIGURES))  # the summed figures come first, unchanged
    assert parts == [
        "a: 812 rows 76% inflight 40/48 429s 3",
        "b: 260 rows 24% inflight 16/16",
        "c: drained (401)",
        "d: not ready",
    ]


def test_a_drained_endpoint_keeps_the_rows_it_answered_and_shows_its_last_requests_out():
    endpoints = (
        EndpointProgress("steady", rows=90, in_flight=8, limit=8),
        EndpointProgress("failing", rows=10, in_flight=2, throttled=1, state="drained", reason="failed"),
        EndpointProgress("broken", state="unused", reason="failed"),
    )
    parts = line_for(Snapshot(**FIGURES, endpoints=endpoints)).split(" | ")[1:]
    assert parts == ["steady: 90 rows 90% inflight 8/8", "failing: 10 rows 10% inflight 2 429s 1 drained (failed)",
                     "broken: not used (failed)"]


def test_the_bar_carries_a_short_share_per_endpoint_at_the_end_of_its_postfix():
    endpoints = (EndpointProgress("a", rows=3, in_flight=4, limit=6, throttled=2),
                 EndpointProgress("b", rows=1, in_flight=1, limit=2),
                 EndpointProgress("c", state="drained", reason="401"))
    stream = io.StringIO()
    reporter = ProgressReporter(lambda: Snapshot(**FIGURES, endpoints=endpoints), total=2000, mode="bar",
                                stream=stream)
    reporter.start()
    reporter.close()
    assert "failed=2, endpoints=a 75% 4/6 429s:2 | b 25% 1/2 | c drained]" in stream.getvalue()


def test_live_shares_read_each_routes_counters_and_each_members_state():
    async def scenario() -> tuple[EndpointProgress, ...]:
        def route(name: str) -> Route:
            return Route(DataPlane(url=f"http://127.0.0.1:9/{name}"), name=name, initial=8, maximum=16,
                         clock=lambda: 0.0)

        a, b = route("a"), route("b")
        a.ok, a.throttled = 30, 4
        for _ in range(3):
            await a.limit.acquire()
        b.ok = 10
        b.drain(AuthError("the endpoint b refused the token (HTTP 401)", status=401))
        members = [
            SimpleNamespace(name="a", error=None, drained=False, released=False),
            SimpleNamespace(name="b", error=None, drained=False, released=False),
            SimpleNamespace(name="late", error=None, drained=False, released=False),
            SimpleNamespace(name="broken", error=EndpointError("it failed", state="failed"), drained=False,
                            released=True),
        ]
        return live_shares(SimpleNamespace(members=members), [a, b])  # type: ignore[arg-type]

    shares = asyncio.run(scenario())
    assert shares == (
        EndpointProgress("a", rows=30, in_flight=3, limit=8, throttled=4),
        EndpointProgress("b", rows=10, in_flight=0, limit=16, state="drained", reason="401"),
        EndpointProgress("late", state="starting"),
        EndpointProgress("broken", state="unused", reason="failed"),
    )
