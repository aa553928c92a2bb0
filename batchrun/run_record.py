"""Each run's own folder and record, on every run (not only nightly ones); kept out of runner.py so that
it only orders the steps.

    this_run     a templated output.path ({date}, {time}, {run_id}) becomes this run's own folder
    start_run    the run's provenance: its id, the endpoint's model and revision, the parameters sent
    job_fields   what state/job.json adds: run_id, provenance
    finish_run   the end time, revision changes and score aggregates into the summary and job.json

The per-run extras are hooks (:class:`RunHook`) that the runner calls at three fixed points:
``started`` once preflight has passed, ``finished`` once the summary is built (before it is written),
``after`` once it is printed. :class:`RunRecord` keeps the provenance, :class:`Comparison` compares
with a previous run when asked, :class:`Notification` posts the webhook; the push is the runner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from batchrun.errors import AuthError, BatchrunError, register_secret
from batchrun.provenance import RunProvenance, endpoint_fields, now_iso, resolve_output, sent_parameters
from batchrun.spec import JobSpec
from batchrun.stop import StopReason

if TYPE_CHECKING:
    from batchrun.notify import NotifySpec
    from batchrun.output import OutputStore
    from batchrun.preflight import Preflight
    from batchrun.stop import Stop
    from batchrun.tally import Tally

__all__ = [
    "Comparison", "HubPush", "Notification", "RunFacts", "RunHook", "RunRecord", "finish_run", "job_fields",
    "start_run", "this_run",
]


class RunFacts(Protocol):
    """What a hook may read of the run (the runner's ``RunContext`` is one)."""

    @property
    def pre(self) -> Preflight: ...
    @property
    def tally(self) -> Tally: ...
    @property
    def stop(self) -> Stop: ...
    @property
    def echo(self) -> Callable[[str], None]: ...


class RunHook(Protocol):
    """An extra of the run, called by the runner at fixed points; none of them changes the exit code."""

    async def started(self, run: RunFacts) -> None:
        """Preflight has passed; the output is not open yet."""

    async def finished(self, run: RunFacts, store: OutputStore, summary: dict[str, Any]) -> None:
        """The summary is built (and may still gain fields); it is written next."""

    async def after(self, run: RunFacts, summary: dict[str, Any]) -> None:
        """The summary is written and printed; the output is closed and unlocked."""


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


class RunRecord:
    """The run's provenance: started from what preflight found, finished into the summary and job.json."""

    def __init__(self, run_id: str, *, fresh: bool) -> None:
        self.run_id = run_id
        self.fresh = fresh

    async def started(self, run: RunFacts) -> None:
        run.pre.run = await start_run(run.pre, self.run_id, run.tally, fresh=self.fresh)

    async def finished(self, run: RunFacts, store: OutputStore, summary: dict[str, Any]) -> None:
        await finish_run(run.pre, store, summary)

    async def after(self, run: RunFacts, summary: dict[str, Any]) -> None:
        pass


class Comparison:
    """``--compare``: the run compared with an earlier one; its verdict goes with the notification."""

    def __init__(self, compare_with: str | None) -> None:
        self.compare_with = compare_with
        self.verdict: dict[str, Any] | None = None

    async def started(self, run: RunFacts) -> None:
        pass

    async def finished(self, run: RunFacts, store: OutputStore, summary: dict[str, Any]) -> None:
        pass

    async def after(self, run: RunFacts, summary: dict[str, Any]) -> None:
        if self.compare_with is None:
            return
        from batchrun.compare import compare_runs, find_previous

        echo = run.echo
        try:
            other = find_previous(summary["output"]) if self.compare_with == "previous" else self.compare_with
            if other is None:
                echo("compare: no previous run to compare with")
            else:
                report = await asyncio.to_thread(compare_runs, other, summary["output"])
                self.verdict = report.verdict()
                echo(f"compare with {other}: {self.verdict['verdict']}")
        except BatchrunError as exc:
            echo(f"compare: {exc}")


class Notification:
    """``notify``: the webhook, posted once the run is over, with the comparison's verdict when there is one."""

    def __init__(self, notify: NotifySpec, comparison: Comparison | None = None) -> None:
        self.notify = notify
        self.comparison = comparison

    async def started(self, run: RunFacts) -> None:
        pass

    async def finished(self, run: RunFacts, store: OutputStore, summary: dict[str, Any]) -> None:
        pass

    async def after(self, run: RunFacts, summary: dict[str, Any]) -> None:
        from batchrun.notify import build_payload, post_notification

        verdict = self.comparison.verdict if self.comparison is not None else None
        await post_notification(self.notify, build_payload(summary, verdict), echo=run.echo)


class HubPush:
    """``output.push_to_hub``: a push at the end of the run and, with ``every``, during it.

    A push publishes only the shards the manifest lists (closed and committed), so one during the run
    never shows a half-written file. Pushes run on a thread, one at a time (the lock): the last one
    waits for one still in flight. A push that fails is said and the job goes on; its output is
    complete locally and ``batchrun push`` publishes it later.
    """

    def __init__(self, output: str, target: Any, every_s: float | None, echo: Callable[[str], None]) -> None:
        self.output = output
        self.target = target
        self.every_s = every_s
        self.echo = echo
        self._lock = threading.Lock()

    @classmethod
    def for_spec(cls, spec: JobSpec, echo: Callable[[str], None]) -> HubPush | None:
        push = spec.output.push_to_hub
        if push is None:
            return None
        from huggingface_hub import get_token

        from batchrun.publish import Target

        if not get_token():
            raise AuthError("output.push_to_hub needs a Hugging Face token with write access: set HF_TOKEN or run "
                            "`hf auth login` (nothing was run)")
        target = Target(repo=push.repo, config=push.config, split=push.split, private=push.private,
                        include_failed=push.include_failed, endpoint=push.endpoint)
        return cls(spec.output.path, target, push.every, echo)

    def _push(self) -> str:
        from batchrun.publish import push_output

        with self._lock:
            return push_output(self.output, self.target, echo=self.echo).describe()

    async def push(self, *, final: bool = False) -> None:
        try:
            self.echo(f"push: {await asyncio.to_thread(self._push)}")
        except BatchrunError as exc:
            later = f"; run `batchrun push {self.output} --repo {self.target.repo}` to publish it" if final else ""
            self.echo(f"error: push to the Hub failed: {exc}{later}")

    # The pusher is a run hook: the last push comes after the summary, unless the token was refused.
    async def started(self, run: RunFacts) -> None:
        pass

    async def finished(self, run: RunFacts, store: Any, summary: dict[str, Any]) -> None:
        pass

    async def after(self, run: RunFacts, summary: dict[str, Any]) -> None:
        cause = run.stop.cause
        if cause is not None and cause.reason is StopReason.AUTH:
            return  # nothing ran, or rows were saved and the run is resumable: no push either way
        await self.push(final=True)

    async def run_every(self) -> None:
        assert self.every_s is not None
        while True:
            await asyncio.sleep(self.every_s)
            await self.push()
