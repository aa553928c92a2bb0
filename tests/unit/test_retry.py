"""The retry policy (reliability.md §2) as pure functions: classification, backoff, Retry-After, budget."""

from __future__ import annotations

import email.utils
import random

import pytest

from batchrun.errors import RequestFailed
from batchrun.records import FailureType
from batchrun.retry import (
    TRANSPORT_FAILURES,
    Decision,
    RetryBudget,
    RetryPolicy,
    Verdict,
    classify,
    is_overload,
    parse_retry_after,
)
from batchrun.spec import RetrySpec


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def failure(status: int | None = 503, *, retry_after: float | None = None, retryable: bool = True) -> RequestFailed:
    return RequestFailed(f"http_{status}", "boom", status=status, retryable=retryable, retry_after=retry_after)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504, 507, 599])
def test_transient_statuses_and_unknown_5xx_are_retried(status: int) -> None:
    assert classify(status) is Verdict.RETRY


@pytest.mark.parametrize("status", [400, 404, 405, 409, 413, 418, 422, 424, 301, 100])
def test_client_errors_and_unknown_4xx_fail_the_row_at_once(status: int) -> None:
    assert classify(status) is Verdict.FAIL


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_stops_the_job(status: int) -> None:
    assert classify(status) is Verdict.STOP_JOB


@pytest.mark.parametrize("kind", sorted(TRANSPORT_FAILURES))
def test_timeouts_connection_errors_and_bad_bodies_are_retried(kind: FailureType) -> None:
    assert classify(kind) is Verdict.RETRY


def test_2xx_is_success() -> None:
    assert classify(200) is Verdict.SUCCESS and classify(204) is Verdict.SUCCESS


def test_429_503_and_timeouts_count_as_overload_but_500_does_not() -> None:
    assert is_overload(failure(429)) and is_overload(failure(503))
    assert is_overload(RequestFailed("timeout", "slow", retryable=True))
    assert not is_overload(failure(500))
    assert not is_overload(RequestFailed("connection", "reset", retryable=True))


def test_retry_after_reads_seconds_and_decimals() -> None:
    assert parse_retry_after("7", 0.0, maximum=60) == 7.0
    assert parse_retry_after(" 1.5 ", 0.0, maximum=60) == 1.5


def test_retry_after_is_clamped_to_zero_and_the_maximum() -> None:
    assert parse_retry_after("-3", 0.0, maximum=60) == 0.0
    assert parse_retry_after("86400", 0.0, maximum=60) == 60.0
    assert parse_retry_after("inf", 0.0, maximum=60) == 60.0


def test_retry_after_reads_an_http_date_relative_to_now() -> None:
    now = 1_800_000_000.0
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now, maximum=120) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(past, now, maximum=120) == 0.0
    assert parse_retry_after(email.utils.formatdate(now + 3600, usegmt=True), now, maximum=120) == 120.0


@pytest.mark.parametrize("value", [None, "", "soon", "nan", "Mon, 99 Foo 2026"])
def test_unreadable_retry_after_is_ignored(value: str | None) -> None:
    assert parse_retry_after(value, 0.0, maximum=60) is None


def test_backoff_is_full_jitter_within_the_exponential_ceiling() -> None:
    policy = RetryPolicy(max_attempts=100, backoff_base=0.5, backoff_cap=8.0)
    rng = random.Random(42)
    for attempt in range(8):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [policy.decide(failure(), attempt, rng).delay_s for _ in range(300)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling


def test_same_seed_gives_the_same_delays() -> None:
    policy = RetryPolicy()
    a = [policy.delay(failure(), i, random.Random(7)) for i in range(5)]
    b = [policy.delay(failure(), i, random.Random(7)) for i in range(5)]
    assert a == b


def test_retry_after_is_a_floor_on_the_delay() -> None:
    policy = RetryPolicy(backoff_base=0.01, backoff_cap=0.01, max_retry_after=60)
    rng = random.Random(1)
    assert all(policy.decide(failure(retry_after=5.0), 0, rng).delay_s >= 5.0 for _ in range(50))


def test_retry_after_beyond_the_maximum_is_clamped() -> None:
    policy = RetryPolicy(backoff_base=0.01, backoff_cap=0.01, max_retry_after=10)
    assert policy.decide(failure(retry_after=3600.0), 0, random.Random(1)).delay_s == pytest.approx(10.0, abs=0.011)


def test_a_row_gets_max_attempts_then_gives_up() -> None:
    policy = RetryPolicy(max_attempts=3)
    rng = random.Random(0)
    assert policy.decide(failure(), 0, rng).retry
    assert policy.decide(failure(), 1, rng).retry
    assert policy.decide(failure(), 2, rng) == Decision.give_up()


def test_permanent_failures_are_never_retried() -> None:
    assert RetryPolicy().decide(failure(422, retryable=False), 0, random.Random(0)) == Decision.give_up()


def test_one_attempt_policy_never_retries() -> None:
    assert not RetryPolicy(max_attempts=1).decide(failure(), 0, random.Random(0)).retry


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(backoff_base=-1)


def test_budget_always_allows_min_retries() -> None:
    budget = RetryBudget(ratio=0.1, window_s=60, min_retries=3, clock=FakeClock())
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_budget_allows_about_ten_percent_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_s=60, min_retries=0, clock=clock)
    for _ in range(500):
        budget.record_request()
    spent = 0
    while budget.try_spend():
        spent += 1
        budget.record_request()  # a retry is a request too
    assert 50 <= spent <= 56
    assert budget.time_until_available() > 0


def test_spent_budget_comes_back_when_the_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, window_s=60, min_retries=2, clock=clock)
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    wait = budget.time_until_available()
    assert 59 <= wait <= 61
    clock.now += wait - 2
    assert not budget.try_spend()
    clock.now += 2.01
    assert budget.time_until_available() == 0.0
    assert budget.try_spend()


def test_old_requests_stop_counting_after_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, window_s=10, min_retries=0, clock=clock)
    for _ in range(100):
        budget.record_request()
    assert budget.allowed == 50
    clock.now += 11
    assert budget.allowed == 0


def test_requests_leave_the_window_by_the_slice_they_were_sent_in() -> None:
    """A request is counted into the slice of its time: those sent half a window later stay when the
    first ones leave (within one slice, the count skips looking at the window, never across slices)."""
    clock = FakeClock()
    budget = RetryBudget(ratio=0.5, window_s=10, min_retries=0, buckets=10, clock=clock)
    for _ in range(100):
        budget.record_request()
    clock.now += 0.5  # still the first slice
    for _ in range(20):
        budget.record_request()
    clock.now += 4.5  # half a window on
    for _ in range(60):
        budget.record_request()
    assert budget.allowed == 90
    clock.now += 6  # the first 120 have left; the 60 have not
    assert budget.allowed == 30
    clock.now += 5
    assert budget.allowed == 0


def test_a_bare_policy_and_a_job_without_a_retries_section_agree() -> None:
    assert RetryPolicy() == RetryPolicy.from_spec(RetrySpec())
    assert RetryPolicy().max_attempts == RetrySpec().max_attempts == 5
    assert RetryBudget().ratio == RetrySpec().budget_ratio


def test_from_spec_carries_every_retry_knob() -> None:
    spec = RetrySpec(max_attempts=2, backoff_base=0.1, backoff_cap=3.0, max_retry_after=9.0, budget_ratio=0.5)
    policy = RetryPolicy.from_spec(spec)
    assert (policy.max_attempts, policy.backoff_base, policy.backoff_cap, policy.max_retry_after) == (2, 0.1, 3.0, 9.0)
