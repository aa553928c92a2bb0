"""The cost meter prices tokens as well as replica time: one figure for progress, the budget and the summary."""

from __future__ import annotations

import pytest

from batchrun.cost import BudgetGuard, CostMeter, ImagePrice, TokenPrice
from batchrun.endpoints.pool import PoolMeter
from batchrun.publish.card import _cost
from batchrun.stop import StopReason


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_answer_costs_its_tokens_at_the_spec_price_before_the_routers() -> None:
    meter = CostMeter(None, token_price=TokenPrice(1.0, 3.0))
    meter.provider_prices["together"] = TokenPrice(100.0, 100.0)
    assert meter.charge(1000, 500, provider="together") == pytest.approx(0.0025)
    assert meter.usd == pytest.approx(0.0025)
    assert meter.replica_seconds == 0.0


def test_without_a_spec_price_the_provider_that_answered_sets_the_price() -> None:
    meter = CostMeter(None, per_token=True)
    meter.provider_prices.update({"cheap": TokenPrice(0.1, 0.2), "": TokenPrice(1.0, 1.0)})
    assert meter.charge(1_000_000, 0, provider="cheap") == pytest.approx(0.1)
    assert meter.charge(1_000_000, 0, provider=None) == pytest.approx(1.0)  # unknown: the dearest that may serve
    assert meter.charge(10, 10, provider="unlisted") is None
    assert meter.unpriced_answers == 1


def test_a_meter_with_no_price_at_all_has_no_cost_but_counts_tokens() -> None:
    meter = CostMeter(None, per_token=True)
    assert meter.charge(7, 5) is None
    assert meter.usd is None and meter.billed and meter.prompt_tokens == 7


def test_the_projection_is_the_spend_plus_the_cost_per_row_so_far_for_the_rows_left() -> None:
    meter = CostMeter(None, token_price=TokenPrice(1_000_000, 0))
    for _ in range(4):
        meter.charge(1, 0)
    assert meter.projected_usd(done=4, remaining=6, elapsed_s=2.0) == pytest.approx(10.0)


def test_a_pool_adds_up_its_lanes_tokens_and_replica_time() -> None:
    clock = Clock()
    tokens = CostMeter(None, token_price=TokenPrice(1_000_000, 0), clock=clock)
    replicas = CostMeter(3600.0, clock=clock)
    replicas.start(1)
    tokens.start(1)
    clock.now += 2
    tokens.charge(3, 0)
    pool = PoolMeter([tokens, replicas])
    assert pool.usd == pytest.approx(5.0)
    assert pool.token_usd == pytest.approx(3.0) and pool.replica_seconds == pytest.approx(2.0)
    assert pool.dearest_answer_usd == pytest.approx(3.0)


def test_the_budget_stops_when_the_requests_in_flight_and_the_next_could_cross_it() -> None:
    meter = CostMeter(None, token_price=TokenPrice(1_000_000, 0))
    in_flight = 3
    guard = BudgetGuard(max_usd=10.0, deadline_s=None, margin_s=2.0, started_at=0.0, in_flight=lambda: in_flight)
    meter.start(1)
    for _ in range(5):
        meter.charge(1, 0)  # $5 spent, each answer $1: 3 in flight and 1 more could make $9
    assert guard.check(meter) is None
    meter.charge(1, 0)  # $6: they could make $10
    reason = guard.check(meter)
    assert reason is not None and reason[0] is StopReason.BUDGET


def test_the_card_says_a_serverless_job_is_billed_per_token() -> None:
    assert _cost({"usd": 0.25, "replica_hours": 0.0, "runs": 2}) == "$0.2500; 2 run(s), billed per token"
    assert "replica-hours" in _cost({"usd": 1.0, "replica_hours": 0.5, "runs": 1})


def test_images_are_charged_per_image_and_the_budget_keeps_the_dearest_back() -> None:
    meter = CostMeter(None, per_token=True, image_price=ImagePrice(per_image=0.25))
    assert [meter.charge_image() for _ in range(3)] == [0.25, 0.25, 0.25]
    assert meter.images == 3 and meter.usd == pytest.approx(0.75) and meter.billed and meter.priced
    guard = BudgetGuard(max_usd=1.25, deadline_s=None, margin_s=0.0, started_at=0.0, in_flight=lambda: 1)
    assert guard.check(meter) is not None  # $0.75 spent, one in flight and one more: $1.25
    unpriced = CostMeter(None, per_token=True)
    assert unpriced.charge_image() is None and unpriced.images == 1 and unpriced.unpriced_answers == 1


def test_an_image_priced_per_megapixel_costs_its_size() -> None:
    price = ImagePrice(per_image=0.001, per_megapixel=0.02)
    meter = CostMeter(None, per_token=True, image_price=price)
    assert meter.charge_image(1000, 500) == pytest.approx(0.001 + 0.02 * 0.5)
    assert meter.charge_image(None, None) == pytest.approx(0.001)  # a size not known counts no megapixels
    assert str(price) == "$0.001 per image, $0.02 per megapixel"
    assert str(ImagePrice(per_megapixel=0.02)) == "$0.02 per megapixel"


def test_the_card_says_a_text_to_image_job_through_a_provider_is_billed_per_image() -> None:
    assert _cost({"usd": 0.03, "replica_hours": 0.0, "runs": 1}, per="image") == "$0.0300; 1 run(s), billed per image"
