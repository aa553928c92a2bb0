"""What the rest of batchrun knows about an endpoint: the :class:`Endpoint` interface.

An endpoint is used in exactly one way::

    check = await endpoint.check()          # read-only, before anything costs money
    async with endpoint as plane:           # acquire: resume, scale, wait until ready
        ...send to plane.url...             # dispatch
    # released here, on every way out: pause / scale to zero / keep, the user's settings restored

The shards of a job may also share a managed endpoint held up between ``await endpoint.up()`` and
``await endpoint.down()`` (`batchrun endpoint up|down JOB.yaml`); a :class:`BracketResult` says what each did.

The runner never asks which kind it holds; each kind lives in its own module of this package.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from batchrun.cost import CostMeter
from batchrun.errors import RequestFailed
from batchrun.rate import RateLimits
from batchrun.transport import ServerInfo

__all__ = ["BracketResult", "Bracketed", "DataPlane", "Endpoint", "EndpointCheck", "LifecycleRecord"]


@dataclass(frozen=True, slots=True)
class DataPlane:
    """Where requests go once the endpoint is ready: its base url, headers to add, and the token.

    The token is sent only where :func:`batchrun.transport.token_problem` allows: Hugging Face hosts
    and loopback, another https host when ``send_token`` (the spec's ``endpoint.send_token``).

    A serverless target (endpoints/providers.py) also names the ``model`` every request's body carries
    (``ORG/NAME:PROVIDER``). ``limits`` are the lane's requests and tokens per minute when the spec gives
    them (``endpoint.limits``); limits the answers' ``x-ratelimit-*`` headers announce are learned without them."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    token: str | None = field(default=None, repr=False)
    send_token: bool = False
    model: str | None = None
    limits: RateLimits | None = None
    #: What the token is, for messages, where it is not the HF token ("the API key in EXAMPLE_API_KEY").
    token_name: str | None = None


@dataclass(frozen=True, slots=True)
class EndpointCheck:
    """What the read-only check found: a line for people, and the model the endpoint serves.

    ``model`` is the repository (``google/gemma-2b-it``) and ``revision`` the commit it serves, each
    ``None`` when the endpoint does not say. Both join the job's identity, so that a resume against
    another model is refused.

    ``infos`` holds the ``GET /info`` answers the check read, by server root
    (:func:`~batchrun.transport.server_root`): the run reuses them (packing's server limits) rather
    than ask again at its start.
    """

    note: str
    model: str | None = None
    revision: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    infos: Mapping[str, ServerInfo] = field(default_factory=dict, repr=False)


@dataclass(slots=True)
class LifecycleRecord:
    """What the lifecycle did, for the summary and the cost figures."""

    initial_state: str | None = None
    resumed: bool = False
    scaled: bool = False
    backstop_set: bool = False
    acquired_at: float | None = None  # monotonic time the resume (or first use) began
    ready_at: float | None = None
    released_at: float | None = None  # when the final action (pause, scale-to-zero) was accepted
    release_started_at: float | None = None  # monotonic time the release began
    final_action: str | None = None  # pause | scale-to-zero | keep | none | "pause failed" ...
    note: str | None = None
    replicas: int = 1
    #: (wall-clock time, event) for every event, for benchmarks and post-mortems.
    timeline: list[tuple[float, str]] = field(default_factory=list)

    @property
    def events(self) -> list[str]:
        """The events' messages, in order."""
        return [message for _, message in self.timeline]

    def summary(self) -> dict[str, Any]:
        """The figures the job's summary shows."""
        info: dict[str, Any] = {
            "initial_state": self.initial_state,
            "resumed": self.resumed,
            "final_action": self.final_action,
            "note": self.note,
        }
        if self.acquired_at is not None and self.ready_at is not None:
            info["ready_wait_s"] = round(self.ready_at - self.acquired_at, 3)
        return info


class Bracketed(enum.Enum):
    """What `batchrun endpoint up|down JOB.yaml` did to one endpoint."""

    UP = "up"  # ready, and held up for the job's shards until `endpoint down`
    PUT_BACK = "put back"  # no shard uses it any more: on_finish applied, the user's settings restored
    IN_USE = "in use"  # a shard still sends to it: the last one out puts it down
    NOT_BRACKETED = "not bracketed"  # an endpoint no bracket applies to (``note`` says why)


@dataclass(frozen=True, slots=True)
class BracketResult:
    """One endpoint's answer to ``up()`` or ``down()``: the outcome, and what its release did."""

    ref: str
    outcome: Bracketed
    final_action: str | None = None  # PUT_BACK: pause | scale-to-zero | keep | none, as in LifecycleRecord
    note: str | None = None  # for people: who still uses it, why it was kept, why there is nothing to bracket


class Endpoint(Protocol):
    """An endpoint a job sends to. Entering it acquires a ready :class:`DataPlane`; leaving releases it.

    ``__aenter__`` raises :class:`~batchrun.errors.JobStopped` when the job's stop comes before the
    endpoint is ready (it has released what it changed by then). ``__aexit__`` runs to its end even if
    the task is cancelled meanwhile, and the caller stops all traffic before leaving.
    """

    @property
    def ref(self) -> str:
        """How messages name it: ``namespace/name`` or the url."""
        ...

    @property
    def record(self) -> LifecycleRecord:
        """What the lifecycle did, for the summary."""
        ...

    @property
    def meter(self) -> CostMeter:
        """Billable replica time, priced when the spec gives a price."""
        ...

    async def check(self) -> EndpointCheck:
        """Read-only checks before anything bills; raises exit-2 errors for an unusable endpoint."""
        ...

    async def __aenter__(self) -> DataPlane: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def excuses(self, failure: RequestFailed) -> bool:
        """True when ``failure`` is the endpoint starting (a cold 503), not the row's fault: it then
        backs off without using up the row's attempts."""
        ...

    async def up(self) -> BracketResult:
        """Hold the endpoint up for the job's shards until :meth:`down`, from another process maybe
        (``UP``), or say why there is nothing to hold (``NOT_BRACKETED``). Not up: raises, having put
        back what it changed."""
        ...

    async def down(self) -> BracketResult:
        """End what :meth:`up` began: put the endpoint back (``PUT_BACK``) unless a shard still uses it
        (``IN_USE``), or ``NOT_BRACKETED``. Raises when it could not be put back."""
        ...
