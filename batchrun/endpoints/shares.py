"""Each endpoint's share of a job with several, for the summary: rows, 429s, latency, cost, lifecycle."""

from __future__ import annotations

from typing import Any

from batchrun.endpoints.pool import EndpointPool

__all__ = ["endpoint_shares", "format_shares"]


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
