"""minicnn.timing: the medians every speed figure is made of (no timing targets here)."""

import pytest

from minicnn.timing import Budget, Timing, compare, measure

TINY = Budget(repeats=5, min_time=0.0, warmup=2, warm_time=0.0, switch_time=0.0)


def test_compare_times_each_contestant_repeats_times():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    timings = compare({"a": a, "b": b}, TINY)
    assert set(timings) == {"a", "b"}
    for label, timing in timings.items():
        assert len(timing.times) == TINY.repeats and timing.number >= 1
        # warm-up, one calibration call, then each repeat: one re-warm-up call after the switch, and the timed calls
        assert calls[label] == TINY.warmup + 1 + TINY.repeats * (1 + timing.number)


def test_median_and_spread():
    timing = Timing([1.0, 2.0, 3.0, 4.0, 100.0], number=1)
    assert timing.median == 3.0  # the slow outlier does not move it
    assert timing.spread == pytest.approx((52.0 - 1.5) / 3.0)  # statistics.quantiles' exclusive method
    assert Timing([2.0], 1).spread == 0.0


def test_measure_calibrates_calls_to_the_minimum_time():
    timing = measure(lambda: None, Budget(repeats=3, min_time=0.001, warmup=1, warm_time=0.0, switch_time=0.0))
    assert timing.number > 1 and timing.median > 0
