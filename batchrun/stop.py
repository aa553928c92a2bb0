"""Why a job stops, held in one object, and the one place where signals are caught.

A job stops for exactly one reason, and the first reason wins: the rows ran out, a signal, the budget,
the deadline, the failure threshold, the endpoint failing, a refused token, or an error in batchrun's
own work (a full disk). Every part of a job watches the same :class:`Stop`:

    Stop.request(reason, detail)   a graceful stop: intake ends, requests on the wire get ``grace_s``
    Stop.abort()                   the grace is over (or a second signal): cancel what is still in flight
    Stop.until_requested()         a scope cancelled as soon as a stop is requested: waiting for a row,
                                   a concurrency slot, a backoff, or for the endpoint to become ready
    Stop.until_aborted()           a scope cancelled when the grace ends: requests in flight
    catch_signals(stop)            SIGINT, SIGTERM and SIGHUP request a stop; a second one, or SIGQUIT,
                                   aborts; the endpoint is released either way
    forward_signals(deliver)       the same signals, taken in a script's main thread for a job that runs
                                   on a thread of its own (``batchrun.run``), then delivered again

Scopes are cancel scopes in the manner of anyio's ``move_on_after``, built on ``asyncio.timeout``: the
body is cancelled, the scope swallows that cancellation and says so in ``scope.cancelled``. Nothing
races a stop event against the work by hand.

SIGPIPE keeps Python's default (ignored): a closed stdout or stderr does not stop a job; what batchrun
prints is then lost, the job goes on and the endpoint is released as usual.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from batchrun.facts import GRACE_S

__all__ = ["CancelScope", "SignalIntent", "Stop", "StopCause", "StopReason", "catch_signals", "forward_signals"]

log = logging.getLogger("batchrun.stop")

#: Signals that ask a job to stop gracefully (SIGHUP: a closed terminal or ssh session).
GRACEFUL_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
#: Signals that abandon requests in flight at once (the endpoint is still released).
ABORT_SIGNALS = ("SIGQUIT",)
#: `timeout` and some supervisors signal the process and then its group: one intent, two signals.
#: Only a second signal later than this means "abandon requests in flight".
SAME_INTENT_S = 1.0


class StopReason(str, enum.Enum):
    """Why a job stops. Only ``DONE`` is a normal end."""

    DONE = "done"
    SIGNAL = "signal"
    BUDGET = "budget"
    DEADLINE = "deadline"
    FAILURE_THRESHOLD = "failure_threshold"
    ENDPOINT = "endpoint"
    AUTH = "auth"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class StopCause:
    """The reason a job stops, with the words a person reads."""

    reason: StopReason
    detail: str

    @property
    def early(self) -> bool:
        """True for every reason but DONE: the job can be resumed by running it again."""
        return self.reason is not StopReason.DONE


class CancelScope:
    """A block cancelled when its stop fires; ``cancelled`` says whether it was.

    Use ``async with stop.until_requested() as scope: ...`` and read ``scope.cancelled`` after the
    block. A cancellation that did not come from this scope goes on as usual.
    """

    __slots__ = ("_registry", "_timeout", "_when", "cancelled")

    def __init__(self, registry: set[asyncio.Timeout], when: float | None) -> None:
        self._registry = registry
        self._when = when
        self._timeout: asyncio.Timeout | None = None
        self.cancelled = False

    async def __aenter__(self) -> CancelScope:
        self._timeout = asyncio.timeout_at(self._when)
        await self._timeout.__aenter__()
        self._registry.add(self._timeout)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        timeout = self._timeout
        assert timeout is not None
        self._registry.discard(timeout)
        try:
            await timeout.__aexit__(exc_type, exc, tb)
        except TimeoutError:
            if not timeout.expired():
                raise
            self.cancelled = True
            return True
        return False


class Stop:
    """The job's one stop signal: the first :meth:`request` wins, :meth:`abort` ends the grace.

    Thread-safe to read (``requested``, ``aborted``, ``cause``); to be changed from the event loop only
    (signal handlers installed by :func:`catch_signals` run there).
    """

    def __init__(self, *, grace_s: float = GRACE_S, echo: Callable[[str], None] | None = None) -> None:
        self.grace_s = grace_s
        self.cause: StopCause | None = None
        self.aborted = False
        self._echo = echo or (lambda message: None)
        self._requested_scopes: set[asyncio.Timeout] = set()
        self._aborted_scopes: set[asyncio.Timeout] = set()
        self._abort_at: float | None = None  # loop time the grace ends
        self._event: asyncio.Event | None = None
        self._listeners: list[Callable[[StopCause], None]] = []

    def __repr__(self) -> str:
        return f"Stop(cause={self.cause!r}, aborted={self.aborted})"

    @property
    def requested(self) -> bool:
        """True once any reason was given."""
        return self.cause is not None

    @property
    def early(self) -> bool:
        """True when the job stopped for a reason other than running out of rows."""
        return self.cause is not None and self.cause.early

    def on_request(self, listener: Callable[[StopCause], None]) -> None:
        """Call ``listener(cause)`` once a stop is requested (at once if it already was)."""
        if self.cause is not None:
            listener(self.cause)
        else:
            self._listeners.append(listener)

    def request(self, reason: StopReason, detail: str) -> bool:
        """Ask the job to stop. True if this was the first reason (the one that counts)."""
        if self.cause is not None:
            return False
        self.cause = StopCause(reason, detail)
        if reason is not StopReason.DONE:
            self._echo(f"stopping: {detail}; finishing requests in flight (up to {self.grace_s:g}s)")
        log.info("stop_requested reason=%s detail=%s", reason.value, detail)
        loop = asyncio.get_running_loop()
        now = loop.time()
        for scope in list(self._requested_scopes):
            _expire(scope, now)
        self._abort_at = now + self.grace_s
        for scope in list(self._aborted_scopes):
            _expire(scope, self._abort_at)
        loop.call_at(self._abort_at, self.abort)
        if self._event is not None:
            self._event.set()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener(self.cause)
        return True

    def abort(self) -> None:
        """End the grace now: every scope of :meth:`until_aborted` is cancelled."""
        if self.aborted:
            return
        self.aborted = True
        now = asyncio.get_running_loop().time()
        self._abort_at = now
        for scope in list(self._aborted_scopes):
            _expire(scope, now)

    def until_requested(self) -> CancelScope:
        """A scope cancelled as soon as a stop is requested."""
        when = asyncio.get_running_loop().time() if self.cause is not None else None
        return CancelScope(self._requested_scopes, when)

    def until_aborted(self) -> CancelScope:
        """A scope cancelled when the grace after a stop ends (or at once after :meth:`abort`)."""
        return CancelScope(self._aborted_scopes, self._abort_at)

    async def wait(self) -> StopCause:
        """Wait until a stop is requested, and say why."""
        if self.cause is None:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        assert self.cause is not None
        return self.cause


def _expire(scope: asyncio.Timeout, when: float) -> None:
    current = scope.when()
    if current is None or when < current:
        scope.reschedule(when)


class SignalIntent:
    """What each signal means for ``stop``, called on the event loop that runs the job.

    The first graceful signal requests a stop; another one later than :data:`SAME_INTENT_S` (or SIGQUIT)
    aborts the requests in flight. ``first`` names the first signal received, if any.
    """

    def __init__(self, stop: Stop, echo: Callable[[str], None]) -> None:
        self.stop = stop
        self.echo = echo
        self.first: str | None = None
        self._first_at = 0.0

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        if self.first is not None and now - self._first_at < SAME_INTENT_S and name not in ABORT_SIGNALS:
            return
        if self.first is None:
            self.first, self._first_at = name, now
        stop, echo = self.stop, self.echo
        if stop.request(StopReason.SIGNAL, f"interrupted by {name}"):
            if name in ABORT_SIGNALS:
                echo(f"{name}: abandoning requests in flight now")
                stop.abort()
            return
        assert stop.cause is not None
        if stop.cause.reason is StopReason.SIGNAL:
            echo(f"{name} again: abandoning requests in flight now; the endpoint is still released")
        else:
            echo(f"{name} received while the job stops ({stop.cause.detail}): abandoning what is in flight; "
                 "the endpoint is still released")
        stop.abort()


@contextmanager
def catch_signals(
    stop: Stop, *, echo: Callable[[str], None], enabled: bool = True, borrowed: bool = False
) -> Iterator[SignalIntent]:
    """Route SIGINT, SIGTERM, SIGHUP and SIGQUIT to ``stop`` while the block runs (in the event loop).

    The first graceful signal requests a stop; another one a moment later (or SIGQUIT) aborts the
    requests in flight. Neither cuts the endpoint's release short: it runs after the dispatch, and a
    signal then only says that it is being finished. Only the main thread's loop can take signals;
    elsewhere (and with ``enabled=False``) this does nothing. A signal the process ignores (``nohup``
    ignores SIGHUP) stays ignored.

    ``borrowed``: the loop and the process are the caller's (``batchrun.arun``). Only the signals that
    nobody handles (their default action would end the process with the endpoint running) are taken,
    and the first one taken is delivered again once the block has ended, to its default action.
    """
    intent = SignalIntent(stop, echo)
    if not enabled or sys.platform == "win32":
        yield intent
        return
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for name in (*GRACEFUL_SIGNALS, *ABORT_SIGNALS):
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) is signal.SIG_IGN:
            continue  # a signal the process ignores stays ignored: `nohup batchrun run` outlives its terminal
        if borrowed and signal.getsignal(sig) is not signal.SIG_DFL:
            continue
        try:
            loop.add_signal_handler(sig, intent, name)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such signal here
            continue
        installed.append(sig)
    try:
        yield intent
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if borrowed and intent.first is not None:
            _deliver_again(intent.first)


#: The signals the Python API takes from a script's main thread while a job runs; SIGINT is not among them,
#: it reaches the job as the KeyboardInterrupt it raises in the waiting thread.
FORWARDED_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT")


@contextmanager
def forward_signals(deliver: Callable[[str], None]) -> Iterator[list[str]]:
    """In the main thread, while the block runs: SIGTERM, SIGHUP and SIGQUIT go to ``deliver(name)``.

    For ``batchrun.run``, whose job runs on a thread of its own (whose loop cannot take signals):
    ``deliver`` passes the signal on to that loop. A signal the process ignores (``nohup`` ignores
    SIGHUP) stays ignored. Once the block ends, the previous handlers are put back and the first
    signal received is delivered again, to them: by default that ends the process, now that the
    endpoint is released. Off the main thread (or on Windows) this does nothing.
    """
    received: list[str] = []
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        received.append(name)
        deliver(name)

    previous: dict[signal.Signals, Any] = {}
    for name in FORWARDED_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is None or signal.getsignal(sig) in (signal.SIG_IGN, None):  # ignored, or not set from Python
            continue
        previous[sig] = signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)
        if received:
            _deliver_again(received[0])


def _deliver_again(name: str) -> None:
    """Signal ``name`` to this process again, for whatever handles it now (by default: the process ends).

    What was printed is flushed first: an ending by a signal would lose what a buffer still holds.
    """
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # a closed stream: nothing to lose
            stream.flush()
    signal.raise_signal(getattr(signal, name))
