"""Packing: several input rows in one request, for the routes that take a batch (TEI's ``/embed``, ``/predict``).

Between the reader and the dispatcher, :class:`Packer` groups pending rows into packs. A pack is a
:class:`~batchrun.records.Row` whose columns hold its member rows (:func:`members`), so the
dispatcher's one retry loop sends it, retries it and fails it as one unit; the task's parse answers
one outcome per member, and the dispatcher ends each member in exactly one record.

How many rows go in a pack is :class:`RowsPerRequest`'s: the spec's ``packing.max_rows``, else the
servers' ``max_client_batch_size`` from ``GET /info`` (:func:`server_limits`: the lowest of the
job's endpoints, each asked once, the url endpoints' answers taken from their check), else a probe that
starts at TEI's default (32) and doubles while full packs are answered. A pack the server refuses
as too large (TEI's Validation error: 413 before 1.9.0, 422 from it) is split in two and each half
sent on its own; the refusal teaches the controller the server's limit (``batch size N > maximum
allowed batch size M``), so later packs fit. A single row too long for the model ends in a failure
record with the server's reason (or is truncated by the server when ``parameters.truncate`` is true).
A pack is also bounded by about ``max_tokens`` estimated tokens (the spec's ``packing.max_tokens``,
else the server's ``max_batch_tokens``: one forward pass).

TEI's ``max_concurrent_requests`` counts inputs, not requests: the dispatcher's first concurrency is
held to that budget divided by the rows per request (:meth:`ServerLimits.requests_in_flight`); the
adaptive limit finds the rest from the 429s.

The member column names (``PACK_*``) are private to this module, the dispatcher and the packing tasks
(:mod:`batchrun.tasks.tei`); no input column can meet them, since a pack's columns hold nothing else.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from batchrun.errors import RequestFailed
from batchrun.records import FailureType, Row, RowFailure, RowResult

if TYPE_CHECKING:
    from batchrun.transport import ServerInfo

__all__ = [
    "DEFAULT_ROWS",
    "PACK_MEMBERS",
    "PACK_OUTPUTS",
    "PACK_REQUESTS",
    "Packer",
    "RowsPerRequest",
    "ServerLimits",
    "TooLarge",
    "halves",
    "make_pack",
    "members",
    "prepare_members",
    "rows_per_request",
    "server_limits",
    "too_large",
    "unpack",
]

log = logging.getLogger("batchrun.packing")

#: A pack's column holding its member rows.
PACK_MEMBERS = "__pack_members__"
#: A pack's column holding its members' prepared requests (each member is prepared once).
PACK_REQUESTS = "__pack_requests__"
#: The key of a pack's parsed answer: one outcome (columns, or a RequestFailed) per member, in order.
PACK_OUTPUTS = "__pack_outputs__"
#: Rows per request when neither the spec nor the server says: TEI's ``--max-client-batch-size`` default.
DEFAULT_ROWS = 32
#: Probing a limit nobody told: full packs answered before the rows per request double, and the most tried.
PROBE_AFTER = 4
MAX_PROBED_ROWS = 1024


def members(row: Row) -> tuple[Row, ...] | None:
    """The member rows of a pack, or None for a plain row."""
    value = row.columns.get(PACK_MEMBERS)
    return value if isinstance(value, tuple) else None


def make_pack(rows: tuple[Row, ...], requests: tuple[Any, ...] = ()) -> Row:
    """A pack of ``rows`` (at least one), known by its first member's position and id."""
    return Row(rows[0].position, rows[0].id, {PACK_MEMBERS: rows, PACK_REQUESTS: requests})


def prepare_members(
    row: Row, member_input: Callable[[Row], Any],
) -> tuple[list[Row], list[Any], list[tuple[Row, RequestFailed]]]:
    """A pack's members (a plain row is a pack of one) that make a request, with their inputs, and those
    that cannot (``member_input`` raised RequestFailed), each with its failure: they fail alone, unsent."""
    packed: list[Row] = []
    inputs: list[Any] = []
    unsendable: list[tuple[Row, RequestFailed]] = []
    for member in members(row) or (row,):
        try:
            inputs.append(member_input(member))
        except RequestFailed as failure:
            unsendable.append((member, failure))
            continue
        packed.append(member)
    return packed, inputs, unsendable


def halves(packed: Sequence[Row], refusal: TooLarge) -> list[Row]:
    """The packs that a pack refused as too large is split into: two halves, none over the server's maximum."""
    size = (len(packed) + 1) // 2
    if refusal.server_max is not None:
        size = min(size, refusal.server_max)
    return [make_pack(tuple(packed[start:start + size])) for start in range(0, len(packed), size)]


