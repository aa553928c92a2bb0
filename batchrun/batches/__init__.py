"""Provider batch APIs under the same exactly-once output: ``endpoint: {url, model, api_key_env, mode: batch}``.

    ledger.py       state/batches/: each batch's rows and how far it got, fsynced before anything waits on it
    api.py          BatchApi: files and batches of an OpenAI-compatible API, through the one transport
    dispatcher.py   BatchDispatcher: settle, submit, poll, collect; the deadline's fallback online

The runner chooses this path by the target's mode (:func:`uses_batches`), and also whenever the output
holds batches not ended (a job switched from batch to online): those are cancelled, what they finished
is collected, and the rest goes online. Rows in a batch not ended are pending for nothing else
(:func:`held_rows`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from batchrun.batches.api import TERMINAL, BatchApi, BatchApiError
from batchrun.batches.dispatcher import BATCH_EXPIRED, BatchDispatcher, HeldRows
from batchrun.batches.ledger import BatchLedger, Intent, Member

if TYPE_CHECKING:
    from batchrun.endpoints.base import DataPlane
    from batchrun.records import Row, RowFailure, RowResult

__all__ = [
    "BATCH_EXPIRED",
    "TERMINAL",
    "BatchApi",
    "BatchApiError",
    "BatchDispatcher",
    "BatchLedger",
    "HeldRows",
    "Intent",
    "Member",
    "batch_dispatcher",
    "describe_batches",
    "held_rows",
    "uses_batches",
]


def uses_batches(spec: Any) -> bool:
    """Whether the job's target is used through its batch API."""
    return spec.endpoint.mode == "batch" and len(spec.all_endpoints) == 1


def held_rows(store: Any, done: Any) -> HeldRows:
    """The output's done-set, with the rows of batches not ended held out of the pending rows."""
    return HeldRows(done, BatchLedger(store.state_dir).held_positions())


def describe_batches(store: Any) -> str | None:
    """What ``batchrun status`` says of the output's batches: submitted, still running, ended and their rows."""
    ledger = BatchLedger(store.state_dir)
    running = [i for i in ledger.open_intents() if i.batch_id is not None]
    ended = ledger.ended_counts()
    submitted = len(running) + sum(batches for batches, _ in ended.values())
    if not submitted:
        return None
    rows = sum(i.rows for i in running) + sum(rows for _, rows in ended.values())
    parts = [f"{submitted} submitted ({rows} rows)",
             f"{len(running)} in progress ({sum(i.rows for i in running)} rows)"]
    parts += [f"{count} {status} ({held} rows)" for status, (count, held) in sorted(ended.items())]
    note = "; the next run collects those in progress" if running else ""
    return "batches: " + ", ".join(parts) + note


def batch_dispatcher(
    pre: Any,  # the run's Preflight (a layer above)
    plane: DataPlane,
    *,
    store: Any,
    done: Any,
    on_record: Callable[[RowResult | RowFailure], None],
    commit: Any,
    kept_columns: Callable[[Row], dict[str, Any]],
    started_at: float,
    echo: Callable[[str], None],
    online_now: bool = False,
) -> BatchDispatcher:
    """The job's batch path. ``online_now``: the job runs online, so batches left by an earlier run are
    cancelled and collected at once and the rest goes online."""
    from batchrun.batches.api import BatchApi
    from batchrun.spec._model import BatchSpec

    spec = pre.spec
    settings = spec.endpoint.batch or BatchSpec()
    fallback_at = started_at if online_now else None
    if not online_now and settings.fallback_online_after is not None and spec.budget.deadline is not None:
        fallback_at = started_at + spec.budget.deadline - settings.fallback_online_after
    return BatchDispatcher(
        api=BatchApi(plane), ledger=BatchLedger(store.state_dir), task=pre.task, model=plane.model,
        job=str(pre.fingerprint)[:64], done=done, on_record=on_record, commit=commit, kept_columns=kept_columns,
        max_requests=settings.max_requests, max_bytes=settings.max_bytes, poll_every_s=settings.poll_every,
        max_attempts=spec.retries.max_attempts, route_name=pre.pool.route_name(), fallback_at=fallback_at,
        echo=echo, clock=time.monotonic,
    )
