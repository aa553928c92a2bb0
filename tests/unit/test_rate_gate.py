"""The rate gate of a lane (batchrun.rate), on a fake clock: what it lets out, and what it learns."""

from __future__ import annotations

import random

import pytest

from batchrun.rate import RateGate, RateLimits, RequestSize, is_rate_refusal, parse_reset, request_size


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def gate(clock: Clock, limits: RateLimits | None = None) -> RateGate:
    return RateGate(limits, clock=clock, rng=random.Random(0))


def headers(kind: str, limit: int, remaining: int, reset: str) -> dict[str, str]:
    return {f"x-ratelimit-limit-{kind}": str(limit), f"x-ratelimit-remaining-{kind}": str(remaining),
            f"x-ratelimit-reset-{kind}": reset}


@pytest.mark.parametrize(("text", "seconds"), [
    ("1s", 1.0), ("120ms", 0.12), ("6m0s", 360.0), ("1h2m3.5s", 3723.5), ("0.5", 0.5), ("20", 20.0),
    ("0s", 0.0), (None, None), ("", None), ("soon", None), ("1s later", None), ("-1", None),
])
def test_resets_are_read_as_go_durations_or_seconds(text: str | None, seconds: float | None) -> None:
    assert parse_reset(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_a_request_weighs_its_prompt_characters_and_its_max_tokens() -> None:
    chat = {"messages": [{"role": "system", "content": "abcd"},
                         {"role": "user", "content": [{"type": "text", "text": "efgh"},
                                                      {"type": "image_url", "image_url": {"url": "x"}}]}],
            "max_tokens": 16}
    size = request_size(chat)
    assert size.prompt_chars > 8 and size.max_tokens == 16
    assert request_size({"inputs": "abcdefgh", "parameters": {"max_new_tokens": 5}}) == RequestSize(8, 5)
    assert request_size({"messages": [{"role": "user", "content": "hi"}]}) == RequestSize(2, 0)


def test_a_gate_without_limits_stays_idle_and_lets_everything_out(clock: Clock) -> None:
    g = gate(clock)
    assert g.idle and not g.counts_tokens
    for _ in range(1000):
        assert g.wait_s() == 0
        g.take(None)
    assert g.idle


def test_the_specs_rpm_holds_over_any_sixty_seconds(clock: Clock) -> None:
    g = gate(clock, RateLimits(rpm=3))
    for step in range(3):
        assert g.wait_s() == 0
        g.take(None)
        clock.now += 10 * step
    # 3 sent at 100, 100, 110 (clock now 130): the 4th waits until the first is a minute old.
    assert g.wait_s() == pytest.approx(30.0)
    clock.now = 160.0
    assert g.wait_s() == 0


def test_the_specs_tpm_counts_prompt_estimate_plus_max_tokens(clock: Clock) -> None:
    g = gate(clock, RateLimits(tpm=100))
    assert g.counts_tokens
    size = RequestSize(prompt_chars=80, max_tokens=20)  # 80/4 + 20 = 40 tokens
    assert g.tokens(size)[0] == 40
    g.take(size)
    g.take(size)
    assert g.wait_s(40) == pytest.approx(60.0)  # 80 used: 40 more would pass 100
    assert g.wait_s(20) == 0


def test_the_prompt_estimate_is_corrected_by_the_tokens_answers_report(clock: Clock) -> None:
    g = gate(clock, RateLimits(tpm=10_000))
    size = RequestSize(prompt_chars=400, max_tokens=0)  # estimated 100 prompt tokens
    for _ in range(30):
        g.on_answer(g.take(size), prompt_tokens=200)  # the provider counts twice as many
    assert g.ratio == pytest.approx(2.0, rel=0.01)
    assert g.tokens(size)[0] == pytest.approx(200, abs=2)


def test_announced_limits_are_learned_without_being_told(clock: Clock) -> None:
    g = gate(clock)
    first = g.take(None)
    g.observe(headers("requests", 10, 9, "1s"), first, clock.now)
    assert not g.idle
    assert g.wait_s() == 0


def test_when_nothing_remains_the_lane_waits_until_the_reset(clock: Clock) -> None:
    g = gate(clock)
    ticket = g.take(None)
    clock.now += 0.1  # answered 100 ms later: the window turns 1 s after the request was sent
    g.observe(headers("requests", 5, 0, "1s"), ticket, clock.now)
    assert g.wait_s() == pytest.approx(0.9, abs=0.01)
    assert not g.ready(clock.now)
    clock.now = ticket.sent_at + 1.01
    assert g.wait_s() == 0  # the window is whole again: five may go
    for _ in range(5):
        assert g.wait_s() == 0
        g.take(None)
    assert g.wait_s() > 0  # the sixth waits for an answer to say when this window turns


def test_what_may_not_be_counted_yet_is_taken_off_what_remains(clock: Clock) -> None:
    g = gate(clock)
    older = g.take(None)  # still out: the server may count it after the answered one
    answered = g.take(None)
    for _ in range(3):
        g.take(None)  # sent before its answer came back
    g.observe(headers("requests", 100, 6, "10s"), answered, clock.now)
    assert g.wait_s() == 0  # 6 remained when it was counted; 3 sent since and 1 older still out: 2 left
    g.take(None)
    g.take(None)
    assert g.wait_s() > 0
    g.settle(older)


def test_a_count_never_raises_what_remains_only_the_reset_does(clock: Clock) -> None:
    g = gate(clock)
    first = g.take(None)
    g.observe(headers("requests", 100, 0, "10s"), first, clock.now)
    g.settle(first)
    late = g.take(None) if g.wait_s() == 0 else None
    assert late is None
    second = g.take(None)  # as if sent anyway: a larger count read later does not bring back room
    g.observe(headers("requests", 100, 50, "10s"), second, clock.now)
    assert g.wait_s() > 0
    clock.now += 10.01
    assert g.wait_s() == 0


def test_a_token_window_is_held_with_the_estimates_of_requests_still_out(clock: Clock) -> None:
    g = gate(clock)
    size = RequestSize(prompt_chars=40, max_tokens=10)  # 20 tokens
    first = g.take(size)
    g.observe(headers("tokens", 100, 80, "1s"), first, clock.now)
    assert g.counts_tokens
    for _ in range(4):
        assert g.wait_s(20) == 0
        g.take(size)
    assert g.wait_s(20) == pytest.approx(1.0 + 0.005)


def _refused(g: RateGate, clock: Clock, times: int) -> list[float]:
    """The pauses of ``times`` rate 429s in a row without Retry-After, each for a request sent after the last pause."""
    pauses = []
    for _ in range(times):
        ticket = g.take(None)
        pauses.append(g.on_rate_refusal(None, ticket))
        clock.now = g.paused_until
        g.settle(ticket)
    return pauses


def test_a_429_without_retry_after_pauses_for_full_jitter_under_a_ceiling_that_doubles(clock: Clock) -> None:
    # reliability.md §2: sleep = uniform(0, min(cap, base * 2**n)), the draw retry.py's backoff makes.
    pauses = _refused(RateGate(clock=clock, rng=random.Random(7)), clock, 9)
    expected = random.Random(7)
    assert pauses == [expected.uniform(0.0, min(30.0, 0.25 * 2**n)) for n in range(9)]


def test_the_pauses_spread_over_the_whole_range_from_zero_to_the_ceiling(clock: Clock) -> None:
    # Lanes (and clients) refused together must not come back together: no fixed half under the draw.
    rng = random.Random(3)
    for streak, ceiling in ((0, 0.25), (3, 2.0), (12, 30.0)):  # the last one past the cap
        pauses = []
        for _ in range(2000):
            g = RateGate(clock=clock, rng=rng)
            pauses.append(_refused(g, clock, streak + 1)[-1])
        assert 0.0 <= min(pauses) < 0.01 * ceiling and 0.99 * ceiling < max(pauses) <= ceiling
        assert sum(pauses) / len(pauses) == pytest.approx(ceiling / 2, rel=0.05)
        below_half = sum(p < ceiling / 2 for p in pauses) / len(pauses)
        assert below_half == pytest.approx(0.5, abs=0.05)  # equal jitter would put none there


def test_a_success_ends_the_streak_of_pauses(clock: Clock) -> None:
    g = gate(clock)
    _refused(g, clock, 6)
    g.on_answer(None, None)
    assert g.on_rate_refusal(None, g.take(None)) <= 0.25


def test_a_retry_after_is_honoured_exactly_whatever_the_streak(clock: Clock) -> None:
    g = gate(clock)
    _refused(g, clock, 5)
    ticket = g.take(None)
    clock.now += 0.01
    assert g.on_rate_refusal(1.5, ticket) == 1.5
    g.settle(ticket)
    assert not g.ready(clock.now + 1.49)
    assert g.ready(clock.now + 1.5)


def test_refusals_of_one_burst_pause_the_lane_once(clock: Clock) -> None:
    g = gate(clock)
    burst = [g.take(None) for _ in range(10)]
    clock.now += 0.01
    first = g.on_rate_refusal(None, burst[0])
    assert [g.on_rate_refusal(None, t) for t in burst[1:]] == [0.0] * 9
    assert g.paused_until == pytest.approx(clock.now + first)


def test_after_a_pause_without_headers_one_request_goes_first(clock: Clock) -> None:
    g = gate(clock)
    g.on_rate_refusal(None, g.take(None))
    clock.now = g.paused_until
    probe = g.take(None)
    assert g.wait_s() > 0  # the others wait for the probe's answer
    g.on_answer(probe, None)
    g.settle(probe)
    assert g.wait_s() == 0


def test_a_429_with_retry_after_pauses_the_lane_exactly_that_long(clock: Clock) -> None:
    g = gate(clock)
    assert g.on_rate_refusal(2.0) == 2.0
    assert g.wait_s() == pytest.approx(2.0)
    assert not g.ready(clock.now + 1.9)
    assert g.ready(clock.now + 2.0)


def test_a_rate_429_is_told_from_tgis_capacity_refusal() -> None:
    overloaded = b'{"error":"Model is overloaded","error_type":"overloaded"}'
    assert not is_rate_refusal({}, overloaded)
    assert is_rate_refusal({"Retry-After": "1"}, overloaded)
    assert is_rate_refusal({"x-ratelimit-remaining-tokens": "0"}, b"{}")
    assert is_rate_refusal({}, b'{"error": {"message": "slow down", "code": "rate_limit_exceeded"}}')


def test_the_specs_own_limits_section_is_taken_as_it_is(clock: Clock) -> None:
    from batchrun.spec import LimitsSpec

    g = gate(clock, LimitsSpec(rpm=2))
    assert g.limits == RateLimits(rpm=2) and not g.idle


def test_a_spent_window_with_no_reset_known_and_nothing_out_is_taken_as_whole(clock: Clock) -> None:
    g = gate(clock)
    first = g.take(None)
    g.observe(headers("requests", 2, 1, "1s"), first, clock.now)
    g.settle(first)
    clock.now += 1.01  # the window turned: the lane counts afresh
    sent = [g.take(None) for _ in range(2) if g.wait_s() == 0]
    assert len(sent) == 2 and g.wait_s() > 0  # spent, and the two out will say when it turns
    for ticket in sent:
        g.settle(ticket)  # both failed without an answer: nothing will say
    assert g.wait_s() == 0
