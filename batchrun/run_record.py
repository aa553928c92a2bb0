"""Each run's own folder and record, on every run (not only nightly ones); kept out of runner.py so that
it only orders the steps.

    this_run     a templated output.path ({date}, {time}, {run_id}) becomes this run's own folder
    start_run    the run's provenance: its id, the endpoint's model and revision, the parameters sent
    job_fields   what state/job.json adds: run_id, provenance
    finish_run   the end time, revision changes and score aggregates into the summary and job.json
    after_run    the comparison with a previous run (when asked) and the webhook notification
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchrun.errors import BatchrunError, register_secret
from batchrun.provenance import RunProvenance, endpoint_fields, now_iso, resolve_output, sent_parameters
from batchrun.spec import JobSpec

if TYPE_CHECKING:
    from batchrun.output import OutputStore
    from batchrun.preflight import Preflight
    from batchrun.tally import Tally

__all__ = ["after_run", "finish_run", "job_fields", "start_run", "this_run"]


def this_run(spec: JobSpec) -> tuple[JobSpec, str]:
    """The spec with this run's output folder, and the run's id (a new one; a resume keeps the stored id)."""
    path, run_id = resolve_output(spec.output.path)
    if path != spec.output.path:
        spec = dataclasses.replace(spec, output=dataclasses.replace(spec.output, path=path))
    if spec.notify is not None:
        register_secret(spec.notify.url())  # a webhook's url is its credential: scrubbed from job.json too
    return spec, run_id


async def start_run(pre: Preflight, run_id: str, tally: Tally, *, fresh: bool) -> RunProvenance:
    """This run's provenance, as far as preflight found it (the endpoint check, the first request)."""
    from batchrun.spec import per_row_job_seed

    stored = pre.stored_job or {}
    if not fresh and isinstance(stored.get("run_id"), str):
        run_id = stored["run_id"]  # a resume continues the same run
    run = RunProvenance(run_id=run_id)
    run.endpoint = endpoint_fields(pre.endpoint_check)
    if not run.endpoint.get("model") and isinstance(pre.identity.get("model"), str):
        run.endpoint.update(model=pre.identity["model"], revision=pre.identity.get("revision"))
    run.parameters = await asyncio.to_thread(sent_parameters, pre.spec, pre.source, pre.task)
    if per_row_job_seed(pre.spec.parameters.get("seed")) is not None or pre.spec.samples > 1:
        run.seed = "per-row"
    run.rows_done = lambda: int(tally.done)
    return run


def job_fields(pre: Preflight, stored_job: dict[str, Any] | None) -> dict[str, Any]:
    """What job.json records besides the spec: the run id and this run's provenance."""
    run = pre.run
    if run is None:
        return {}
    return {"run_id": run.run_id, "provenance": run.record(pre.fingerprint)}


async def finish_run(pre: Preflight, store: OutputStore, summary: dict[str, Any]) -> None:
    """The end time, revision changes and scores join the summary; job.json gets the final provenance."""
    run = pre.run
    if run is None:
        return
    run.ended_at = now_iso()
    summary["provenance"] = run.record(pre.fingerprint)
    scoring = getattr(pre.task, "scoring", None)
    if scoring is not None:
        summary["scores"] = await asyncio.to_thread(_score_figures, store.root, scoring)
    with contextlib.suppress(BatchrunError, OSError):
        job = await asyncio.to_thread(store.load_job) or {}
        job.update(job_fields(pre, job))
        await asyncio.to_thread(store.save_job, job)


def _score_figures(root: Any, scoring: Any) -> dict[str, Any]:
    from batchrun.runs import read_shards
    from batchrun.scoring import SCORE_ERROR_COLUMN, aggregate

    tables = read_shards(root, "data", columns=[*scoring.columns, SCORE_ERROR_COLUMN])
    figures = aggregate(tables, scoring.columns)
    figures["errors_this_run"] = scoring.errors
    return figures


async def after_run(pre: Preflight, summary: dict[str, Any], *, compare_with: str | None,
                    echo: Callable[[str], None]) -> None:
    """Compare with an earlier run when asked, then post the notification. Neither changes the exit code."""
    verdict = None
    if compare_with is not None:
        from batchrun.compare import compare_runs, find_previous

        try:
            other = find_previous(summary["output"]) if compare_with == "previous" else compare_with
            if other is None:
                echo("compare: no previous run to compare with")
            else:
                report = await asyncio.to_thread(compare_runs, other, summary["output"])
                verdict = report.verdict()
                echo(f"compare with {other}: {verdict['verdict']}")
        except BatchrunError as exc:
            echo(f"compare: {exc}")
    if pre.spec.notify is not None:
        from batchrun.notify import build_payload, post_notification

        await post_notification(pre.spec.notify, build_payload(summary, verdict), echo=echo)
