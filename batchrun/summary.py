"""The end of a job: the summary written to ``state/summary.json`` and shown to the person.

It says how the job ended (the exit code of reliability.md §6), what this run did and what the output
now holds, the latency, the endpoint's fate and the cost.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from batchrun.facts import ExitCode
from batchrun.progress import format_usd
from batchrun.stop import StopCause

__all__ = ["JobOutcome", "build_summary", "exit_code_for", "format_summary"]


@dataclass(slots=True)
class JobOutcome:
    """How a job ended: the exit code (reliability.md §6) and the summary written to summary.json."""

    exit_code: ExitCode
    summary: dict[str, Any]


def exit_code_for(cause: StopCause | None, *, pending: int | None, failed: int) -> tuple[ExitCode, str]:
    """The exit code and the outcome's words."""
    if (cause is not None and cause.early) or pending:
        return ExitCode.STOPPED_EARLY, "stopped early"
    if failed:
        return ExitCode.ROWS_FAILED, "finished with failed rows"
    return ExitCode.OK, "finished, every row succeeded"


def build_summary(
    *,
    job: str,
    started_wall: float,
    wall_s: float,
    rows: dict[str, Any],
    dispatch: dict[str, Any],
    endpoint: dict[str, Any],
    cost: dict[str, Any],
    output: str,
    cause: StopCause | None,
    samples: int = 1,
) -> dict[str, Any]:
    """The summary as summary.json holds it. With ``samples`` > 1, row counts are (id, sample) units."""
    done = rows["ok"] + rows["failed"]
    pending = rows.get("pending")
    failed_total = rows["total_failed"]
    exit_code, outcome = exit_code_for(cause, pending=pending, failed=failed_total)
    stop_reason = cause.detail if cause is not None and cause.early else None
    if exit_code == ExitCode.STOPPED_EARLY and stop_reason is None:  # an early stop always says why
        stop_reason = (f"{pending} row(s) of the input have no record in the output after this run, though "
                       "nothing stopped it: run the same command again to resume them")
    return {
        "job": job,
        "outcome": outcome,
        "exit_code": int(exit_code),  # a plain number in summary.json
        "started_at": dt.datetime.fromtimestamp(started_wall, dt.UTC).isoformat(),
        "wall_s": round(wall_s, 3),
        "rows": rows,
        "samples_per_row": samples,
        "throughput_rows_per_s": round(done / wall_s, 2) if wall_s > 0 else 0.0,
        **dispatch,
        "endpoint": endpoint,
        "cost": cost,
        "output": output,
        "stop_reason": stop_reason,
        "stop_kind": cause.reason.value if cause is not None else None,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-job summary as a few readable lines (the same figures as summary.json)."""
    rows = summary["rows"]
    lines = [
        f"job {summary['job']}: {summary['outcome']}",
        f"  this run: {rows['ok']} ok, {rows['failed']} failed, {rows['skipped']} skipped (finished by earlier runs)"
        + (f", {rows['pending']} not yet run" if rows.get("pending") else ""),
    ]
    if summary.get("samples_per_row", 1) > 1:
        n = summary["samples_per_row"]
        lines.append(f"  {n} samples per row: the counts are samples, each an (id, sample) pair")
    if "total_ok" in rows:
        retryable = rows.get("total_failed_retryable") or 0
        lines.append(
            f"  the output holds: {rows['total_ok']} ok, {rows['total_failed']} failed"
            + (f" ({retryable} retryable: run again to retry them)" if retryable else "")
        )
    tokens = f", {summary['output_tokens']} output tokens" if summary.get("output_tokens") else ""
    lines.append(f"  wall {summary['wall_s']:.1f}s, {summary['throughput_rows_per_s']:.1f} rows/s{tokens}")
    lat = summary.get("latency_s") or {}
    if lat.get("p50") is not None:
        lines.append(f"  latency p50 {lat['p50']:.3f}s, p95 {lat['p95']:.3f}s; retries {summary['retries']}")
    endpoint = summary.get("endpoint") or {}
    action = endpoint.get("final_action")
    if action and action != "none":
        said = {"pause": "paused", "scale-to-zero": "scaled to zero", "keep": "left running"}.get(action, action)
        lines.append(f"  endpoint: {endpoint.get('ref', '')} {said}")
    if endpoint.get("note"):
        lines.append(f"  note: {endpoint['note']}")
    if endpoint.get("endpoints"):  # several endpoints: each one's share
        from batchrun.endpoints.endpoint_shares import format_shares

        lines.extend(format_shares(endpoint["endpoints"]))
    cost = summary.get("cost") or {}
    if cost.get("usd") is not None:
        job = f"; {format_usd(cost['job_usd'])} over the job's runs" if cost.get("job_usd") is not None else ""
        if cost.get("images"):  # a provider's text-to-image, billed per image
            billed = f"{cost['images']} images"
        elif cost.get("token_usd") is not None and not cost.get("replica_hours"):  # billed per token
            billed = f"{cost.get('prompt_tokens', 0)} prompt + {cost.get('completion_tokens', 0)} completion tokens"
        else:
            billed = f"{cost['replica_hours']:.3f} replica-hours"
        lines.append(f"  cost: {format_usd(cost['usd'])} ({billed}){job}")
    if cost.get("saved_usd"):  # batch (or flex) answers, below the online price
        lines.append(f"  saved by batch/flex mode: {format_usd(cost['saved_usd'])} against the online price")
    batches = summary.get("batches") or {}
    if batches.get("submitted") or batches.get("collected"):
        lines.append(f"  batches: {batches['submitted']} submitted, {batches['collected']} collected, "
                     f"{batches.get('sent_again', 0)} rows sent again, {batches.get('online', 0)} answered online")
    lines.extend(_provenance_lines(summary))
    output = summary.get("output")
    if output:
        lines.append(f"  output: {output}")
    if summary.get("stop_reason"):
        hint = "run the same command again to resume"
        if summary.get("stop_kind") == "budget":
            hint = "raise budget.max_usd, then run the same command again to resume"
        elif summary.get("stop_kind") == "auth":
            hint = "fix the token, then run the same command again to resume"
        lines.append(f"  stopped: {summary['stop_reason']} ({hint})")
    return "\n".join(lines)


def _provenance_lines(summary: dict[str, Any]) -> list[str]:
    """What ran (model at revision, a redeploy seen mid-run) and the scores, when the summary has them."""
    lines = []
    provenance = summary.get("provenance") or {}
    if provenance.get("revision"):
        moved = "; the revision changed during the run" if provenance.get("revision_changes") else ""
        lines.append(f"  model: {provenance.get('model')} at revision {str(provenance['revision'])[:12]}{moved}")
    scores = summary.get("scores") or {}
    if scores.get("columns"):
        means = ", ".join(f"{name} {figure['mean']:.3f}" for name, figure in scores["columns"].items()
                          if figure.get("mean") is not None)
        errors = f"; {scores['errors']} row(s) whose scorer raised" if scores.get("errors") else ""
        lines.append(f"  scores (mean): {means or 'none yet'}{errors}")
    return lines
