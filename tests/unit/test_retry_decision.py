"""The retry decision alone (retry.next_step): one outcome in, one step out, no endpoint, no clock, no sleep.

Each case is a row of a table: what the attempt brought, what the row had been through, what the endpoint
looks like, and the step expected. The random draw is pinned to the top of its range, so that every delay
is the ceiling the policy allows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest

from batchrun.errors import RequestFailed
from batchrun.records import Row
from batchrun.retry import (
    ENDPOINT_PAUSED,
    INVALID_OUTPUT,
    Action,
    Drain,
    RetryPolicy,
    RetryRules,
    Step,
    Tries,
    Verdict,
    classify,
    next_step,
)
from batchrun.tasks.base import PreparedRequest, Redraw

SENT_AT = 1000.0
NOW = 1001.0
OUTAGE_S = 60.0
RULES = RetryRules(
    policy=RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_cap=8.0, max_retry_after=30.0),
    outage_timeout_s=OUTAGE_S,
    invalid_output_retries=2,
)


class TopOfRange(random.Random):
    """Every jittered draw at its ceiling: delays are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class Endpoint:
    """What the decision reads of an endpoint (retry.EndpointView), set by each case."""

    is_drained: bool = False
    succeeded: bool = True
    suspects_outage: bool = False
    throttled_since: float | None = None
    excuses: bool = False

    def throttled_for(self, now: float) -> float:
        return 0.0 if self.throttled_since is None else now - self.throttled_since

    def excused(self, failure: RequestFailed) -> bool:
        return self.excuses


def http(status: int, *, model: bool = False, retry_after: float | None = None, rate: bool = False) -> RequestFailed:
    return RequestFailed(f"http_{status}", f"HTTP {status}", status=status, retryable=classify(status) is Verdict.RETRY,
                         retry_after=retry_after, model_answered=model, rate_limited=rate)


def refused() -> RequestFailed:
    return RequestFailed("connection", "connection refused", retryable=True, unreached=True)


def timeout() -> RequestFailed:
    return RequestFailed("timeout", "no complete answer within 30 s", retryable=True)


def _same(request: PreparedRequest, row: Row, n: int) -> PreparedRequest:
    return request


INVALID = Redraw("the answer is not valid against the schema", _same)
ANSWER: dict[str, Any] = {"generated_text": "ok"}

