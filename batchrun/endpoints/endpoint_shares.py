"""Each endpoint's share of a job with several: for the summary (rows, 429s, latency, cost, lifecycle) and,
while the job runs, for the progress display (rows, in flight under its own limit, 429s, drained or not ready)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchrun.endpoints.pool import EndpointPool
from batchrun.errors import AuthError, EndpointError
from batchrun.progress import EndpointProgress
from batchrun.routing import Route

__all__ = ["endpoint_shares", "format_shares", "live_shares"]


def live_shares(pool: EndpointPool, routes: Sequence[Route]) -> tuple[EndpointProgress, ...]:
    """Each endpoint's figures now, in the spec's order; ``routes`` are the dispatcher's. Read twice a
    second by the progress display: it only reads counters."""
    by_name = {route.name: route for route in routes}
    shares = []
    for member in pool.members:
        route = by_name.get(member.name)
        if route is None:  # not sending yet: still starting, or it could not start
            if member.error is None and not member.released:
                shares.append(EndpointProgress(member.name, state="starting"))
            else:
                shares.append(EndpointProgress(member.name, state="unused", reason=_reason(member.error)))
            continue
        limit = route.limit
        drained = route.drained or (member.error if member.drained else None)
        shares.append(EndpointProgress(
            member.name, rows=route.ok, in_flight=limit.in_flight, limit=limit.limit, throttled=route.throttled,
            state="live" if drained is None else "drained", reason=None if drained is None else _reason(drained),
        ))
    return tuple(shares)


def _reason(error: BaseException | None) -> str | None:
    """Why an endpoint takes no requests, in a status or a word: ``401``, ``failed``, ``paused``."""
    if isinstance(error, AuthError) and error.status is not None:
        return str(error.status)
    if isinstance(error, EndpointError) and error.state:
        return error.state
    return None


def endpoint_shares(pool: EndpointPool, routes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per endpoint, in the spec's order; ``routes`` are the dispatcher's figures by name."""
    shares = []
    for member in pool.members:
        meter = member.endpoint.meter
        record = member.endpoint.record
        share: dict[str, Any] = {"name": member.name, "ref": member.endpoint.ref,
                                 "rows_ok": 0, "http_429": 0, "latency_mean_s": None}
        share.update(routes.get(member.name, {}))
        share.update(final_action=record.final_action, replica_hours=round(meter.replica_seconds / 3600, 6),
                     usd=meter.usd)
        if record.acquired_at is not None and record.ready_at is not None:
            share["ready_wait_s"] = round(record.ready_at - record.acquired_at, 3)
        if member.error is not None and "drained" not in share:
            share["not_used"] = str(member.error)
        shares.append(share)
    return shares


def format_shares(shares: list[dict[str, Any]]) -> list[str]:
    """The lines a person reads: one per endpoint."""
    total = sum(share["rows_ok"] for share in shares) or 1
    lines = []
    for share in shares:
        latency = share.get("latency_mean_s")
        usd = share.get("usd")
        parts = [f"{share['rows_ok']} rows ({100 * share['rows_ok'] / total:.0f}%)", f"{share['http_429']} 429s"]
        if latency is not None:
            parts.append(f"mean latency {latency * 1000:.0f} ms")
        if usd is not None:
            parts.append(f"${usd:.4f}")
        if share.get("drained"):
            parts.append(f"drained: {share['drained']}")
        elif share.get("not_used"):
            parts.append(f"not used: {share['not_used']}")
        lines.append(f"  {share['name']}: " + ", ".join(parts))
    return lines
