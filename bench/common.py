"""Helpers shared by the benchmarks in bench/: timing, machine facts, tables, JSON.

Every figure is timed the same way (`compare`, or `measure` for one
function), so figures compare:

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

import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


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


# --------------------------------------------------------------------------
# Machine facts


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _numba_threading_layer():
    import numba

    try:
        return numba.threading_layer()  # known only once a parallel kernel has run
    except ValueError:
        return f"{numba.config.THREADING_LAYER} (configured; no parallel kernel run yet)"


def _blas_libraries():
    """numpy's BLAS (library, version, CPU kernel, threads) via threadpoolctl, or None."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    return [
        f"{i['internal_api']} {i.get('version')} ({i.get('architecture')}, "
        f"{i['num_threads']} threads, {i.get('threading_layer')}) {Path(i['filepath']).name}"
        for i in threadpoolctl.threadpool_info()
        if i["user_api"] == "blas"
    ]


def machine_facts():
    """What the figures depend on: CPU, cores, library versions, thread pools."""
    import numba
    import numpy as np

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(affinity) if affinity else os.cpu_count(),
        "load_avg_1min": load_average(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _numba_threading_layer(),
        "numpy_blas": _blas_libraries(),
    }


def load_average():
    """Runnable tasks averaged over the last minute (ours included), or None.
    Above the core count, other jobs compete for the cores: figures drop and scatter."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def format_facts(facts):
    lines = []
    for key, value in facts.items():
        if value is None:
            continue  # e.g. threadpoolctl not installed: say nothing rather than guess
        if isinstance(value, list):
            value = "; ".join(map(str, value)) or "-"
        lines.append(f"  {key:<22} {value}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Tables and JSON


def num(x):
    """A number with about 3 significant digits, thousands separated; '-' for None."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return str(x)
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def pct(x):
    return "-" if x is None else f"{100 * x:.0f}%"


def format_table(headers, rows):
    """Columns padded to their widest cell; first column left-aligned, the rest right."""
    cells = [list(map(str, headers))] + [[num(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        first = row[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(row[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def write_json(path, data):
    """Write data as JSON to path atomically: a temporary file in the same folder,
    flushed to disk, then renamed over path, so a reader (or a crash) never sees
    half a file. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results should be readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
