"""Helpers shared by the benchmarks in bench/: command-line options, thread
counts, machine facts, tables, JSON.

Timing (warm-up, calibration, interleaved repeats, medians) lives in
minicnn/timing.py, shared with `minicnn demo`.
"""

import json
import math
import os
import platform
from pathlib import Path

from minicnn import parallel
from minicnn.atomic import write_file

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Options every benchmark takes


def add_run_args(parser, name, quick_help="few short repeats: a smoke run"):
    """--quick, --threads N, --threading MODE and --json PATH (default bench/results/<name>[_quick].json)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for Numba and numpy's BLAS (default: all Numba's); 1 gives steadier "
                             "figures when other jobs share the cores")
    parser.add_argument("--threading", choices=parallel.MODES, default=parallel.mode(),
                        help="which build every Numba kernel runs (minicnn.parallel): auto picks by size "
                             "(default: $MINICNN_THREADING, else auto)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the results (default bench/results/{name}[_quick].json)")
    parser.set_defaults(results_name=name)


def parse_run_args(parser, argv=None):
    """parser.parse_args(argv), args.json made the path the run writes: --json, or
    bench/results/<name>[_quick].json with the name given to add_run_args; --threading applied."""
    args = parser.parse_args(argv)
    parallel.set_mode(args.threading)
    name = args.results_name
    args.json = args.json or ROOT / "bench" / "results" / (f"{name}_quick.json" if args.quick else f"{name}.json")
    return args


def has_threadpoolctl():
    """Whether set_threads can also limit numpy's BLAS (threadpoolctl, `pip install -e ".[bench]"`)."""
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        return False
    return True


def set_threads(n):
    """Use n threads in Numba and numpy's BLAS (None: leave them as they are); returns the count.
    Oversubscribed cores hurt threaded code most: a parallel region waits for its
    slowest thread, and a thread that lost its core is very slow."""
    import numba

    if n is None:
        return numba.get_num_threads()
    numba.set_num_threads(n)
    if has_threadpoolctl():
        import threadpoolctl

        threadpoolctl.threadpool_limits(n, user_api="blas")
    else:
        print("warning: threadpoolctl not installed, numpy's BLAS keeps its own thread count")
    return n


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
        "minicnn_threading": parallel.mode(),
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
    """Write data as JSON to path atomically (minicnn.atomic: a reader, or a crash, never
    sees half a file). Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, json.dumps(data, indent=2) + "\n")
