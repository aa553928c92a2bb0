"""Every endpoint of a job, behind the one :class:`~batchrun.endpoints.base.Endpoint` interface.

A job names one endpoint or a list of them; either way the runner holds one pool:

    check()       every endpoint's read-only check at once; then they must serve the same task and (unless
                  ``mixed_models: true``) the same model and revision: refused before anything is resumed
    enter         every managed endpoint is resumed at once, each in its own task; the pool is entered as
                  soon as the first is ready, and :meth:`attach` adds the others to the dispatcher as they
                  become ready (a slow cold start holds nobody back)
    drain         an endpoint that fails (its state, a refused token, errors while the others answer) is
                  drained: the dispatcher sends it nothing more and it is released (paused) once its last
                  request is back; the job goes on while one endpoint remains
    exit          all of them are released at once, each one's settings put back, on every way out

Each endpoint gets a :class:`~batchrun.stop.Stop` of its own, fed by the job's: a job that stops stops
every endpoint's start, while one endpoint's trouble (its lifecycle watcher asks its own stop) drains
that endpoint alone. Only when no endpoint is left does the trouble become the job's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from batchrun.cost import CostMeter
from batchrun.endpoints.base import Bracketed, BracketResult, DataPlane, Endpoint, EndpointCheck, LifecycleRecord
from batchrun.errors import AuthError, BatchrunError, EndpointError, EndpointUnusableError, JobStopped, RequestFailed
from batchrun.stop import Stop, StopCause, StopReason

if TYPE_CHECKING:
    from batchrun.dispatch import Dispatcher

__all__ = ["EndpointPool", "Member", "PoolMeter"]

log = logging.getLogger("batchrun.endpoint")

#: How often a drained endpoint is looked at until its last request is back (then it is released).
IDLE_POLL_S = 0.05
_BRACKETED_ONE_BY_ONE = "a job's endpoints are bracketed one by one, each opened as the bracket (shared_endpoint.py)"


@dataclass(eq=False)
class Member:
    """One endpoint of the pool, with the stop that its own lifecycle may ask."""

    name: str
    endpoint: Endpoint
    stop: Stop
    plane: DataPlane | None = None
    error: BaseException | None = None  # why it could not start, or why it was drained
    drained: bool = False
    task: asyncio.Task[None] | None = None
    release_now: asyncio.Event = field(default_factory=asyncio.Event)
    released: bool = False
    release_error: BatchrunError | None = None  # a setting that could not be put back
    left_out: bool = False  # its check failed while others answered: never started


class PoolMeter(CostMeter):
    """The sum of the members' meters: cost and the budget cover every endpoint."""

    def __init__(self, meters: Sequence[CostMeter]) -> None:
        super().__init__(None)
        self._meters = list(meters)
        priced = [m.price_per_replica_hour for m in meters if m.price_per_replica_hour is not None]
        self.price_per_replica_hour = sum(priced) if priced else None
        self.per_token = any(m.per_token for m in meters)

    def charge(self, prompt_tokens: int | None, completion_tokens: int | None, *,
               provider: str | None = None, factor: float = 1.0) -> float | None:
        """Members are charged their own answers."""
        raise TypeError("charge the meter of the endpoint that answered, not the pool's")

    @property
    def token_usd(self) -> float:
        return sum(m.token_usd for m in self._meters)

    @property
    def priced(self) -> bool:
        return any(m.priced for m in self._meters)

    @property
    def dearest_answer_usd(self) -> float:  # the members' attribute, read here
        return max((m.dearest_answer_usd for m in self._meters), default=0.0)

    @dearest_answer_usd.setter
    def dearest_answer_usd(self, value: float) -> None:
        """Set by CostMeter.__init__ only; the members keep their own."""

    def on_charge(self, listener: Callable[[], None]) -> None:
        for meter in self._meters:
            meter.on_charge(listener)

    @property
    def billed(self) -> bool:
        return any(m.billed for m in self._meters)

    @property
    def elapsed_s(self) -> float:
        return max((m.elapsed_s for m in self._meters), default=0.0)

    def replica_usd_per_second(self) -> float | None:
        rates = [m.replica_usd_per_second() for m in self._meters if m.running]
        priced = [r for r in rates if r is not None]
        if not priced:
            return None if self.price_per_replica_hour is None else 0.0
        return sum(priced)

    def start(self, replicas: int) -> None:
        """Members start their own meters."""

    def set_replicas(self, replicas: int) -> None:
        """Members follow their own replicas."""

    def stop(self) -> None:
        """Members stop their own meters."""

    @property
    def running(self) -> bool:
        return any(m.running for m in self._meters)

    @property
    def replicas(self) -> int:
        return sum(m.replicas for m in self._meters if m.running)

    @property
    def replica_seconds(self) -> float:
        return sum(m.replica_seconds for m in self._meters)

    @property
    def usd(self) -> float | None:
        priced = [m.usd for m in self._meters if m.usd is not None]
        return sum(priced) if priced else None

    def usd_per_second(self) -> float | None:
        rates = [m.usd_per_second() for m in self._meters if m.running]
        priced = [r for r in rates if r is not None]
        if not priced:
            return None if self.price_per_replica_hour is None and not self.per_token else 0.0
        return sum(priced)


