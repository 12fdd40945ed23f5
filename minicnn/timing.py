"""Timing that holds up on a shared machine: warm up, calibrate, repeat, take medians.

Every speed figure of the project (bench/ and `minicnn demo`) is timed the
same way (`compare`, or `measure` for one function), so figures compare:

1. Warm up: call the function at least `warmup` times and for at least
   `warm_time` seconds. The first call compiles Numba kernels (or loads them
   from the cache) and allocates optimizer state; the next ones fill the CPU
   caches and wake the thread pools.
2. Calibrate: choose `number`, the calls per repeat, so that one repeat lasts
   at least `min_time` seconds; this amortises timer and scheduler noise
   over calls that may last only microseconds.
3. Repeat `repeats` times and keep the median time per call: unlike the
   mean, it ignores the odd repeat slowed down by another job on a shared
   machine. The spread (interquartile range / median) says how far to trust it.

Contestants doing the same work (minicnn and PyTorch) are timed in
interleaved rounds, one repeat of each per round, so that a slow spell of
the machine hits both and their ratio stays fair. Each switch costs a short
re-warm-up (`switch_time`): the worker threads of the previous contestant
(OpenBLAS's, PyTorch's OpenMP ones) keep spinning for a while after their
last job and would steal the cores from the next one.
"""

import math
import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How long to measure each figure: see the module docstring."""

    repeats: int
    min_time: float  # seconds per repeat, at least
    warmup: int  # calls, at least
    warm_time: float  # seconds of warm-up, at least
    switch_time: float  # seconds of re-warm-up when switching contestants


# OpenBLAS's workers spin for ~0.1 s (30 ms of CPU measured) after their last
# job, PyTorch's OpenMP workers for ~5 ms: warm_time and switch_time cover that.
FULL = Budget(repeats=11, min_time=0.1, warmup=3, warm_time=0.25, switch_time=0.1)
QUICK = Budget(repeats=5, min_time=0.02, warmup=2, warm_time=0.05, switch_time=0.02)


@dataclass
class Timing:
    """Seconds per call, one value per repeat, each the mean over `number` calls."""

    times: list
    number: int

    @property
    def median(self):
        return statistics.median(self.times)

    @property
    def spread(self):
        """Interquartile range relative to the median (0.05 = the middle half is within 5%)."""
        if len(self.times) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.times, n=4)
        return (q3 - q1) / self.median

    def to_dict(self):
        return {"median_s": self.median, "spread": self.spread, "number": self.number,
                "times_s": self.times}


def _run_for(fn, seconds, calls=1):
    """Call fn at least `calls` times and for at least `seconds`."""
    start, done = time.perf_counter(), 0
    while done < calls or time.perf_counter() - start < seconds:
        fn()
        done += 1


def _calibrate(fn, budget):
    """Warm fn up, then return how many calls make a repeat of >= min_time."""
    _run_for(fn, budget.warm_time, budget.warmup)
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-9)
    return max(1, math.ceil(budget.min_time / one))


def _repeat(fn, number):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def compare(fns, budget):
    """Time {label: fn} doing the same work, in interleaved rounds: {label: Timing}."""
    numbers = {label: _calibrate(fn, budget) for label, fn in fns.items()}
    times = {label: [] for label in fns}
    for _ in range(budget.repeats):
        for label, fn in fns.items():
            if len(fns) > 1:
                _run_for(fn, budget.switch_time)
            times[label].append(_repeat(fn, numbers[label]))
    return {label: Timing(times[label], numbers[label]) for label in fns}


def measure(fn, budget):
    """Time fn() (no arguments) after warm-up; returns a Timing."""
    return compare({"fn": fn}, budget)["fn"]
