"""A lane's rate gate: requests and tokens per window, from the spec's limits and the answers' headers.

A provider limits a key to so many requests and tokens per window (per minute, per second, per day:
they differ). A :class:`RateGate` sits in front of one lane (a :class:`~batchrun.routing.Route`) and
is asked before a request takes a concurrency slot: it answers how long to wait, and the request then
takes its share (:meth:`RateGate.take`). It learns from three sources:

- **The spec** (``limits: {rpm, tpm}``): at most that many requests and tokens over any 60 s, kept as
  a log of what was sent in the last minute. A sliding window is never more than a provider's fixed
  one allows, whichever way the provider counts.
- **The headers** (protocols-more.md §2): ``x-ratelimit-remaining-{requests,tokens}`` and
  ``-reset-*``. What remains is read as of when the answered request was sent: the server counted it
  then, and everything this lane sent afterwards is taken off. When nothing remains, the lane waits
  until the reset, then the window is whole again. No window length is assumed.
- **429s.** A 429 with ``Retry-After`` pauses the lane until then, exactly; a rate 429 without it (a
  limit the provider does not announce) pauses the lane for a growing time with full jitter
  (reliability.md §2, as the retries' backoff), which a success resets.
  Rows meanwhile go to other lanes (their room counts as none) or wait; none is failed for it.

A request's tokens are estimated before it is sent, as providers count them: the prompt (characters
÷ 4, times a ratio corrected by the ``prompt_tokens`` answers report) plus ``max_tokens``.

Pure arithmetic on a clock that is passed in, like the breaker and the limit: the dispatcher waits.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RateGate", "RateLimits", "RequestSize", "Ticket", "is_rate_refusal", "parse_reset", "request_size"]

#: The window of the spec's ``rpm`` and ``tpm``.
MINUTE_S = 60.0
#: Characters per token in the first estimate (OpenAI's rule of thumb for English).
CHARS_PER_TOKEN = 4.0
#: What an image part of a chat message is taken to cost, in characters (a low-detail image).
IMAGE_CHARS = 340
#: The pause after a rate 429 without Retry-After: full jitter under a ceiling that starts here and doubles
#: per 429 in a row, up to the cap.
PAUSE_BASE_S = 0.25
PAUSE_CAP_S = 30.0
#: Added to a header's reset: the server counts from when the request arrived, a little after it was sent.
RESET_MARGIN_S = 0.005
#: How often requests held behind a probe look again.
_PROBE_POLL_S = 0.02
#: How far the prompt's correction ratio moves toward each reported ``prompt_tokens`` (a short average).
_RATIO_ALPHA = 0.2

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_KINDS = ("requests", "tokens")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimits:
    """A lane's own limits per minute (the spec's ``limits``): ``rpm`` requests, ``tpm`` tokens; None: not told."""

    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"limits.{name} must be a positive integer, got {value}")


@dataclass(frozen=True, slots=True)
class RequestSize:
    """What a request weighs before it is sent: its prompt's characters and its ``max_tokens``."""

    prompt_chars: int
    max_tokens: int


@dataclass(slots=True)
class Ticket:
    """One request's share of the gate: its place in the lane's order, what it was counted as, when it left."""

    seq: int  # the lane's requests so far, this one included
    tokens: int
    prompt_estimate: float  # the prompt's first estimate in tokens, uncorrected
    sent_at: float
    tokens_so_far: int  # the lane's tokens so far, this one's included


def parse_reset(value: str | None) -> float | None:
    """Seconds in a reset header: a Go duration (``1s``, ``120ms``, ``6m0s``, ``1h2m3.5s``) or a plain number.

    None when absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        parts = _GO_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        seconds = sum(float(number) * _GO_UNITS[unit] for number, unit in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def request_size(payload: Mapping[str, Any]) -> RequestSize:
    """The weight of a request body: chat ``messages``, a ``prompt`` or TGI's ``inputs``; its token cap."""
    chars = 0
    messages = payload.get("messages")
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                chars += len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, Mapping):
                        text = part.get("text")
                        chars += len(text) if isinstance(text, str) else IMAGE_CHARS
    for key in ("prompt", "inputs"):
        text = payload.get(key)
        if isinstance(text, str):
            chars += len(text)
    cap = payload.get("max_tokens", payload.get("max_completion_tokens"))
    parameters = payload.get("parameters")
    if cap is None and isinstance(parameters, Mapping):
        cap = parameters.get("max_new_tokens")
    return RequestSize(chars, cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else 0)


