"""minicnn.parallel: the threading layer it picks, and threaded predict on either layer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Two threads predicting at once with every kernel threaded, then the layer Numba ran.
PREDICT_FROM_TWO_THREADS = """
from concurrent.futures import ThreadPoolExecutor
import numba, numpy as np
from minicnn import parallel, zoo
parallel.set_mode("threaded")
model = zoo.lenet5(seed=0)
batches = [np.random.default_rng(s).random((16, 1, 28, 28), dtype=np.float32) for s in range(4)]
want = [model.forward(x) for x in batches]
with ThreadPoolExecutor(2) as pool:
    for got, expected in zip(pool.map(model.predict, batches), want):
        assert np.abs(got - expected).max() < 2e-5
print(numba.threading_layer())
"""


def run_python(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_tbb_is_the_layer_where_pip_installed_it():
    """pip's tbb wheel (a dependency on Linux x86-64) lands where the loader does not look;
    minicnn.parallel loads it by path, and Numba runs its loops on it."""
    installed = os.path.exists(os.path.join(sys.prefix, "lib", "libtbb.so.12"))
    assert run_python(PREDICT_FROM_TWO_THREADS) == ("tbb" if installed else "workqueue")


@pytest.mark.parametrize("layer", ["workqueue", "tbb"])
def test_a_layer_named_in_the_environment_is_the_one_used(layer):
    """Two threads each starting a parallel loop: the workqueue layer would abort the process
    without minicnn.parallel's lock."""
    if layer == "tbb" and not os.path.exists(os.path.join(sys.prefix, "lib", "libtbb.so.12")):
        pytest.skip("the tbb wheel is not installed in this environment")
    assert run_python(PREDICT_FROM_TWO_THREADS, NUMBA_THREADING_LAYER=layer) == layer
