"""Threaded or serial: the one rule every Numba kernel of minicnn and optim follows.

A kernel whose outer loop is a `prange` is compiled twice by `twin`: a
threaded build (Numba's `parallel=True`) and a serial one (the same loops,
prange running as range). Each call runs one of them:

    threaded  iff  work >= min_work  and  Numba may use more than one thread

`work` is what the call will do, counted in the unit its kernel states
(elements touched, multiply-adds, 64-bit words compared), and `min_work` is
that kernel's break-even in the same unit, measured by bench/. Below it,
waking the worker threads costs more than the second core saves: a batch-1
layer runs faster on one thread.

One switch forces either build for every kernel at once, for tests (both
builds must give the same results) and for benchmarks:

    MINICNN_THREADING=serial | threaded | auto     (environment, read at import)
    minicnn.parallel.set_mode("serial")            (in code; bench/'s --threading)
    with minicnn.parallel.forced("serial"): ...    (for one block)

"auto", the default, applies the rule above.
"""

import contextlib
import ctypes
import os
import sys
import threading
import types

import numba


def _load_tbb():
    """Whether Intel TBB, the threading layer minicnn asks Numba for, loads.

    TBB's workers spin a moment after a loop, then sleep: the next loop starts in ~2 us, where
    waking a sleeping workqueue thread (the fallback) costs 100-150 us on this project's 2-core
    VMs (an empty two-task loop: 132 us), longer than a batch-1 layer takes. They yield while
    they spin, so PyTorch's threads in the same process run as fast as beside the workqueue
    (bench_substrate). OpenBLAS's spinning threads do not yield as much: a BLAS product in a
    training step slowed the Numba kernels after it by half, and the layers' training paths
    now call minicnn's own kernels (minicnn.layers, minicnn.convpool). OpenMP's spin restarts
    as fast but is one setting for the whole process (docs/techniques.md).

    pip's tbb wheel (a dependency on Linux x86-64) puts libtbb in <prefix>/lib, where the
    dynamic loader does not look. Loaded here by path, it is what Numba's TBB layer then finds
    by its name (also when NUMBA_THREADING_LAYER names tbb).
    """
    try:
        ctypes.CDLL(os.path.join(sys.prefix, "lib", "libtbb.so.12"), mode=ctypes.RTLD_GLOBAL)
        from numba.np.ufunc import tbbpool  # noqa: F401  Numba's layer must load too
    except (OSError, ImportError):
        return False
    return True


_tbb_loaded = _load_tbb()
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "tbb" if _tbb_loaded else "workqueue"

MODES = ("auto", "serial", "threaded")
# The workqueue layer runs one parallel loop at a time: two threads of the program starting
# one each abort the process. Serial builds need no turn.
_one_parallel_loop = threading.Lock()
MIN_OUTPUTS = 1 << 18  # the break-even of minicnn's own loops, in elements touched (read or written)
# The break-even of the register-tiled kernels (direct, narrow), in multiply-adds: they do
# 50-60 G of them per second per core. With TBB (or OpenMP) it is between LeNet-5's conv1 at
# batch 1 (288 K: 13 us serial, 17 us threaded) and its conv2 (1.6 M: 39 and 32 us). Waking
# the workqueue's sleeping thread costs the time of 2^24 of them.
MIN_MACS = 1 << 24 if numba.config.THREADING_LAYER == "workqueue" else 1 << 19


def _check_mode(mode, source):
    if mode not in MODES:
        raise ValueError(f"{source} must be one of {MODES}, got {mode!r}")
    return mode


_mode = _check_mode(os.environ.get("MINICNN_THREADING", "auto"), "MINICNN_THREADING")


def mode():
    """The build every twin runs: "auto" (the rule), "serial" or "threaded"."""
    return _mode


def set_mode(new_mode):
    """From now on run every twin kernel in `new_mode`: "serial", "threaded" or "auto"."""
    global _mode
    _mode = _check_mode(new_mode, "the threading mode")


@contextlib.contextmanager
def forced(new_mode):
    """Run every twin kernel in `new_mode` inside the block, then go back to the mode before it."""
    saved = _mode
    set_mode(new_mode)
    try:
        yield
    finally:
        set_mode(saved)


def runs_threaded(work, min_work):
    """The rule: whether a call doing `work` runs the threaded build of a kernel whose break-even is `min_work`."""
    if _mode != "auto":
        return _mode == "threaded"
    return work >= min_work and numba.get_num_threads() > 1


def _renamed(body, suffix):
    """A copy of the Python function `body` under another name.

    Numba's on-disk cache is keyed by the function's name and signature, so
    the serial build must compile a function of its own name: compiling
    `body` itself twice would let one build's cache entry replace the other's.
    """
    copy = types.FunctionType(body.__code__, body.__globals__, body.__name__ + suffix)
    copy.__qualname__ = body.__qualname__ + suffix
    return copy


def twin(body, min_work=MIN_OUTPUTS, **options):
    """Compile `body` threaded and serial (cached; `options` such as fastmath go to numba.njit).

    Returns run(work, *args): body(*args) in the build `runs_threaded(work, min_work)` picks; run.serial
    is the serial build itself, for compiled code that runs several kernels in one call (run is a
    Python function, which compiled code cannot call).
    """
    threaded = numba.njit(parallel=True, cache=True, **options)(body)
    serial = numba.njit(cache=True, **options)(_renamed(body, "_serial"))

    def run(work, *args):
        if runs_threaded(work, min_work):
            with _one_parallel_loop:
                return threaded(*args)
        return serial(*args)

    run.__name__, run.__doc__, run.serial = body.__name__, body.__doc__, serial
    return run