class EndpointPool:
    """The job's endpoints (one or several); see the module docstring."""

    def __init__(self, members: Sequence[Member], *, stop: Stop, mixed_models: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        if not members:
            raise ValueError("a pool needs at least one endpoint")
        self.members = list(members)
        self.mixed_models = mixed_models
        self._stop = stop
        self._echo = echo
        self.meter: CostMeter = self.members[0].endpoint.meter if len(self.members) == 1 else PoolMeter(
            [m.endpoint.meter for m in self.members])
        self._dispatcher: Dispatcher | None = None
        self._first: Member | None = None
        self._releasing: list[asyncio.Task[None]] = []
        self._closing = False
        stop.on_request(self._job_stops)
        for member in self.members:
            member.stop.on_request(functools.partial(self._member_stops, member))

    # ------------------------------------------------------------------ the Endpoint interface

    @property
    def ref(self) -> str:
        return ", ".join(m.endpoint.ref for m in self.members)

    @property
    def several(self) -> bool:
        return len(self.members) > 1

    @property
    def record(self) -> LifecycleRecord:
        """One endpoint's record as it is; for several, the first to be ready (the summary lists each)."""
        if not self.several:
            return self.members[0].endpoint.record
        records = [m.endpoint.record for m in self.members]
        acquired = [r for r in records if r.acquired_at is not None]
        combined = LifecycleRecord(initial_state=", ".join(str(r.initial_state) for r in records),
                                   resumed=any(r.resumed for r in records))
        if acquired:
            combined.acquired_at = min(r.acquired_at for r in acquired if r.acquired_at is not None)
            ready = [r.ready_at for r in acquired if r.ready_at is not None]
            combined.ready_at = min(ready) if ready else None
        # Only the endpoints batchrun put down (or kept) say what it did: a url or a serverless target has no
        # lifecycle, and "none" for each of them tells a reader nothing.
        done = [(m.name, m.endpoint.record.final_action) for m in self.members]
        done = [(name, action) for name, action in done if action and action != "none"]
        combined.final_action = ", ".join(f"{name}: {action}" for name, action in done) or "none"
        return combined

    def excuses(self, failure: RequestFailed) -> bool:
        """The first ready endpoint's excuses (each other endpoint's go with its own route)."""
        return (self._first or self.members[0]).endpoint.excuses(failure)

    async def up(self) -> BracketResult:
        """A pool is not bracketed as one: `batchrun endpoint up` brackets each managed endpoint by itself."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_BRACKETED_ONE_BY_ONE)

    async def down(self) -> BracketResult:
        """A pool is not bracketed as one: `batchrun endpoint down` puts back each managed endpoint by itself."""
        return BracketResult(self.ref, Bracketed.NOT_BRACKETED, note=_BRACKETED_ONE_BY_ONE)

    async def check(self) -> EndpointCheck:
        """Every endpoint's read-only check at once, then the checks that span them (before any resume)."""
        if not self.several:
            return await self.members[0].endpoint.check()
        # One endpoint down (unreachable, failed, missing) leaves it out: the job starts on those that
        # answer, as it would drain one failing a second later. Only when none answers is it the job's.
        outcomes = await asyncio.gather(*(m.endpoint.check() for m in self.members), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, EndpointError):
                raise outcome  # a refused token, or a bug: not one endpoint's trouble
        if all(isinstance(outcome, BaseException) for outcome in outcomes):
            raise outcomes[0]  # type: ignore[misc]
        answering: list[Member] = []
        checks: list[EndpointCheck] = []
        for member, outcome in zip(self.members, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                member.left_out = member.drained = True
                member.error = outcome
                self._echo(f"endpoint: {member.name} is left out ({outcome}); the job starts on the others")
            else:
                answering.append(member)
                checks.append(outcome)
        return self._consistent(answering, checks)

    def _consistent(self, members: list[Member], checks: list[EndpointCheck]) -> EndpointCheck:
        """The checks that span the endpoints that answered: one task, and one model unless mixed_models."""
        tasks = {m.name: c.details.get("task") for m, c in zip(members, checks, strict=True)}
        if len({t for t in tasks.values() if t}) > 1:
            shown = ", ".join(f"{name}: {task}" for name, task in tasks.items())
            raise EndpointUnusableError(f"the endpoints serve different tasks ({shown}); a job's endpoints must "
                                        "all serve its task (nothing was resumed)")
        models = {m.name: (c.model, c.revision) for m, c in zip(members, checks, strict=True)}
        known = {model for model in models.values() if model[0]}
        if len(known) > 1 and not self.mixed_models:
            shown = ", ".join(f"{name}: {model}" + (f"@{rev}" if rev else "")
                              for name, (model, rev) in models.items())
            raise EndpointUnusableError(
                f"the endpoints serve different models or revisions ({shown}): their answers would make one "
                "dataset silently inconsistent. Point them at one model, or set mixed_models: true "
                "(nothing was resumed)")
        model: str | None = None
        revision: str | None = None
        if len(known) == 1:
            model, revision = next(iter(known))
        elif known:  # mixed_models: every model joins the identity
            model = ", ".join(sorted({m for m, _ in known if m}))
        return EndpointCheck(note="; ".join(c.note for c in checks), model=model, revision=revision,
                             details=dict(checks[0].details),
                             infos={root: info for check in checks for root, info in check.infos.items()})

    async def __aenter__(self) -> DataPlane:
        """Start every endpoint at once; return the first ready one's plane. Raises the first one's error
        when none could start (JobStopped when the job stopped meanwhile)."""
        ready = asyncio.Event()
        started = [m for m in self.members if not m.left_out]
        for member in started:
            member.task = asyncio.create_task(self._hold(member, ready), name=f"endpoint-{member.name}")
        while True:
            first = next((m for m in started if m.plane is not None and not m.drained), None)
            if first is not None:
                self._first = first
                return first.plane  # type: ignore[return-value]
            if all(m.task is not None and m.task.done() for m in started):
                errors = [m.error for m in started if m.error is not None]
                await self._release_all()
                if self._stop.requested or not errors:
                    cause = self._stop.cause
                    raise JobStopped(cause.detail if cause else "stopped while the endpoints were starting")
                raise errors[0]
            ready.clear()
            try:
                await ready.wait()
            except BaseException:
                await self._release_all()
                raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._release_all()

    # ------------------------------------------------------------------ the dispatcher's side

    def attach(self, dispatcher: Dispatcher) -> None:
        """Route rows to every ready endpoint: the first is the dispatcher's own, the others join now or as
        they become ready. The dispatcher says which endpoint it drained; the pool releases it."""
        self._dispatcher = dispatcher
        dispatcher.on_drained = self._drained_by_dispatcher
        dispatcher.expect_more(self._starting)
        for member in self.members:
            if member.plane is not None and member is not self._first and not member.drained:
                dispatcher.add_route(member.plane, name=member.name, excuses=member.endpoint.excuses)

    def ready_planes(self) -> list[DataPlane]:
        """The planes of the endpoints ready now and not drained, the first ready one first."""
        ready = [m for m in self.members if m.plane is not None and not m.drained]
        ready.sort(key=lambda m: m is not self._first)
        return [m.plane for m in ready if m.plane is not None]

    def _starting(self) -> bool:
        return any(m.plane is None and m.task is not None and not m.task.done() for m in self.members)

    def route_name(self) -> str:
        """The name of the endpoint the dispatcher was made with (the first ready)."""
        return (self._first or self.members[0]).name

    # ------------------------------------------------------------------ each endpoint's life

    async def _hold(self, member: Member, ready: asyncio.Event) -> None:
        """Acquire one endpoint, keep it until it is to be released, release it: one task per endpoint,
        so each one's start and release runs beside the others'."""
        try:
            async with member.endpoint as plane:
                member.plane = plane
                ready.set()
                if self._dispatcher is not None and member is not self._first and not member.drained:
                    self._dispatcher.add_route(plane, name=member.name, excuses=member.endpoint.excuses)
                    self._echo(f"endpoint: {member.name} is ready and joins the job")
                await member.release_now.wait()
        except JobStopped as stopped:
            member.error = member.error or stopped
        except BatchrunError as error:
            if member.plane is not None:
                member.release_error = error
                return
            member.error = member.error or error
            if self.several and not self._stop.requested:
                self._echo(f"endpoint: {member.name} could not start ({error}); the job goes on without it")
        finally:
            member.released = True
            ready.set()

    def _job_stops(self, cause: StopCause) -> None:
        """The job stops: every endpoint still starting stops starting (and is released)."""
        for member in self.members:
            member.stop.request(cause.reason, cause.detail)

    def _member_stops(self, member: Member, cause: StopCause) -> None:
        """An endpoint's own lifecycle asked to stop (it became failed, or its token was refused): drain it."""
        if self._stop.requested or self._closing:
            return  # the job's own stop, passed on, or the release of them all
        error: BatchrunError = (AuthError(cause.detail) if cause.reason is StopReason.AUTH
                                else EndpointError(cause.detail, state="failed"))
        if self._dispatcher is not None:
            self._dispatcher.drain(member.name, error)  # calls back _drained_by_dispatcher
        if not member.drained:
            self._drained(member, error)

    def _drained_by_dispatcher(self, name: str, error: BatchrunError) -> None:
        for member in self.members:
            if member.name == name and not member.drained:
                self._drained(member, error)

    def _drained(self, member: Member, error: BatchrunError) -> None:
        member.drained = True
        member.error = error
        live = [m for m in self.members if not m.drained and not (m.released and m.plane is None)]
        if live:
            self._echo(f"endpoint: {member.name} is drained ({error}); its rows go to the others")
            self._releasing.append(asyncio.get_running_loop().create_task(self._release_when_idle(member)))
            return
        # None is left: the trouble is the job's, with the reason the one endpoint's watcher gave.
        reason = StopReason.AUTH if isinstance(error, AuthError) else StopReason.ENDPOINT
        self._stop.request(reason, str(error))

    async def _release_when_idle(self, member: Member) -> None:
        """Pause a drained endpoint once its last request is back (a request on the wire is not cut)."""
        dispatcher = self._dispatcher
        while dispatcher is not None and dispatcher.route_in_flight(member.name) > 0:
            await asyncio.sleep(IDLE_POLL_S)
        member.release_now.set()

    async def _release_all(self) -> None:
        """Release every endpoint at once; runs to its end even if cancelled meanwhile; raises the first
        release error (a setting that could not be put back) once all are done."""
        self._closing = True
        for member in self.members:
            member.stop.request(StopReason.DONE, "the job is releasing its endpoints")  # starting ones stop
            member.release_now.set()
        for task in self._releasing:
            task.cancel()
        tasks = [m.task for m in self.members if m.task is not None]
        if not tasks:
            return
        gathered = asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.shield(gathered)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.shield(gathered)
            raise
        failures = [m.release_error for m in self.members if m.release_error is not None]
        if failures:
            raise failures[0]


def describe_members(members: Sequence[Member]) -> list[dict[str, Any]]:
    """Each endpoint's lifecycle, for the summary."""
    return [{"name": m.name, "ref": m.endpoint.ref, **m.endpoint.record.summary()} for m in members]
