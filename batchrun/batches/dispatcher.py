"""A target in ``mode: batch``: pending rows go to the provider's batch API, and come back through the same sink.

What :meth:`BatchDispatcher.run` does, in order, each step durable before the next waits on it:

1. **settles** what an earlier run left (:class:`~batchrun.batches.ledger.BatchLedger`): files of batches
   already ended are removed (a kill between a batch's end and their removal), an intent never uploaded
   is dropped (its rows are pending again), a file with no batch id is looked for among the provider's
   batches by the ``metadata`` that names the job and the intent (a kill right after the create), and
   created only if none is found;
2. **submits** every pending row in input files of at most ``max_requests`` lines and ``max_bytes``,
   ``custom_id`` = the row's id (``id#sample`` with several samples);
3. **polls** every ``poll_every`` seconds, saying the batches' states when they change;
4. **collects** each batch as it ends: every output and error line becomes the row's one record, through
   the task's parse and answer hooks as an online answer would (``mode: batch``, the batch price); a
   request that failed retryably or expired goes into a later batch, within ``retries.max_attempts``.
   The records are committed before the batch is marked ended, and a row already committed is never
   recorded twice, so a kill at any instant neither loses nor repeats an answer.

Near ``budget.deadline`` (``fallback_online_after`` before it), batches still running are cancelled,
what they finished is collected, and the rest is sent online. A stop (Ctrl-C, SIGTERM) ends the polling
and leaves the batches running on the provider: they are paid for, and the next run collects them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from batchrun.batches.api import TERMINAL, BatchApi, BatchApiError
from batchrun.batches.ledger import BatchLedger, Intent, Member
from batchrun.errors import RequestFailed
from batchrun.records import FailureType, Row, RowFailure, RowResult, http_failure_type
from batchrun.retry import Verdict, classify
from batchrun.stop import Stop
from batchrun.tasks.base import PreparedRequest, Redraw, Task, answer_hooks, dump_json

__all__ = ["BATCH_EXPIRED", "BatchDispatcher", "HeldRows"]

logger = logging.getLogger("batchrun.batches")

#: The ``error_type`` of a row whose batch ended before its request ran (expired, cancelled, failed).
BATCH_EXPIRED = FailureType.BATCH_EXPIRED
#: How much older than its intent a batch may look (clocks differ) and still be the one it made.
FIND_SLACK_S = 3600.0
#: How long a cancel is waited for before the fallback sends the rows online all the same.
CANCEL_WAIT_S = 60.0


class HeldRows:
    """The output's done-set, with the rows held by batches not ended: neither is pending for the reader."""

    def __init__(self, done: Any, held: Iterable[int]) -> None:
        self._done = done
        self._held = np.array(sorted(held), dtype=np.int64)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, position: int) -> bool:
        index = int(np.searchsorted(self._held, position))
        return position in self._done or (index < len(self._held) and int(self._held[index]) == position)

    def pending_mask(self, start: int, count: int) -> np.ndarray:
        mask: np.ndarray = self._done.pending_mask(start, count)
        low, high = np.searchsorted(self._held, [start, start + count])
        mask[self._held[low:high] - start] = False
        return mask


