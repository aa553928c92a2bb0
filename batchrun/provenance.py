"""What produced an output: every run records its model, revision, parameters, seeds and times.

Three places carry the same record, so that any one of them answers "what exactly ran?":

    state/job.json     ``run_id`` (the folder's, kept across resumes) and ``provenance`` (the last run's)
    summary.json       ``provenance``, with the end time and any revision change seen during the run
    every Parquet file key-value metadata ``batchrun`` (version, fingerprint, model, revision, ...)

The model and revision come from the endpoint check: the control plane for Dedicated endpoints (and
the built-in emulator), TGI's ``GET /info`` for a plain url. During the run, ``GET /info`` is asked
again every ``revision_poll_s`` and once at the end: a redeploy mid-run is noted with the rows
finished on each side of it (:class:`RevisionWatch`).

An ``output.path`` may hold ``{date}``, ``{time}`` and ``{run_id}``: each run then gets a folder of
its own (:func:`resolve_output`); ``--output DIR`` or ``--resume RUN`` picks a killed run to resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchrun.endpoints import DataPlane, EndpointCheck
    from batchrun.sources import Source
    from batchrun.spec import JobSpec
    from batchrun.tasks import Task

log = logging.getLogger(__name__)

__all__ = ["RevisionWatch", "RunProvenance", "has_template", "new_run_id", "resolve_output", "watch_revision"]

_PLACEHOLDER = re.compile(r"\{(date|time|run_id)\}")
#: How often the served revision is asked during a run (seconds); the end of the run asks once more.
REVISION_POLL_S = 30.0


def has_template(path: str) -> bool:
    """Whether ``path`` names a folder per run (``{date}``, ``{time}`` or ``{run_id}``)."""
    return bool(_PLACEHOLDER.search(path))


def new_run_id(now: dt.datetime | None = None) -> str:
    """A run id that sorts by time and never repeats: ``20260115-020000-a3f9``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def fill_template(path: str, run_id: str, now: dt.datetime) -> str:
    """``path`` with ``{date}`` (2026-01-15), ``{time}`` (020000) and ``{run_id}`` filled (UTC)."""
    values = {"date": f"{now:%Y-%m-%d}", "time": f"{now:%H%M%S}", "run_id": run_id}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], path)


def template_root(path: str) -> Path:
    """The folder above the first placeholder: where every run of a templated path lives."""
    head = path[: _PLACEHOLDER.search(path).start()] if has_template(path) else path  # type: ignore[union-attr]
    return Path(head.rsplit("/", 1)[0] if "/" in head else ".")


def resolve_output(path: str, *, resume: str | None = None, now: dt.datetime | None = None) -> tuple[str, str]:
    """The folder and run id of this run of a spec whose ``output.path`` is ``path``.

    Without placeholders the folder is ``path``. With them, a new run gets a new folder; ``resume``
    (a folder, or a run id found in a job.json under the template's root) picks an earlier run.
    """
    from batchrun.errors import OutputError

    now = now or dt.datetime.now(dt.UTC)
    if resume is not None:
        folder = Path(resume)
        if (folder / "state" / "job.json").is_file():
            return str(folder), _stored_run_id(folder) or new_run_id(now)
        for job in sorted(template_root(path).glob("**/state/job.json")):
            if _stored_run_id(job.parent.parent) == resume:
                return str(job.parent.parent), resume
        raise OutputError(f"--resume {resume}: no run with that folder or run id under {template_root(path)}")
    if not has_template(path):
        return path, new_run_id(now)
    run_id = new_run_id(now)
    return fill_template(path, run_id, now), run_id


def _stored_run_id(folder: Path) -> str | None:
    from batchrun.output.files import read_json

    with contextlib.suppress(Exception):
        job = read_json(folder / "state" / "job.json") or {}
        value = job.get("run_id")
        return value if isinstance(value, str) else None
    return None


# --------------------------------------------------------------------------- the record


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(slots=True)
class RevisionSegment:
    """A stretch of the run during which the endpoint served one revision."""

    revision: str | None
    seen_at: str
    rows_before: int  # rows finished when this revision was first seen

    def record(self) -> dict[str, Any]:
        return {"revision": self.revision, "seen_at": self.seen_at, "rows_before": self.rows_before}


