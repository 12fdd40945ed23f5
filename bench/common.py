"""Helpers shared by the benchmarks in bench/: timing, machine facts, tables, JSON.

Every figure is timed the same way (`measure`), so figures compare:

1. Warm up: call the function at least `warmup` times and for at least
   `warm_time` seconds. The first call compiles Numba kernels (or loads them
   from the cache) and allocates optimizer state; the next ones fill the CPU
   caches and wake the thread pools. The time-based part also gives the worker
   threads of whatever ran before (OpenBLAS, OpenMP in PyTorch), which keep
   spinning for a while after their last job, time to go to sleep.
2. Calibrate: choose `number`, the calls per repeat, so that one repeat lasts
   at least `min_time` seconds; this amortises timer and scheduler noise
   over calls that may last only microseconds.
3. Repeat `repeats` times and keep the median time per call: unlike the
   mean, it ignores the odd repeat slowed down by another job on a shared
   machine. The spread (interquartile range / median) says how far to trust it.
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


FULL = Budget(repeats=11, min_time=0.15, warmup=3, warm_time=0.2)
QUICK = Budget(repeats=5, min_time=0.02, warmup=2, warm_time=0.02)


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


def measure(fn, budget):
    """Time fn() (no arguments) after warm-up; returns a Timing."""
    start, calls = time.perf_counter(), 0
    while calls < budget.warmup or time.perf_counter() - start < budget.warm_time:
        fn()
        calls += 1
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-9)
    number = max(1, math.ceil(budget.min_time / one))
    times = []
    for _ in range(budget.repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return Timing(times, number)


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
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _numba_threading_layer(),
        "numpy_blas": _blas_libraries(),
    }


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
