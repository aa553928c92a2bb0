"""The circuit breaker: an outage pauses intake, one probe finds the return, rows keep their attempts.

The state machine is checked with a fake clock; a whole job on the emulator, which checks that an
outage costs a handful of requests instead of one failed attempt per row, is in
tests/test_breaker_against_a_server.py.
"""

from __future__ import annotations

import pytest

from batchrun.breaker import Admission, BreakerState, CircuitBreaker


def test_the_breaker_opens_when_most_recent_outcomes_say_unavailable():
    breaker = CircuitBreaker(window=10, min_outcomes=10, trip_share=0.5, trip_streak=99)
    for i in range(5):
        breaker.record(unavailable=False, now=0.0, row=i)
    for i in range(4):
        assert not breaker.record(unavailable=True, now=1.0 + i, row=10 + i)
    assert breaker.admit(5.0) is Admission.SEND
    assert breaker.record(unavailable=True, now=5.0, row=20)  # 5 of 10: open
    assert breaker.state is BreakerState.OPEN and breaker.trips == 1
    assert breaker.admit(5.0) is Admission.WAIT
    assert breaker.describe(7.0) == "endpoint unavailable since 2s, probing"


def test_a_streak_of_unavailable_answers_opens_it_before_the_window_fills():
    breaker = CircuitBreaker(window=20, min_outcomes=10, trip_streak=5)
    for i in range(20):
        breaker.record(unavailable=False, now=float(i), row=i)
    for i in range(4):
        assert not breaker.record(unavailable=True, now=20.0 + i, row=100 + i)
    assert breaker.record(unavailable=True, now=24.0, row=104)  # 5 of 20 in the window, but 5 rows in a row
    assert breaker.state is BreakerState.OPEN


def test_a_few_failures_among_many_successes_leave_it_closed():
    breaker = CircuitBreaker(window=20, min_outcomes=10, trip_share=0.5)
    for i in range(200):
        breaker.record(unavailable=(i % 4 == 0), now=float(i), row=i)
    assert breaker.closed and breaker.trips == 0


def test_one_row_failing_again_and_again_is_not_an_outage():
    breaker = CircuitBreaker(window=10, min_outcomes=10)
    for i in range(30):  # the last row of a job, alone on the wire, failing every time
        assert not breaker.record(unavailable=True, now=float(i), row=7)
    assert breaker.closed and not breaker.suspects_outage


def test_one_probe_at_a_time_and_its_success_closes_the_breaker():
    breaker = CircuitBreaker(window=10, min_outcomes=10, probe_s=0.25, max_probe_s=2.0)
    for i in range(10):
        breaker.record(unavailable=True, now=0.0, row=i)
    assert breaker.admit(0.1) is Admission.WAIT and breaker.wait_s(0.1) == pytest.approx(0.15)
    assert breaker.admit(0.25) is Admission.PROBE
    assert breaker.admit(0.26) is Admission.WAIT  # only one probe on the wire
    assert breaker.record(unavailable=False, now=0.3, probe=True)
    assert breaker.closed and breaker.admit(0.3) is Admission.SEND and breaker.outage_s(0.3) == 0.0


def test_a_failed_probe_waits_longer_before_the_next_up_to_a_ceiling():
    breaker = CircuitBreaker(window=10, min_outcomes=10, probe_s=0.25, max_probe_s=1.0)
    for i in range(10):
        breaker.record(unavailable=True, now=0.0, row=i)
    now, waits = 0.25, []
    for _ in range(5):
        assert breaker.admit(now) is Admission.PROBE
        breaker.record(unavailable=True, now=now, probe=True)
        waits.append(breaker.wait_s(now))
        now += waits[-1]
    assert waits == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert breaker.outage_s(now) == pytest.approx(now)  # one outage, however many probes failed