# id, outcome, tries before, endpoint, expected (action, tries after, delay, spends budget, drain)
CASES: list[tuple[str, Any, Tries, Endpoint, tuple[Action, Tries, float, bool, Drain | None]]] = [
    ("an answer is done", ANSWER, Tries(), Endpoint(),
     (Action.DONE, Tries(), 0.0, True, None)),
    ("a 400 fails the row at once", http(400), Tries(), Endpoint(),
     (Action.FAIL, Tries(burned=1), 0.0, True, None)),
    ("a model's 500 is retried after the first backoff and costs an attempt", http(500, model=True), Tries(),
     Endpoint(), (Action.RETRY, Tries(burned=1), 1.0, True, None)),
    ("the backoff doubles with each attempt used", http(500, model=True), Tries(burned=1), Endpoint(),
     (Action.RETRY, Tries(burned=2), 2.0, True, None)),
    ("a failure on the last attempt fails the row", http(500, model=True), Tries(burned=2), Endpoint(),
     (Action.FAIL, Tries(burned=3), 0.0, True, None)),
    ("a retry waits at least the server's Retry-After", http(503, model=True, retry_after=5.0), Tries(), Endpoint(),
     (Action.RETRY, Tries(burned=1), 5.0, True, None)),
    ("a Retry-After past max_retry_after is cut to it", http(503, model=True, retry_after=500.0), Tries(), Endpoint(),
     (Action.RETRY, Tries(burned=1), 30.0, True, None)),
    ("a counted failure ends the cold streak", http(500, model=True), Tries(cold_streak=3), Endpoint(),
     (Action.RETRY, Tries(burned=1), 1.0, True, None)),
    ("a 401 drains the endpoint for its token", http(401), Tries(), Endpoint(),
     (Action.REROUTE, Tries(), 0.0, True, Drain.AUTH)),
    ("a 403 drains the endpoint for its token", http(403), Tries(burned=1), Endpoint(),
     (Action.REROUTE, Tries(burned=1), 0.0, True, Drain.AUTH)),
    ("a paused endpoint is drained", RequestFailed(ENDPOINT_PAUSED, "paused", status=400, retryable=False), Tries(),
     Endpoint(), (Action.REROUTE, Tries(), 0.0, True, Drain.PAUSED)),
    ("a redirect is a missing route", http(302), Tries(), Endpoint(),
     (Action.REROUTE, Tries(), 0.0, True, Drain.MISSING_ROUTE)),
    ("a 404 before any success is a missing route", http(404, model=True), Tries(), Endpoint(succeeded=False),
     (Action.REROUTE, Tries(), 0.0, True, Drain.MISSING_ROUTE)),
    ("a proxy's 405 after successes is a missing route", http(405), Tries(), Endpoint(),
     (Action.REROUTE, Tries(), 0.0, True, Drain.MISSING_ROUTE)),
    ("the model's own 404 after successes is the row's failure", http(404, model=True), Tries(), Endpoint(),
     (Action.FAIL, Tries(burned=1), 0.0, True, None)),
    ("any failure from an endpoint drained meanwhile goes elsewhere, its tries kept", http(500), Tries(burned=1),
     Endpoint(is_drained=True), (Action.REROUTE, Tries(burned=1), 0.0, True, None)),
    ("a first instant 429 costs no attempt and goes again for the next free slot", http(429), Tries(), Endpoint(),
     (Action.RETRY, Tries(throttle_streak=1), 0.0, False, None)),
    ("a 429 with Retry-After waits for it", http(429, retry_after=3.0), Tries(), Endpoint(),
     (Action.RETRY, Tries(throttle_streak=1), 3.0, False, None)),
    ("a rate 429 goes again at once: the lane's gate holds it, or another lane takes it",
     http(429, retry_after=3.0, rate=True), Tries(throttle_streak=2), Endpoint(),
     (Action.RETRY, Tries(throttle_streak=3), 0.0, False, None)),
    ("a second 429 in a row backs off longer", http(429), Tries(throttle_streak=1), Endpoint(),
     (Action.RETRY, Tries(throttle_streak=2), 2.0, False, None)),
    ("a 429 backoff stops growing at the cap", http(429), Tries(throttle_streak=40), Endpoint(),
     (Action.RETRY, Tries(throttle_streak=41), 8.0, False, None)),
    ("nothing but 429s past outage_timeout drains the endpoint", http(429), Tries(throttle_streak=9),
     Endpoint(throttled_since=NOW - OUTAGE_S - 1), (Action.REROUTE, Tries(throttle_streak=9), 0.0, True,
                                                    Drain.THROTTLED)),
    ("429s within outage_timeout keep waiting", http(429), Tries(), Endpoint(throttled_since=NOW - OUTAGE_S + 1),
     (Action.RETRY, Tries(throttle_streak=1), 0.0, False, None)),
    ("a 503 during a suspected outage costs no attempt nor budget", http(503), Tries(),
     Endpoint(suspects_outage=True), (Action.RETRY, Tries(cold_streak=1), 1.0, False, None)),
    ("a timeout during a suspected outage costs no attempt", timeout(), Tries(cold_streak=2),
     Endpoint(suspects_outage=True), (Action.RETRY, Tries(cold_streak=3), 4.0, False, None)),
    ("a timeout with no outage suspected costs an attempt", timeout(), Tries(), Endpoint(),
     (Action.RETRY, Tries(burned=1), 1.0, True, None)),
    ("a model's 500 during a suspected outage is the row's", http(500, model=True), Tries(),
     Endpoint(suspects_outage=True), (Action.RETRY, Tries(burned=1), 1.0, True, None)),
    ("a refused connection is never the row's fault", refused(), Tries(), Endpoint(),
     (Action.RETRY, Tries(cold_streak=1, unreached_since=SENT_AT), 1.0, False, None)),
    ("refused connections keep the time they began", refused(), Tries(cold_streak=1, unreached_since=SENT_AT - 30),
     Endpoint(), (Action.RETRY, Tries(cold_streak=2, unreached_since=SENT_AT - 30), 2.0, False, None)),
    ("refused connections past outage_timeout drain the endpoint", refused(),
     Tries(cold_streak=5, unreached_since=NOW - OUTAGE_S - 1), Endpoint(),
     (Action.REROUTE, Tries(cold_streak=5, unreached_since=NOW - OUTAGE_S - 1), 0.0, True, Drain.UNREACHED)),
    ("a failure that reached the server forgets the refused connections", http(500, model=True),
     Tries(cold_streak=2, unreached_since=SENT_AT - 30), Endpoint(), (Action.RETRY, Tries(burned=1), 1.0, True, None)),
    ("an excused failure (a cold start) costs no attempt but spends budget", http(503), Tries(), Endpoint(excuses=True),
     (Action.RETRY, Tries(cold_streak=1), 1.0, True, None)),
    ("the excused backoff stops growing at the cap", http(503), Tries(cold_streak=20), Endpoint(excuses=True),
     (Action.RETRY, Tries(cold_streak=21), 8.0, True, None)),
    ("an excused failure that cannot be retried fails the row", http(400), Tries(), Endpoint(excuses=True),
     (Action.FAIL, Tries(burned=1), 0.0, True, None)),
    ("an invalid answer is drawn again at once, without budget", INVALID, Tries(burned=1), Endpoint(),
     (Action.RETRY, Tries(burned=1, redraws=1), 0.0, False, None)),
    ("the last redraw allowed is drawn", INVALID, Tries(redraws=1), Endpoint(),
     (Action.RETRY, Tries(redraws=2), 0.0, False, None)),
]