def unpack(
    packed: Sequence[Row], record: RowResult, *, kept: Callable[[Row], dict[str, Any]],
    failed: Callable[[Row, RequestFailed, int], RowFailure],
) -> Iterator[RowResult | RowFailure]:
    """One record per member of an answered pack, from its outcome in the answer: its columns (with the
    columns every member shares, e.g. answered-by), or ``failed(member, failure, attempts)``."""
    outcomes = record.output.get(PACK_OUTPUTS)
    shared = {key: value for key, value in record.output.items() if key != PACK_OUTPUTS}
    if not isinstance(outcomes, list) or len(outcomes) != len(packed):
        count = len(outcomes) if isinstance(outcomes, list) else 0
        wrong = RequestFailed(FailureType.BAD_BODY, f"the answer has {count} outcomes for "
                              f"{len(packed)} rows sent", retryable=True)
        outcomes = [wrong] * len(packed)
    for member, outcome in zip(packed, outcomes, strict=True):
        if isinstance(outcome, RequestFailed):
            yield failed(member, outcome, record.attempts)
        else:
            yield RowResult(member.position, member.id, kept(member), {**outcome, **shared},
                            record.latency_s, record.attempts)


# --------------------------------------------------------------------------- the server's limits


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What TEI's ``GET /info`` says about batches; None where it does not say (another server)."""

    max_client_batch_size: int | None = None
    max_batch_tokens: int | None = None
    max_concurrent_requests: int | None = None  # per replica, counted in inputs

    @classmethod
    def from_info(cls, info: Any) -> ServerLimits:
        if not isinstance(info, dict):
            return cls()

        def count(key: str) -> int | None:
            value = info.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        return cls(count("max_client_batch_size"), count("max_batch_tokens"), count("max_concurrent_requests"))

    @classmethod
    def tightest(cls, many: Iterable[ServerLimits]) -> ServerLimits:
        """Each limit the lowest that any server says (None where none says it): what fits every one."""
        many = list(many)

        def lowest(values: Iterable[int | None]) -> int | None:
            said = [value for value in values if value is not None]
            return min(said) if said else None

        return cls(lowest(m.max_client_batch_size for m in many), lowest(m.max_batch_tokens for m in many),
                   lowest(m.max_concurrent_requests for m in many))

    def requests_in_flight(self, rows_per_request: int) -> int | None:
        """Requests that fit in the server's input budget at once (one replica), or None when unknown."""
        if self.max_concurrent_requests is None:
            return None
        return max(1, self.max_concurrent_requests // max(1, rows_per_request))


async def rows_per_request(task: Any, spec: Any, planes: Sequence[Any],
                           known: Mapping[str, ServerInfo] | None = None) -> RowsPerRequest | None:
    """The rows-per-request controller of a job whose task packs rows (None for the others): the spec's
    ``packing`` keys, and the servers' limits (:func:`server_limits`) where the spec leaves them out."""
    if not getattr(task, "packs", False):
        return None
    packing = spec.packing
    limits = await server_limits(planes, known)
    return RowsPerRequest(max_rows=packing.max_rows, max_tokens=packing.max_tokens, limits=limits)


async def server_limits(planes: Sequence[Any], known: Mapping[str, ServerInfo] | None = None) -> ServerLimits:
    """The tightest batch limits the endpoints' ``GET /info`` report; empty limits where none can be read.

    ``known`` holds the answers the endpoint check already read, by server root (every url endpoint's):
    they are used as they are, and only a ready endpoint's plane (``planes``) whose answer is not among
    them is asked now. An endpoint that becomes ready later (a Dedicated one still starting) is not
    asked: a pack it refuses as too large teaches the controller the limit it names.
    """
    from batchrun.transport import read_info, server_root

    answers = dict(known or {})
    for plane in planes:
        root = server_root(plane.url)
        if root not in answers:
            answers[root] = await read_info(plane.url, token=plane.token, headers=plane.headers,
                                            send_token=getattr(plane, "send_token", False))
    for answer in answers.values():
        if answer.document is None:
            log.info("server_limits_unread %s", answer.reason)
    limits = ServerLimits.tightest(ServerLimits.from_info(answer.document) for answer in answers.values())
    log.info("server_limits max_client_batch_size=%s max_batch_tokens=%s max_concurrent_requests=%s",
             limits.max_client_batch_size, limits.max_batch_tokens, limits.max_concurrent_requests)
    return limits


# --------------------------------------------------------------------------- refusals


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A refusal of a request as too large: a batch over the server's limit (``server_max`` when it says
    it), or an input over the model's length (``input_too_long``)."""

    server_max: int | None = None
    input_too_long: bool = False


_BATCH_SIZE = re.compile(r"batch size \d+ > maximum allowed batch size (\d+)")
_TOO_LONG = re.compile(r"must have less than \d+ tokens")


def too_large(status: int | None, message: str) -> TooLarge | None:
    """Whether TEI refused a request as too large, from its answer (status and the error's text).

    TEI answers a batch over ``max_client_batch_size`` and an input over ``max_input_length`` with a
    Validation error: 413 before 1.9.0, 422 from it (TEI #818). Any other answer: None.
    """
    if status not in (413, 422):
        return None
    batch = _BATCH_SIZE.search(message)
    if batch is not None:
        return TooLarge(server_max=int(batch.group(1)))
    if _TOO_LONG.search(message):
        return TooLarge(input_too_long=True)
    if status == 413:  # a proxy's body limit says nothing more
        return TooLarge()
    return None


# --------------------------------------------------------------------------- rows per request


