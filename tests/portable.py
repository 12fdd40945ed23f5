"""The portable builds: code run in a fresh process whose kernels Numba compiles for a CPU without
AVX-512 (its CPU name and features), the paths machines without it take: AVX2 only, or AVX2 with
AVX-VNNI."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+sse4.2,+popcnt"}
# Intel's cores since Alder Lake: 256-bit VNNI (VEX-encoded), no AVX-512
AVX_VNNI = {"NUMBA_CPU_NAME": "alderlake", "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+sse4.2,+popcnt,+avxvnni"}


def run_without_avx512(code, build=AVX2_ONLY):
    """Run `code` (Python source that prints "ok" when its checks pass) on a build without AVX-512:
    AVX2 only, or `build`'s NUMBA_CPU_NAME and NUMBA_CPU_FEATURES."""
    code = "from minicnn import simd\nassert not simd.HAS_PERMUTE, simd.target_features()\n" + code
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **build}, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
