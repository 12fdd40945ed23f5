"""The portable build: code run in a fresh process whose kernels Numba compiles for an AVX2-only
CPU (its CPU name and features), the path a machine without AVX-512 takes."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+sse4.2,+popcnt"}


def run_without_avx512(code):
    """Run `code` (Python source that prints "ok" when its checks pass) on the AVX2-only build."""
    code = "from minicnn import simd\nassert not simd.HAS_PERMUTE, simd.target_features()\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **AVX2_ONLY}, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