class BatchDispatcher:
    """Pending rows through the batch API at ``api``, their records to ``on_record``, committed by ``commit``."""

    def __init__(
        self,
        *,
        api: BatchApi,
        ledger: BatchLedger,
        task: Task,
        model: str | None,
        job: str,
        done: Any,
        on_record: Callable[[RowResult | RowFailure], None],
        commit: Callable[[], Awaitable[None]],
        kept_columns: Callable[[Row], dict[str, Any]],
        max_requests: int,
        max_bytes: int,
        poll_every_s: float,
        max_attempts: int,
        route_name: str = "",
        fallback_at: float | None = None,
        echo: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.ledger = ledger
        self.task = task
        self.model = model
        self.job = job
        self.done = done
        self._on_record = on_record
        self._commit = commit
        self._kept_columns = kept_columns
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.poll_every_s = poll_every_s
        self.max_attempts = max_attempts
        self.route_name = route_name
        self.fallback_at = fallback_at
        self._echo = echo
        self._clock = clock
        self._hooks = answer_hooks(task)
        self._again: list[Member] = []  # rows to send again: in a later batch, or online
        self._states: dict[str, dict[str, Any]] = {}  # batch id -> its last known object
        self._said = ""
        self.figures: dict[str, int] = {"submitted": 0, "found_after_a_crash": 0, "collected": 0, "rows": 0,
                                        "answered": 0, "failed": 0, "sent_again": 0, "cancelled": 0, "online": 0}

    # ------------------------------------------------------------------ the whole run

    async def run(self, rows: AsyncIterator[Row], stop: Stop,
                  online: Callable[[AsyncIterator[Row]], Awaitable[None]] | None = None) -> None:
        """Settle, submit, poll and collect until every row has its record, the stop comes, or the fallback."""
        await self._settle()
        feed: AsyncIterator[Row] | None = rows
        while not stop.requested:
            if self._fallen_due() and online is not None:
                await self._fall_back(feed, stop, online)
                return
            if feed is not None:
                await self._submit_rows(feed, stop)
                feed = None
            if self._again:
                again, self._again = self._again, []
                self.figures["sent_again"] += len(again)
                await self._submit_members(again, stop)
            if not self.ledger.open_intents():
                return
            async with stop.until_requested():
                await asyncio.sleep(self._next_wait())
            if not stop.requested:
                await self._poll()
        if self.ledger.open_intents():
            self._echo(f"batches: {len(self.ledger.open_intents())} left running on the provider (paid for): "
                       "run the job again to collect them")

    def _fallen_due(self) -> bool:
        return self.fallback_at is not None and self._clock() >= self.fallback_at

    def _next_wait(self) -> float:
        wait = self.poll_every_s
        if self.fallback_at is not None:
            wait = max(0.0, min(wait, self.fallback_at - self._clock()))
        return wait

    # ------------------------------------------------------------------ 1. what an earlier run left

    async def _settle(self) -> None:
        await asyncio.to_thread(self.ledger.sweep)  # what a killed run left of batches already ended
        for intent in self.ledger.open_intents():
            if intent.batch_id is not None:
                continue
            if intent.file_id is None:  # never uploaded, so never paid for: its rows are pending again
                self._again.extend(self.ledger.members(intent))
                await asyncio.to_thread(self.ledger.ended, intent, "never uploaded")
                continue
            found = await self._find(intent)
            if found is not None:
                self.figures["found_after_a_crash"] += 1
                self._echo(f"batches: found batch {found['id']} created before the last run stopped")
                await asyncio.to_thread(self.ledger.created, intent, str(found["id"]))
            elif self._fallen_due():  # its rows go online now: a batch made only to be cancelled costs for nothing
                self._again.extend(self.ledger.members(intent))
                await asyncio.to_thread(self.ledger.ended, intent, "never created")
            else:
                await self._create(intent, self._endpoint_of(self.ledger.members(intent)))

    async def _find(self, intent: Intent) -> dict[str, Any] | None:
        """The provider's batch made from ``intent`` (its metadata names the job and the intent), if any."""
        async for batch in self.api.batches():  # newest first: those made long before the intent cannot be it
            created = batch.get("created_at")
            if isinstance(created, (int, float)) and created < intent.created_at - FIND_SLACK_S:
                return None
            metadata = batch.get("metadata") or {}
            if metadata.get("batchrun_intent") == intent.id and metadata.get("batchrun_job") == self.job:
                return batch
        return None

    # ------------------------------------------------------------------ 2. submitting

    async def _submit_rows(self, rows: AsyncIterator[Row], stop: Stop) -> None:
        chunk: list[Member] = []
        size = 0
        async for row in rows:
            if stop.requested:  # rows not submitted stay pending: nothing was paid for them
                return
            member = self._member(row)
            if member is None:
                continue
            line = len(self._line(member))
            if chunk and (len(chunk) >= self.max_requests or size + line > self.max_bytes):
                await self._submit(chunk)
                chunk, size = [], 0
            chunk.append(member)
            size += line
        if chunk and not stop.requested:
            await self._submit(chunk)

    async def _submit_members(self, members: list[Member], stop: Stop) -> None:
        chunk: list[Member] = []
        size = 0
        for member in members:
            line = len(self._line(member))
            if chunk and (len(chunk) >= self.max_requests or size + line > self.max_bytes):
                await self._submit(chunk)
                chunk, size = [], 0
            chunk.append(member)
            size += line
        if chunk and not stop.requested:
            await self._submit(chunk)
        elif chunk:
            self._again.extend(chunk)

    def _member(self, row: Row) -> Member | None:
        """The row as a batch line's member; a row that cannot become a request is recorded at once."""
        try:
            request = self.task.prepare(row)
        except RequestFailed as unsendable:
            self._on_record(self._failure(row.position, row.id, row.columns, row.sample, unsendable, attempts=0))
            return None
        return Member(position=row.position, id=row.id, sample=row.sample, columns=row.columns, path=request.path,
                      payload=request.payload, outputs=dict(request.outputs),
                      answer_schema=dict(request.answer_schema) if request.answer_schema is not None else None,
                      attempts=0)

    def _line(self, member: Member) -> bytes:
        payload = member.payload if self.model is None else {**member.payload, "model": self.model}
        return dump_json({"custom_id": member.custom_id, "method": "POST", "url": member.path,
                          "body": payload}) + b"\n"

    @staticmethod
    def _endpoint_of(members: list[Member]) -> str:
        return members[0].path if members else "/v1/chat/completions"

    async def _submit(self, members: list[Member]) -> None:
        """One batch: its rows written, its file uploaded, the batch created; each step committed first."""
        intent = await asyncio.to_thread(self.ledger.begin, members)
        data = b"".join(self._line(m) for m in members)
        file_id = await self.api.upload(data, f"{intent.id}.jsonl")
        await asyncio.to_thread(self.ledger.uploaded, intent, file_id)
        await self._create(intent, self._endpoint_of(members))

    async def _create(self, intent: Intent, endpoint: str) -> None:
        assert intent.file_id is not None
        batch = await self.api.create(intent.file_id, endpoint,
                                      {"batchrun_job": self.job, "batchrun_intent": intent.id})
        await asyncio.to_thread(self.ledger.created, intent, str(batch["id"]))
        self._states[str(batch["id"])] = batch
        self.figures["submitted"] += 1
        self.figures["rows"] += intent.rows
        self._echo(f"batches: submitted {batch['id']} with {intent.rows} rows")

    # ------------------------------------------------------------------ 3. polling

    async def _poll(self) -> None:
        for intent in self.ledger.open_intents():
            if intent.batch_id is None:
                continue
            try:
                batch = await self.api.retrieve(intent.batch_id)
            except BatchApiError as exc:
                if exc.status == 404:  # the provider no longer knows it: its rows go again
                    self._echo(f"batches: {intent.batch_id} is unknown to the provider; its rows go again")
                    self._again.extend(await asyncio.to_thread(self.ledger.members, intent))
                    await asyncio.to_thread(self.ledger.ended, intent, "lost")
                    continue
                logger.warning("batch.poll_failed batch=%s problem=%s", intent.batch_id, exc)  # asked again next turn
                continue
            self._states[intent.batch_id] = batch
            if batch.get("status") in TERMINAL:
                await self._collect(intent, batch)
        self._say_states()

    def states(self) -> dict[str, int]:
        """How many batches are in each state, as last seen."""
        counts: dict[str, int] = {}
        for batch in self._states.values():
            status = str(batch.get("status"))
            counts[status] = counts.get(status, 0) + 1
        return counts

    def waiting_for(self) -> str | None:
        """What progress shows while batches run: their states and how many of their rows are done."""
        open_ids = {i.batch_id for i in self.ledger.open_intents() if i.batch_id is not None}
        if not open_ids:
            return None
        known = [b for k, b in self._states.items() if k in open_ids]
        done = sum(int((b.get("request_counts") or {}).get("completed", 0)) for b in known)
        rows = sum(i.rows for i in self.ledger.open_intents())
        states: dict[str, int] = {}
        for batch in known:
            states[str(batch.get("status"))] = states.get(str(batch.get("status")), 0) + 1
        said = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or f"{len(open_ids)} submitted"
        return f"batches {said}: {done}/{rows} rows done"

    def _say_states(self) -> None:
        open_ids = {i.batch_id for i in self.ledger.open_intents()}
        done = sum(int((b.get("request_counts") or {}).get("completed", 0)) for k, b in self._states.items()
                   if k in open_ids)
        total = sum(int((b.get("request_counts") or {}).get("total", 0)) for k, b in self._states.items()
                    if k in open_ids)
        states = ", ".join(f"{n} {s}" for s, n in sorted(self.states().items()))
        line = f"batches: {states}" + (f"; rows in running batches {done}/{total} done" if open_ids else "")
        if line != self._said:
            self._said = line
            self._echo(line)

    # ------------------------------------------------------------------ 4. collecting

    async def _collect(self, intent: Intent, batch: dict[str, Any]) -> None:
        """Every member of an ended batch gets its record (or goes again); committed, then the batch is ended."""
        # A row committed already (before a crash that came before the batch was marked ended) is left alone.
        members = {m.custom_id: m for m in await asyncio.to_thread(self.ledger.members, intent)
                   if m.position not in self.done}
        answered: set[str] = set()
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.get(key)
            if not file_id:
                continue
            for line in await self.api.content(str(file_id)):
                member = members.get(str(line.get("custom_id")))
                if member is None or member.custom_id in answered:
                    continue
                answered.add(member.custom_id)
                self._settle_line(member, line)
        status = str(batch.get("status"))
        for custom_id, member in members.items():  # no line at all: a batch that failed validation, or cancelled
            if custom_id not in answered:
                self._settle_failure(member, RequestFailed(BATCH_EXPIRED, f"the batch ended {status} before this "
                                                           "request ran", retryable=True))
        await self._commit()
        await asyncio.to_thread(self.ledger.ended, intent, status)
        self.figures["collected"] += 1
        if status == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            detail = "; ".join(str(e.get("message")) for e in errors[:3]) or "no reason given"
            self._echo(f"batches: {intent.batch_id} failed validation ({detail}); its rows go again")

    def _settle_line(self, member: Member, line: dict[str, Any]) -> None:
        response = line.get("response") or {}
        error = line.get("error") or {}
        status = response.get("status_code") if isinstance(response, dict) else None
        if isinstance(status, int) and 200 <= status < 300:
            self._settle_answer(member, response.get("body"))
            return
        if error.get("code") == BATCH_EXPIRED:
            failure = RequestFailed(BATCH_EXPIRED, str(error.get("message", "the batch expired")), retryable=True)
        elif isinstance(status, int):
            body = response.get("body") or {}
            message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            failure = RequestFailed(http_failure_type(status), str(message or f"HTTP {status}"), status=status,
                                    retryable=classify(status) is Verdict.RETRY)
        else:
            failure = RequestFailed(FailureType.BAD_BODY, str(error.get("message") or "no answer"), retryable=True)
        self._settle_failure(member, failure, sent=True)

    def _settle_answer(self, member: Member, body: Any) -> None:
        try:
            outputs = self.task.parse(200, {}, dump_json(body))
        except RequestFailed as failure:
            self._settle_failure(member, failure, sent=True)
            return
        request = PreparedRequest(member.path, member.payload, outputs=member.outputs,
                                  answer_schema=member.answer_schema)
        kept: dict[str, Any] = {**member.outputs, **outputs, "mode": "batch"}
        for hook in self._hooks:
            accepted = hook.accept(request, kept, endpoint=self.route_name)
            if isinstance(accepted, Redraw):  # not a document of the schema: asked again, with a fresh seed
                row = Row(member.position, member.id, member.columns, member.sample)
                again = accepted.again(request, row, member.attempts + 1)
                self._settle_failure(replace(member, payload=again.payload), RequestFailed(
                    FailureType.INVALID_OUTPUT, accepted.reason, retryable=True), sent=True)
                return
            kept = accepted
        self.figures["answered"] += 1
        self._on_record(RowResult(member.position, member.id, self._kept(member), kept, 0.0, member.attempts + 1))

    def _settle_failure(self, member: Member, failure: RequestFailed, *, sent: bool = True) -> None:
        attempts = member.attempts + (1 if sent else 0)
        if failure.retryable and attempts < self.max_attempts:
            self._again.append(replace(member, attempts=attempts))
            return
        self.figures["failed"] += 1
        self._on_record(self._failure(member.position, member.id, member.columns, member.sample, failure,
                                      attempts=attempts))

    def _kept(self, member: Member) -> dict[str, Any]:
        return self._kept_columns(Row(member.position, member.id, member.columns, member.sample))

    def _failure(self, position: int, id_: Any, columns: dict[str, Any], sample: int, failure: RequestFailed, *,
                 attempts: int) -> RowFailure:
        kept = self._kept_columns(Row(position, id_, columns, sample))
        return RowFailure(position=position, id=id_, error_type=failure.error_type, error=failure.message,
                          status=failure.status, attempts=attempts, retryable=failure.retryable, kept=kept)

    # ------------------------------------------------------------------ the deadline: online for the rest

    async def _fall_back(self, feed: AsyncIterator[Row] | None, stop: Stop,
                         online: Callable[[AsyncIterator[Row]], Awaitable[None]]) -> None:
        """Cancel what still runs, collect what it finished, and send every other row online."""
        running = [i for i in self.ledger.open_intents() if i.batch_id is not None]
        if running:
            self._echo(f"batches: cancelling {len(running)} batches to answer their rows online in time")
        for intent in running:
            assert intent.batch_id is not None
            await self.api.cancel(intent.batch_id)
            self.figures["cancelled"] += 1
        limit = self._clock() + CANCEL_WAIT_S
        while self.ledger.open_intents() and self._clock() < limit and not stop.requested:
            await self._poll()
            if self.ledger.open_intents():
                async with stop.until_requested():
                    await asyncio.sleep(min(self.poll_every_s, 0.5))
        again, self._again = self._again, []

        async def rows() -> AsyncIterator[Row]:
            for member in again:
                self.figures["online"] += 1
                yield Row(member.position, member.id, member.columns, member.sample)
            if feed is not None:
                async for row in feed:
                    self.figures["online"] += 1
                    yield row

        await online(rows())
