"""The int8 GEMM of a layer of few outputs (a classifier's 10): the dot products along the lanes.

kernels.qgemm puts 16 filters in a vector's lanes and broadcasts 4 bytes of a row to them: a row of
G words costs G vpdpbusd whatever the number of filters F, and for F = 10, 6 of the 16 lanes multiply
zero weights. Here the lanes run along the row instead. One vpdpbusd (vectors.dot64_add) multiplies
64 bytes of a row by 64 of one filter's weights into 16 partial sums, and the 16 are added once, at
the end (vectors.sum16):

    sums[r, f] = sum_c sum16(dot64(row r's chunk c, filter f's chunk c)) + tail[r, f]

so a row costs F G / 16 vpdpbusd (F rounded up to even): 10/16 of qgemm's for the classifier. The
row's last G mod 16 words do not fill a chunk; they take qgemm's layout and instruction (dot4_add on
the packed weights' last groups), whose lanes are the filters, where the epilogue (vectors.finish16)
wants the sums.

Rows run 4 at a time against 2 filters: 8 independent sums hide vpdpbusd's latency, and 6 loads
serve 8 of them. A task's last rows, when fewer than 4, are computed as its last row again and
stored once. The rows must be whole runs of words (a dense layer's, or im2row's for a conv without a
pool), not a conv's windows read in place.
"""

import numba
import numpy as np
from numba import prange

from .vectors import LANES, add16, dot4_add, dot64_add, finish16, load16, sum16, zeros16

CHUNK = 16  # words of a row per dot64_add (64 bytes)
MAX_FILTERS = 12  # narrow where a quarter or more of qgemm's 16 lanes would idle (measured: F = 10)


def pack_narrow(wt):
    """The narrow kernel's weights of wt int8 (F, K): wd int8 (F', 64 C) = wt's first C = G // CHUNK
    chunks (G = ceil(K / 4) words), F' = F rounded up to even with a zero filter; (0, 0) where the
    layer is not narrow (F > MAX_FILTERS or no whole chunk)."""
    F, K = wt.shape
    C = -(-K // 4) // CHUNK
    if F > MAX_FILTERS or C == 0:
        return np.zeros((0, 0), np.int8)
    wd = np.zeros((F + F % 2, 64 * C), np.int8)
    wd[:F, : min(K, 64 * C)] = wt[:, : 64 * C]
    return wd


@numba.njit(inline="always", cache=True)
def _pair_sums(x32, t0, t1, t2, t3, C, wd, f, K64, acc):
    """acc[16 i + f + e] = the chunks' part of row i's sum for filter f + e (e < 2), rows i < 4 starting
    at words t0 .. t3."""
    a0, a1, a2, a3, b0, b1, b2, b3 = zeros16(), zeros16(), zeros16(), zeros16(), zeros16(), zeros16(), \
        zeros16(), zeros16()
    for c in range(C):
        o, i, j = CHUNK * c, f * K64 + 64 * c, (f + 1) * K64 + 64 * c
        a0, b0 = dot64_add(a0, x32, t0 + o, wd, i), dot64_add(b0, x32, t0 + o, wd, j)
        a1, b1 = dot64_add(a1, x32, t1 + o, wd, i), dot64_add(b1, x32, t1 + o, wd, j)
        a2, b2 = dot64_add(a2, x32, t2 + o, wd, i), dot64_add(b2, x32, t2 + o, wd, j)
        a3, b3 = dot64_add(a3, x32, t3 + o, wd, i), dot64_add(b3, x32, t3 + o, wd, j)
    acc[f], acc[f + 1], acc[16 + f], acc[17 + f] = sum16(a0), sum16(b0), sum16(a1), sum16(b1)
    acc[32 + f], acc[33 + f], acc[48 + f], acc[49 + f] = sum16(a2), sum16(b2), sum16(a3), sum16(b3)


@numba.njit(inline="always", cache=True)
def _tail(x32, t, first, G, wp):
    """The sums of the row at word t over its words first .. G - 1, in the filters' lanes."""
    s = zeros16()
    for g in range(first, G):
        s = dot4_add(s, x32[np.uint64(t + g)], wp, g * 64)
    return s


def narrow_loops(x32, starts, G, rows_per_task, wd, wp, bias, table, z_out, lo, hi, out):
    """out (M, F), M = starts.size, as kernels.qgemm with window 1 makes it, row r being the G words
    x32[starts[r] : starts[r] + G]; wd flattened pack_narrow(wt), wp the flattened packed weights of wt
    (one block: F <= 16)."""
    M, F = starts.size, out.shape[1]
    o = out.reshape(-1)
    K64 = wd.size // (F + F % 2)
    C = K64 // 64
    for task in prange((M + rows_per_task - 1) // rows_per_task):
        start, end = task * rows_per_task, min(M, (task + 1) * rows_per_task)
        acc = np.zeros(4 * LANES, np.int32)  # lanes F' .. 15 stay 0, and are not stored
        for r in range(start, end, 4):
            last = end - 1
            t0, t1, t2, t3 = starts[r], starts[min(r + 1, last)], starts[min(r + 2, last)], starts[min(r + 3, last)]
            for f in range(0, F, 2):
                _pair_sums(x32, t0, t1, t2, t3, C, wd, f, K64, acc)
            for i in range(min(4, end - r)):
                v = add16(load16(acc, LANES * i), _tail(x32, starts[r + i], CHUNK * C, G, wp))
                finish16(o, (r + i) * F, v, bias, table, 0, z_out, lo, hi, F)
    return out
