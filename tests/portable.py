"""The portable builds: code run in a fresh process whose kernels Numba compiles for a CPU without
AVX-512 (its CPU name and features), the paths machines without it take: AVX2 only, or AVX2 with
AVX-VNNI."""

import os
import subprocess
import sys
from pathlib import Path

from minicnn import simd

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+sse4.2,+popcnt"}
# Intel's cores since Alder Lake: 256-bit VNNI (VEX-encoded), no AVX-512
AVX_VNNI = {"NUMBA_CPU_NAME": "alderlake", "NUMBA_CPU_FEATURES": "+avx,+avx2,+fma,+sse4.2,+popcnt,+avxvnni"}


def _is_this_build(build):
    """Whether the kernels this process compiles take `build`'s paths already (no AVX-512, and
    VNNI or not as `build` says): then the fresh process keeps this one's target, and the kernels
    compiled here come out of Numba's cache instead of being compiled again for another CPU name."""
    return not simd.HAS_PERMUTE and simd.HAS_VNNI == ("+avxvnni" in build["NUMBA_CPU_FEATURES"])


def run_without_avx512(code, build=AVX2_ONLY):
    """Run `code` (Python source that prints "ok" when its checks pass) on a build without AVX-512:
    AVX2 only, or `build`'s NUMBA_CPU_NAME and NUMBA_CPU_FEATURES."""
    code = "from minicnn import simd\nassert not simd.HAS_PERMUTE, simd.target_features()\n" + code
    env = dict(os.environ) if _is_this_build(build) else {**os.environ, **build}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