@dataclass(slots=True)
class RunProvenance:
    """What this run of the job is, filled in as it learns it: the endpoint, the parameters, the times."""

    run_id: str
    started_at: str = field(default_factory=now_iso)
    ended_at: str | None = None
    endpoint: dict[str, Any] = field(default_factory=dict)  # model, revision, hardware, image, server_version
    parameters: dict[str, Any] = field(default_factory=dict)  # as sent with the first row
    seed: str | None = None  # "per-row" when each row has its own seed (stored in the seed column)
    segments: list[RevisionSegment] = field(default_factory=list)
    rows_done: Callable[[], int] = field(default=lambda: 0, repr=False)

    def metadata(self) -> dict[str, Any]:
        """The fields every Parquet file of this run carries (besides version, fingerprint, model, revision)."""
        record = {"run_id": self.run_id, "started_at": self.started_at, "parameters": self.parameters}
        record.update({k: v for k, v in self.endpoint.items() if k in ("hardware", "image", "server_version") and v})
        return record

    def record(self, fingerprint: str | None = None) -> dict[str, Any]:
        """The record job.json and summary.json hold."""
        from batchrun import __version__

        out: dict[str, Any] = {
            "run_id": self.run_id,
            "batchrun_version": __version__,
            "fingerprint": fingerprint,
            **{k: self.endpoint.get(k) for k in ("model", "revision", "hardware", "image", "server_version")},
            "parameters": self.parameters,
            "seed": self.seed,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
        }
        if len(self.segments) > 1:
            out["revision_changes"] = self.revision_changes()
        return out

    def revision_changes(self) -> list[dict[str, Any]]:
        """Each revision served during the run, with the rows finished under it (approximately: rows in
        flight when the change was seen may have been answered by either side)."""
        total = self.rows_done()
        changes = []
        for i, segment in enumerate(self.segments):
            end = self.segments[i + 1].rows_before if i + 1 < len(self.segments) else total
            changes.append({**segment.record(), "rows": max(0, end - segment.rows_before)})
        return changes

    def saw(self, revision: str | None) -> bool:
        """Note the revision seen now; True when it differs from the last one seen."""
        if revision is None:
            return False
        if self.segments and self.segments[-1].revision == revision:
            return False
        self.segments.append(RevisionSegment(revision, now_iso(), self.rows_done()))
        return len(self.segments) > 1


def endpoint_fields(check: EndpointCheck | None) -> dict[str, Any]:
    """model, revision, hardware, image and server version from an EndpointCheck (None where unknown)."""
    if check is None:
        return {}
    details: Mapping[str, Any] = check.details or {}
    return {
        "model": check.model,
        "revision": check.revision,
        "hardware": details.get("instance"),
        "image": details.get("image"),
        "server_version": details.get("version"),
    }


_PROMPT_KEYS = ("inputs", "messages", "prompt", "input")


def sent_parameters(spec: JobSpec, source: Source, task: Task) -> dict[str, Any]:
    """Every parameter the first row's request carries, the prompt left out (it is the row's, not the job's).

    Read from a real prepared request, so that defaults a task adds (a token limit, a response format)
    are recorded as sent; the per-row seed shows as the spec gave it (``per-row``).
    """
    from batchrun.errors import BatchrunError

    params: dict[str, Any] = dict(spec.parameters)
    with contextlib.suppress(BatchrunError, StopIteration, ValueError, KeyError, TypeError):
        batch = next(iter(source.batches(batch_size=1)))
        payload = task.prepare(batch[0]).payload
        nested = payload.get("parameters")
        top = {k: v for k, v in payload.items() if k not in (*_PROMPT_KEYS, "parameters")}
        params = {**top, **(nested if isinstance(nested, Mapping) else {})}
        if "seed" in spec.parameters and isinstance(spec.parameters["seed"], str):
            params["seed"] = spec.parameters["seed"]
    return params


# --------------------------------------------------------------------------- during the run


class RevisionWatch:
    """Asks the endpoint's ``GET /info`` which revision it serves, every ``interval_s`` and at the end."""

    def __init__(self, plane: DataPlane, run: RunProvenance, *, interval_s: float = REVISION_POLL_S,
                 echo: Callable[[str], None] = print) -> None:
        self.plane = plane
        self.run = run
        self.interval_s = interval_s
        self.echo = echo
        self.works = True  # False once the server shows it has no /info (a toolkit, vLLM, ...)

    async def ask(self) -> str | None:
        """The revision served now, or None when it cannot be told."""
        from batchrun.transport import read_info

        if not self.works:
            return None
        plane = self.plane
        answer = await read_info(plane.url, token=plane.token, send_token=getattr(plane, "send_token", False),
                                 headers=plane.headers)
        if answer.status == 404:
            self.works = False
            return None
        info = answer.document
        if info is None:
            log.info("revision_check_failed %s", answer.reason)
            return None
        if isinstance(info.get("version"), str) and not self.run.endpoint.get("server_version"):
            self.run.endpoint["server_version"] = info["version"]  # TGI's version, as /info says it
        sha = info.get("model_sha")
        return sha if isinstance(sha, str) else None

    async def check(self) -> None:
        """Ask once; a change is said now and noted for the summary."""
        revision = await self.ask()
        before = self.run.segments[-1].revision if self.run.segments else None
        if self.run.saw(revision):
            self.echo(f"endpoint: the served revision changed from {before} to {revision} "
                      f"after {self.run.segments[-1].rows_before} rows (a redeploy?)")
            self.run.endpoint["revision_at_end"] = revision

    async def run_forever(self) -> None:
        while self.works:
            await asyncio.sleep(self.interval_s)
            await self.check()


@contextlib.asynccontextmanager
async def watch_revision(run: RunProvenance | None, plane: DataPlane, *, interval_s: float,
                         echo: Callable[[str], None]) -> AsyncIterator[None]:
    """Follow the served revision while the body runs; ask once more at its end (not when cancelled).

    Only when the endpoint check named a revision: a server that does not say it (no TGI ``/info``,
    a text-to-image toolkit) is not asked again, so that it sees no request beyond the job's own.
    """
    if run is None or not run.endpoint.get("revision"):
        yield
        return
    watch = RevisionWatch(plane, run, interval_s=interval_s, echo=echo)
    if not run.segments:
        run.saw(run.endpoint.get("revision"))
    task = asyncio.create_task(watch.run_forever(), name="revision-watch")
    try:
        yield
        await watch.check()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
