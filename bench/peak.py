"""What the CPU can do at most: probe kernels' float32 and int8 multiply-add rates.

The probe runs `numba.get_num_threads()` tasks (one per thread, prange), each
a loop of fused multiply-adds on 16-lane vectors (minicnn.simd) into
INDEPENDENT sums: enough of them that the FMA units never wait for a result
(an FMA takes 4 cycles and a core starts two per cycle), and nothing read
from memory. Its rate is the ceiling any float32 kernel on this machine
and this build (AVX-512 or the portable path) can reach:

    GFLOP/s = 2 flops x 16 lanes x SUMS x rounds x threads / seconds

Kernel figures in bench/ are quoted as a fraction of it. The same run
measures both, so turbo and a busy neighbour move both alike. With AVX-512
a sum is one register; with AVX2 two, and 16 sums then fill all 16 ymm
registers: the probe still measures the FMA rate, but a kernel's tile of
sixteen sums spills there, and its fraction of the peak is lower.

`dot4_peak` is the same for int8: sixteen independent int32x16 sums, each step one
`optim.quantization.vectors.dot4_add` (VNNI's vpdpbusd: 16 lanes x 4 byte products, one
512-bit instruction with AVX-512, two 256-bit ones with AVX-VNNI), the instruction the int8
kernels issue. VNNI only: the portable spelling
(widening multiplies and adds) of a step whose operands never change is taken out of the loop
by LLVM, and the probe would time additions.

    GMAC/s = 64 x SUMS x rounds x threads / seconds
"""

import numba
import numpy as np
from numba import prange

from minicnn.simd import LANES, add, fma, splat, store
from minicnn.timing import measure
from optim.quantization.vectors import dot4_add, store16, zeros16

SUMS = 16  # independent sums per thread: 2 FMA units x 4 cycles of latency, twice over


@numba.njit(parallel=True, cache=True)
def _fma_probe(rounds, out):
    for t in prange(out.size // LANES):
        m, c = splat(0.999), splat(0.001)  # x -> 0.999 x + 0.001 stays near 1: no overflow, no denormals
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = splat(1.0 + t)
        s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = splat(2.0 + t)
        for _ in range(rounds):
            s0, s1, s2, s3 = fma(s0, m, c), fma(s1, m, c), fma(s2, m, c), fma(s3, m, c)
            s4, s5, s6, s7 = fma(s4, m, c), fma(s5, m, c), fma(s6, m, c), fma(s7, m, c)
            s8, s9, s10, s11 = fma(s8, m, c), fma(s9, m, c), fma(s10, m, c), fma(s11, m, c)
            s12, s13, s14, s15 = fma(s12, m, c), fma(s13, m, c), fma(s14, m, c), fma(s15, m, c)
        total = add(add(add(s0, s1), add(s2, s3)), add(add(s4, s5), add(s6, s7)))
        total = add(total, add(add(add(s8, s9), add(s10, s11)), add(add(s12, s13), add(s14, s15))))
        store(out, t * LANES, total)  # the sums are used: the loop cannot be dropped
    return out


def fma_peak(budget, rounds=200_000):
    """(GFLOP/s with all of Numba's threads, the Timing) of the probe: the float32 ceiling."""
    threads = numba.get_num_threads()
    out = np.empty(threads * LANES, np.float32)
    timing = measure(lambda: _fma_probe(rounds, out), budget)
    return 2 * LANES * SUMS * rounds * threads / timing.median / 1e9, timing


@numba.njit(parallel=True, cache=True)
def _dot4_probe(rounds, w, out):
    for t in prange(out.size // (SUMS * 16)):
        x = np.uint32(0x01020304 + t)
        s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zeros16()
        s8 = s9 = s10 = s11 = s12 = s13 = s14 = s15 = zeros16()
        for _ in range(rounds):  # the int32 sums wrap around: a probe, not a result
            s0, s1, s2, s3 = dot4_add(s0, x, w, 0), dot4_add(s1, x, w, 64), dot4_add(s2, x, w, 0), \
                dot4_add(s3, x, w, 64)
            s4, s5, s6, s7 = dot4_add(s4, x, w, 0), dot4_add(s5, x, w, 64), dot4_add(s6, x, w, 0), \
                dot4_add(s7, x, w, 64)
            s8, s9 = dot4_add(s8, x, w, 0), dot4_add(s9, x, w, 64)
            s10, s11 = dot4_add(s10, x, w, 0), dot4_add(s11, x, w, 64)
            s12, s13 = dot4_add(s12, x, w, 0), dot4_add(s13, x, w, 64)
            s14, s15 = dot4_add(s14, x, w, 0), dot4_add(s15, x, w, 64)
        for k, s in enumerate((s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15)):
            store16(out, (t * SUMS + k) * 16, s)  # the sums are used: the loop cannot be dropped
    return out


def dot4_peak(budget, rounds=200_000):
    """(GMAC/s with all of Numba's threads, the Timing) of the int8 probe: the ceiling of kernels that
    issue dot4_add."""
    threads = numba.get_num_threads()
    w = np.arange(128, dtype=np.int8)
    out = np.empty(threads * SUMS * 16, np.int32)
    timing = measure(lambda: _dot4_probe(rounds, w, out), budget)
    return 64 * SUMS * rounds * threads / timing.median / 1e9, timing