@pytest.mark.parametrize(("outcome", "tries", "endpoint", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_next_step(outcome: Any, tries: Tries, endpoint: Endpoint,
                   expected: tuple[Action, Tries, float, bool, Drain | None]) -> None:
    step = next_step(outcome, tries, endpoint, rules=RULES, now=NOW, sent_at=SENT_AT, rng=TopOfRange())
    assert (step.action, step.tries, step.delay_s, step.spend_budget, step.drain) == expected


@pytest.mark.parametrize(("failure", "tries", "ahead"), [
    (http(429), Tries(), True),
    (http(429), Tries(throttle_streak=1), False),
    (http(429, retry_after=3.0), Tries(), False),
    (http(429, rate=True), Tries(), False),
    (http(503), Tries(), False),
], ids=["a first instant 429", "a second 429 in a row", "a 429 with Retry-After", "a rate 429", "a 503"])
def test_only_a_rows_first_instant_429_retries_ahead_for_the_next_free_slot(
        failure: RequestFailed, tries: Tries, ahead: bool) -> None:
    # The endpoint refused it for want of capacity and the limit measured that: the row waits at the head of
    # the queue for the slot the next answer frees. Everything else backs off with full jitter.
    step = next_step(failure, tries, Endpoint(), rules=RULES, now=NOW, sent_at=SENT_AT, rng=TopOfRange())
    assert step.action is Action.RETRY and step.ahead is ahead


def test_a_failed_row_records_the_failure_that_ended_it() -> None:
    failure = http(422)
    step = next_step(failure, Tries(), Endpoint(), rules=RULES, now=NOW, sent_at=SENT_AT, rng=TopOfRange())
    assert step.action is Action.FAIL and step.failure is failure


def test_an_invalid_answer_past_the_redraws_allowed_fails_as_invalid_output() -> None:
    step = next_step(INVALID, Tries(redraws=2), Endpoint(), rules=RULES, now=NOW, sent_at=SENT_AT, rng=TopOfRange())
    assert step.action is Action.FAIL and step.failure is not None
    assert (step.failure.error_type, step.failure.status, step.failure.retryable) == (INVALID_OUTPUT, 200, False)
    assert step.failure.message == INVALID.reason


@pytest.mark.parametrize(("outcome", "drain", "for_s"), [
    (http(429), Drain.THROTTLED, OUTAGE_S + 5),
    (refused(), Drain.UNREACHED, OUTAGE_S + 5),
], ids=["throttled", "unreached"])
def test_a_drain_for_time_says_how_long(outcome: RequestFailed, drain: Drain, for_s: float) -> None:
    endpoint = Endpoint(throttled_since=NOW - for_s)
    tries = Tries(unreached_since=NOW - for_s)
    step = next_step(outcome, tries, endpoint, rules=RULES, now=NOW, sent_at=SENT_AT, rng=TopOfRange())
    assert (step.action, step.drain, step.for_s) == (Action.REROUTE, drain, for_s)


def test_the_decision_leaves_the_tries_it_was_given_as_they_were() -> None:
    before = Tries(burned=1, cold_streak=2)
    step = next_step(http(500, model=True), before, Endpoint(), rules=RULES, now=NOW, sent_at=SENT_AT,
                     rng=TopOfRange())
    assert before == Tries(burned=1, cold_streak=2) and step.tries is not before
    assert isinstance(step, Step)
