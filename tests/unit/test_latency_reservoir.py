"""The latency sample behind the summary's p50/p95: bounded, and uniform over every latency offered."""

from __future__ import annotations

import pytest

from batchrun.dispatch_stats import LatencyReservoir


def test_it_keeps_everything_until_full_then_holds_its_size() -> None:
    sample = LatencyReservoir(size=8)
    for value in range(5):
        sample.add(float(value))
    assert sorted(sample._values) == [0.0, 1.0, 2.0, 3.0, 4.0]
    for value in range(5, 10_000):
        sample.add(float(value))
    assert len(sample._values) == 8
    assert sample.count == 10_000
    assert len(set(sample._values)) == 8  # a value is kept once: a slot is replaced, never duplicated
    assert all(0 <= v < 10_000 for v in sample._values)


def test_every_latency_is_equally_likely_to_be_kept() -> None:
    """Offered 0..99 into 10 slots, 2,000 times over: each value is kept in ~10% of the samples,
    the first ones (which fill the sample) as often as the last (which skips must not pass over)."""
    size, offered, trials = 10, 100, 2_000
    kept = [0] * offered
    for seed in range(trials):
        sample = LatencyReservoir(size=size, seed=seed)
        for value in range(offered):
            sample.add(float(value))
        for value in sample._values:
            kept[int(value)] += 1
    shares = [k / trials for k in kept]
    # Each share is binomial around 0.1 with a standard deviation of ~0.0067: 0.035 is over 5 of them.
    assert max(abs(share - size / offered) for share in shares) < 0.035, shares
    first, last = sum(shares[:20]) / 20, sum(shares[-20:]) / 20
    assert abs(first - last) < 0.01, (first, last)


def test_quantiles_of_a_long_stream() -> None:
    sample = LatencyReservoir(size=1024, seed=1)
    for i in range(50_000):
        sample.add((i % 1000) / 1000)  # uniform on [0, 1)
    assert sample.quantile(0.5) == pytest.approx(0.5, abs=0.05)
    assert sample.quantile(0.95) == pytest.approx(0.95, abs=0.03)
    assert LatencyReservoir().quantile(0.5) is None