class _Announced:
    """One kind (requests or tokens) as the headers announce it: the limit, what remains as of one
    request, and when the window is whole again."""

    __slots__ = ("basis_sent", "basis_seq", "limit", "remaining", "reset_at")

    def __init__(self) -> None:
        self.limit: int | None = None
        self.remaining: int | None = None
        self.basis_seq = -1  # the last request sent before the window turned (later ones count in this one)
        self.basis_sent = 0  # the lane's cumulative units sent when ``remaining`` was set
        self.reset_at: float | None = None


class _MinuteLog:
    """What the lane sent over the last ``window_s``, for a limit the spec gave (a sliding window)."""

    __slots__ = ("entries", "limit", "total", "window_s")

    def __init__(self, limit: int, window_s: float = MINUTE_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self.entries: deque[tuple[float, int]] = deque()
        self.total = 0

    def _expire(self, now: float) -> None:
        entries = self.entries
        while entries and entries[0][0] <= now - self.window_s:
            self.total -= entries.popleft()[1]

    def wait_s(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` more fits (0: now). A request larger than the limit goes alone."""
        self._expire(now)
        excess = self.total + amount - self.limit
        if excess <= 0 or not self.entries:
            return 0.0
        freed = 0
        for at, units in self.entries:
            freed += units
            if freed >= excess:
                return at + self.window_s - now
        return self.entries[-1][0] + self.window_s - now

    def add(self, amount: int, now: float) -> None:
        if amount:
            self.entries.append((now, amount))
            self.total += amount


class RateGate:
    """One lane's rate limits: how long a request must wait, and what each answer said (module docstring).

    ``idle`` while it knows of no limit and no 429 paused it: then the dispatcher asks it nothing
    before sending, and only shows it the answers' headers.
    """

    def __init__(self, limits: RateLimits | Any = None, *, clock: Callable[[], float],
                 rng: random.Random | None = None) -> None:
        # The spec's own section (``LimitsSpec``) has the same two fields: either may be given.
        if not isinstance(limits, RateLimits):
            limits = RateLimits(rpm=getattr(limits, "rpm", None), tpm=getattr(limits, "tpm", None))
        self.limits = limits
        self._clock = clock
        self._rng = rng or random.Random()
        self._logs = {kind: _MinuteLog(limit) for kind, limit in
                      (("requests", self.limits.rpm), ("tokens", self.limits.tpm)) if limit}
        self._announced = {kind: _Announced() for kind in _KINDS}
        self._sent = dict.fromkeys(_KINDS, 0)  # cumulative units this lane sent
        self._seq = 0
        self._out: dict[int, Ticket] = {}  # requests sent and not over yet, by their place in the order
        self.paused_until = -math.inf
        self._paused_at = -math.inf  # when the current pause began
        self._half_open = False  # after a pause without headers: one probe first
        self._probe: Ticket | None = None
        self.pause_streak = 0
        self.ratio = 1.0  # reported prompt tokens per estimated one
        self._ratio_samples = 0
        self.idle = not self._logs

    def __repr__(self) -> str:
        return f"RateGate(limits={self.limits}, paused_until={self.paused_until:.3f}, ratio={self.ratio:.2f})"

    @property
    def counts_tokens(self) -> bool:
        """Whether requests' tokens matter here (a token limit is known): only then are they estimated."""
        return "tokens" in self._logs or self._announced["tokens"].limit is not None

    def tokens(self, size: RequestSize | None) -> tuple[int, float]:
        """The tokens a request of ``size`` is counted as, and its prompt's first estimate (characters ÷ 4,
        before the correction answers taught)."""
        if size is None:
            return 0, 0.0
        prompt = size.prompt_chars / CHARS_PER_TOKEN
        return math.ceil(prompt * self.ratio) + size.max_tokens, prompt

    def wait_s(self, tokens: int = 0, now: float | None = None) -> float:
        """Seconds until a request of ``tokens`` may go out (0: now)."""
        if now is None:
            now = self._clock()
        wait = self.paused_until - now
        if self._half_open and self._probe is not None and wait <= 0:
            return _PROBE_POLL_S  # one request tests the lane after a pause; the others wait for its answer
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            log = self._logs.get(kind)
            if log is not None:
                wait = max(wait, log.wait_s(amount, now))
            wait = max(wait, self._announced_wait(kind, amount, now))
        return max(wait, 0.0)

    def _announced_wait(self, kind: str, amount: int, now: float) -> float:
        state = self._announced[kind]
        if state.remaining is None or state.limit is None:
            return 0.0
        if state.reset_at is not None and now >= state.reset_at:
            # The window is whole again: count from here until an answer says otherwise.
            state.remaining, state.basis_seq, state.basis_sent, state.reset_at = (
                state.limit, self._seq, self._sent[kind], None)
        left = state.remaining - (self._sent[kind] - state.basis_sent)
        if left >= amount or (amount > state.limit and left >= state.limit):
            return 0.0
        if state.reset_at is None:
            if self._out:
                return 0.05  # spent, and no answer has said when the window turns yet: one will
            # Nothing out to bring an answer (they all failed without headers): take the window as whole.
            state.remaining, state.basis_sent = state.limit, self._sent[kind]
            return 0.0
        return state.reset_at - now

    def ready(self, now: float) -> bool:
        """Whether a small request could go out now (routes compare their room with it)."""
        return self.idle or self.wait_s(0, now) <= 0

    def take(self, size: RequestSize | None, now: float | None = None) -> Ticket:
        """Count one request going out now (the caller waited :meth:`wait_s`)."""
        if now is None:
            now = self._clock()
        tokens, prompt = self.tokens(size) if self.counts_tokens else (0, 0.0)
        self._seq += 1
        self._sent["requests"] += 1
        self._sent["tokens"] += tokens
        if (log := self._logs.get("requests")) is not None:
            log.add(1, now)
        if (log := self._logs.get("tokens")) is not None:
            log.add(tokens, now)
        ticket = Ticket(self._seq, tokens, prompt, now, self._sent["tokens"])
        self._out[ticket.seq] = ticket
        if self._half_open and self._probe is None:
            self._probe = ticket
        return ticket

    def settle(self, ticket: Ticket | None) -> None:
        """The request of ``ticket`` is over, whatever its outcome: if it was the probe, others may follow."""
        if ticket is None:
            return
        self._out.pop(ticket.seq, None)
        if ticket is self._probe:
            self._probe = None

    def observe(self, headers: Mapping[str, str], ticket: Ticket | None, now: float, *, in_flight: int = 0,
                payload: Mapping[str, Any] | None = None) -> None:
        """Read an answer's ``x-ratelimit-*`` headers (any answer, a 429 included) for the request of ``ticket``.

        A count only ever lowers what the lane believes remains in the window: the server counted at the
        moment the request arrived, and requests may arrive in another order than they were sent, so
        everything still out that it may not have counted (sent after it, or sent before it and not
        answered yet) is taken off. Only the window turning (its reset) makes the whole limit available again.
        Without a ticket (the request left before the gate knew of any limit), the first count is taken as
        if the ``in_flight`` other requests out now, each the size of this one (its ``payload``), had been
        counted after it.
        """
        typical = request_size(payload) if ticket is None and payload is not None else None
        for kind in _KINDS:
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is None:
                continue
            try:
                count = int(float(remaining))
                limit = int(float(headers.get(f"x-ratelimit-limit-{kind}", remaining)))
            except ValueError:
                continue
            state = self._announced[kind]
            state.limit = max(limit, 1)
            self.idle = False
            reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
            if ticket is None:
                per_request = (1.0 if kind == "requests" else
                               _tokens_per_request(headers) or self._first_tokens(typical))
                self._lower(state, kind, count - math.ceil(in_flight * per_request))
                if state.reset_at is None and reset is not None:
                    state.reset_at = now + reset + RESET_MARGIN_S
                continue
            if ticket.seq <= state.basis_seq:
                continue  # counted in a window that has turned since
            uncounted = self._sent[kind] - (ticket.seq if kind == "requests" else ticket.tokens_so_far)
            uncounted += sum(1 if kind == "requests" else t.tokens for seq, t in self._out.items() if seq < ticket.seq)
            self._lower(state, kind, count - uncounted)
            if reset is not None:
                # The reset is counted from when the server saw the request, a little after it was sent:
                # of the answers in one window, the latest estimate is the closest.
                at = ticket.sent_at + reset + RESET_MARGIN_S
                if state.reset_at is None or at > state.reset_at:
                    state.reset_at = at

    def _lower(self, state: _Announced, kind: str, left: int) -> None:
        """What remains is at most ``left`` now (the first count sets it)."""
        if state.remaining is None or left < state.remaining - (self._sent[kind] - state.basis_sent):
            state.remaining, state.basis_sent = left, self._sent[kind]

    def _first_tokens(self, size: RequestSize | None) -> float:
        """A request's tokens before the gate counted any (its prompt's rule of thumb, then a quarter more)."""
        return 1.25 * self.tokens(size)[0] if size is not None else 0.0

    def on_answer(self, ticket: Ticket | None, prompt_tokens: int | None) -> None:
        """A success: the pause streak ends, and the prompt estimate moves toward what the answer reported."""
        self.pause_streak = 0
        self._half_open = False
        if ticket is None or prompt_tokens is None or ticket.prompt_estimate <= 0 or prompt_tokens <= 0:
            return
        observed = prompt_tokens / ticket.prompt_estimate
        alpha = _RATIO_ALPHA if self._ratio_samples else 1.0  # the first report replaces the rule of thumb
        self._ratio_samples += 1
        self.ratio = min(20.0, max(0.05, self.ratio + alpha * (observed - self.ratio)))

    def on_rate_refusal(self, retry_after: float | None, ticket: Ticket | None = None, now: float | None = None,
                        ) -> float:
        """A 429 for the lane's rate: pause it until ``retry_after``; without one, until the window the
        headers announce turns, or (no headers either) for a growing time with full jitter:
        ``uniform(0, min(PAUSE_CAP_S, PAUSE_BASE_S * 2**streak))``, so that lanes and clients refused together
        spread out. Returns the pause in seconds (0: the 429 was one already answered).

        Refusals of requests sent before the current pause began are the same overshoot seen again
        (TCP's once per window): they neither lengthen the pause nor grow the next one."""
        if now is None:
            now = self._clock()
        self.idle = False
        if retry_after is not None:
            pause = retry_after
        elif (reset := self._announced_reset(now)) is not None:
            pause = reset
        else:
            if self._paused_at > -math.inf and (ticket is None or ticket.sent_at < self._paused_at):
                return 0.0  # sent before the last pause began (without a ticket: before the gate woke)
            ceiling = min(PAUSE_CAP_S, PAUSE_BASE_S * 2.0 ** min(self.pause_streak, 32))
            pause = self._rng.uniform(0.0, ceiling)  # a short pause costs at most one 429: the probe below
            self.pause_streak += 1
            # Nothing says how much the provider takes: after the pause one request goes first, and the
            # rest follow its success (as the breaker's probe), so a pause costs one 429, not a burst.
            self._half_open = True
        if now + pause > self.paused_until:
            self.paused_until = now + pause
            self._paused_at = now
        return pause

    def _announced_reset(self, now: float) -> float | None:
        """Seconds until the latest announced window turns (None when no header announced one)."""
        resets = [state.reset_at for state in self._announced.values() if state.reset_at is not None]
        return max(0.0, max(resets) - now) if resets else None


def _tokens_per_request(headers: Mapping[str, str]) -> float:
    """Tokens per request the provider has counted in this window, from one answer's headers (0: unknown)."""
    try:
        tokens = float(headers["x-ratelimit-limit-tokens"]) - float(headers["x-ratelimit-remaining-tokens"])
        requests = float(headers["x-ratelimit-limit-requests"]) - float(headers["x-ratelimit-remaining-requests"])
    except (KeyError, ValueError):
        return 0.0
    return tokens / requests if requests > 0 and tokens > 0 else 0.0


def is_rate_refusal(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether a 429 speaks of a rate limit rather than of capacity: it carries Retry-After or rate-limit
    headers, or OpenAI's ``rate_limit_exceeded``. TGI's instant ``overloaded`` 429 is capacity (limit.py)."""
    if headers.get("Retry-After") is not None or headers.get("retry-after-ms") is not None:
        return True
    if any(name.lower().startswith("x-ratelimit-") for name in headers):
        return True
    head = body[:2048]
    return b"rate_limit" in head and b'"overloaded"' not in head