class RowsPerRequest:
    """How many rows go in the next request: the spec's ``max_rows``, or the server's limit, lowered by
    every refusal of a pack as too large (to the limit the server names, else half the refused size).

    When neither the spec nor the server says, it starts at :data:`DEFAULT_ROWS` and doubles after
    every :data:`PROBE_AFTER` full packs answered, up to :data:`MAX_PROBED_ROWS`, until a refusal says
    where the server's limit is (TEI names it: ``maximum allowed batch size M``).

    ``max_tokens`` (the spec's, else the server's ``max_batch_tokens``) bounds a pack's estimated
    tokens (words and marks, plus two per row) as well.
    """

    def __init__(self, *, max_rows: int | None = None, max_tokens: int | None = None,
                 limits: ServerLimits | None = None) -> None:
        self.limits = limits = limits or ServerLimits()
        server = limits.max_client_batch_size
        self.told = max_rows is not None
        self.size = min(max_rows or server or DEFAULT_ROWS, server or max_rows or DEFAULT_ROWS)
        # TEI runs a request in forward passes of at most max_batch_tokens: a pack that fits takes one.
        self.max_tokens = max_tokens or limits.max_batch_tokens
        self.refusals = 0
        self.probing = max_rows is None and server is None  # nobody said: find the limit from the answers
        self._full_answers = 0

    def answered(self, rows: int) -> None:
        """A pack of ``rows`` rows was answered: while probing, full packs let the next ones grow."""
        if not self.probing or rows < self.size:
            return
        self._full_answers += 1
        if self._full_answers >= PROBE_AFTER and self.size < MAX_PROBED_ROWS:
            log.info("rows_per_request from=%d to=%d (probing)", self.size, min(MAX_PROBED_ROWS, self.size * 2))
            self.size = min(MAX_PROBED_ROWS, self.size * 2)
            self._full_answers = 0

    def requests_in_flight(self) -> int | None:
        """Requests of this many rows that the server's input budget takes at once (None: unknown)."""
        return self.limits.requests_in_flight(self.size)

    def refused(self, rows: int, refusal: TooLarge) -> None:
        """A pack of ``rows`` rows was refused as too large: later packs are smaller."""
        if refusal.input_too_long:
            return  # one member is too long, not the pack: the split finds it
        self.refusals += 1
        self.probing = False  # the limit is found: the server named it, or it is below the refused size
        limit = refusal.server_max if refusal.server_max is not None else max(1, rows // 2)
        if limit < self.size:
            log.info("rows_per_request from=%d to=%d", self.size, limit)
            self.size = max(1, limit)


def estimate_tokens(text: str) -> int:
    """A row's tokens, estimated without a tokenizer: its words and punctuation marks, plus two specials."""
    return len(re.findall(r"\w+|[^\w\s]", text)) + 2


# --------------------------------------------------------------------------- the packing stage


class Packer:
    """The pending rows, grouped into packs of :class:`RowsPerRequest` rows; an async iterator with
    ``next_nowait`` (as :class:`~batchrun.reader.RowStream`), so the dispatcher's fast path still holds.

    ``text_of(row)`` is the text a row sends (for the token bound); None when it has none.
    """

    def __init__(self, rows: AsyncIterator[Row], controller: RowsPerRequest,
                 text_of: Callable[[Row], str | None] | None = None) -> None:
        self._rows = rows
        self.controller = controller
        self._text_of = text_of
        self._nowait: Callable[[], Row | None] = getattr(rows, "next_nowait", lambda: None)
        self._held: list[Row] = []
        self._tokens = 0
        self._ended = False

    def __aiter__(self) -> Packer:
        return self

    def _full(self) -> bool:
        if len(self._held) >= self.controller.size:
            return True
        limit = self.controller.max_tokens
        return limit is not None and self._tokens >= limit and len(self._held) > 1

    def _take(self, row: Row) -> Row | None:
        """Hold ``row``; a pack when the held rows fill one (the row that overflows the token bound stays)."""
        tokens = 0
        if self.controller.max_tokens is not None and self._text_of is not None:
            tokens = estimate_tokens(self._text_of(row) or "")
            if self._held and self._tokens + tokens > self.controller.max_tokens:
                pack = self._release()
                self._held, self._tokens = [row], tokens
                return pack
        self._held.append(row)
        self._tokens += tokens
        return self._release() if self._full() else None

    def _release(self) -> Row:
        pack = make_pack(tuple(self._held))
        self._held, self._tokens = [], 0
        return pack

    def next_nowait(self) -> Row | None:
        """A full pack from rows already here, or None (then ``await anext()``)."""
        while not self._ended:
            row = self._nowait()
            if row is None:
                return None
            pack = self._take(row)
            if pack is not None:
                return pack
        return None

    async def __anext__(self) -> Row:
        while not self._ended:
            row = self._nowait()
            if row is None:
                try:
                    row = await anext(self._rows)
                except StopAsyncIteration:
                    self._ended = True
                    break
            pack = self._take(row)
            if pack is not None:
                return pack
        if self._held:
            return self._release()
        raise StopAsyncIteration
