"""Bit kernels for binary layers: signs packed into uint64 words and the
XNOR-popcount matrix product (Rastegari et al., XNOR-Net, ECCV 2016;
Hubara et al., Binarized Neural Networks, NeurIPS 2016).

Packing. A row v of n values becomes ceil(n / 64) uint64 words: bit k
(least significant first) of word w is 1 iff v[64 w + k] >= 0, i.e. the
sign +1, and the 64 * words - n padding bits are 0. A float32 weight takes
32 bits, its sign one: 32x smaller.

XNOR-popcount. For a, w in {-1, +1}^n the product a_i w_i is +1 where the
bits agree and -1 where they differ, so

    dot(a, w) = (n - d) - d = n - 2 d,      d = popcount(a XOR w).

Padding bits are 0 in both rows, their XOR is 0 and they never count, so
any n works, not only multiples of 64.

(Real inputs against binary weights: addsub.py.)

Each kernel comes as a plain NumPy reference (`*_ref`, through
np.unpackbits and a float matrix product: the specification) and a Numba
version with the same signature; tests/test_binary.py checks they agree.
popcount is the classic SWAR bit trick (Hacker's Delight, 5-1): numba has
no popcount of its own, and LLVM recognises the idiom and emits the
hardware instruction (`popcnt`, or `vpopcntq` on 8 words at once where
AVX-512 VPOPCNTDQ exists).
"""

import numba
import numpy as np
from numba import prange

from minicnn import kernels
from minicnn.parallel import twin

ROW_BLOCK = 64  # input rows per task

# Threads pay from this many inner-loop steps (a word packed, compared or
# summed) on: below it a batch-1 LeNet-5 layer runs faster on one thread.
MIN_STEPS = 1 << 16

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@numba.njit(cache=True)
def words_for(n):
    """uint64 words holding n bits: int -> int."""
    return (n + 63) // 64


@numba.njit(cache=True)
def popcount(x):
    """Set bits of one uint64, as an int64: count in pairs, nibbles, bytes, then add the bytes with one multiply."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))  # signed, so n - 2 * count stays an integer


def popcount_ref(x):
    """Set bits of each uint64 in x (any shape) -> integers of x's shape, through np.unpackbits."""
    x = np.asarray(x, dtype="<u8")
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(axis=-1)


# --------------------------------------------------------------------------
# Packing signs


def pack_signs_ref(v):
    """v (R, n) float -> (R, ceil(n/64)) uint64; bit i of a row is v[:, i] >= 0."""
    R, n = v.shape
    bits = np.zeros((R, 64 * words_for(n)), np.uint8)
    bits[:, :n] = v >= 0
    # 8 little-endian bytes, least significant bit first, make one word.
    return np.packbits(bits, axis=1, bitorder="little").view("<u8").astype(np.uint64)


def _pack_signs_loops(v):
    R, n = v.shape
    K = words_for(n)
    packed = np.empty((R, K), np.uint64)
    for r in prange(R):
        for k in range(K):
            word = np.uint64(0)  # built in a register, stored once
            for b in range(min(64, n - 64 * k)):
                if v[r, 64 * k + b] >= 0:
                    word |= np.uint64(1) << np.uint64(b)
            packed[r, k] = word
    return packed


_pack_signs = twin(_pack_signs_loops, MIN_STEPS)


def pack_signs(v):
    """Fast pack_signs_ref: v (R, n) float -> (R, ceil(n/64)) uint64; bit i of a row is v[:, i] >= 0."""
    return _pack_signs(v.size, v)


def unpack_signs(packed, n):
    """(R, words) uint64 -> (R, n) float32 in {-1, +1}: the inverse of pack_signs."""
    R = packed.shape[0]
    as_bytes = np.ascontiguousarray(packed).astype("<u8").view(np.uint8).reshape(R, -1)
    bits = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :n]
    return np.where(bits == 1, np.float32(1), np.float32(-1))


def im2row_signs_ref(xp, KH, KW, stride):
    """The im2row rows of padded xp (N, C, Hp, Wp) float32, as their signs and scales.

    Returns (packed signs (N*Ho*Wo, words) uint64, beta (N*Ho*Wo,) float32 = mean |row|).
    """
    rows = kernels.im2row_ref(xp, KH, KW, stride)
    return pack_signs_ref(rows), np.abs(rows).mean(axis=1).astype(np.float32)


def im2row_signs_nhwc_ref(xp, KH, KW, stride):
    """im2row_signs_ref of channels-last xp (N, Hp, Wp, C), the rows' columns in (kh, kw, c) order."""
    windows = np.lib.stride_tricks.sliding_window_view(xp, (KH, KW), axis=(1, 2))[:, ::stride, ::stride]
    rows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, KH * KW * xp.shape[3])
    return pack_signs_ref(rows), np.abs(rows).mean(axis=1).astype(np.float32)


# Bits a gather step moves: a run of a window line is split into pieces of at most this, the most
# whose shifts below stay under 64 bits (32 before: LeNet-5's conv2 gather at batch 256 283 -> 208 us).
RUN = 63


def _gather_rows_loops(lines, KH, run_bits, step, Ho, Wo):
    """Rows (N Ho Wo, words) uint64 of the packed lines (N, C, Hp, L): row (n, i, j) is, for each c
    and kh, the run_bits bits of line (n, c, i step[0] + kh) from bit j step[1] on, back to back."""
    N, C, Hp, L = lines.shape
    packed = np.empty((N * Ho * Wo, words_for(C * KH * run_bits)), np.uint64)
    flat = lines.reshape(-1)
    for r in prange(N * Ho * Wo):
        image, i, j = r // (Ho * Wo), (r // Wo) % Ho, r % Wo
        word, filled, w = np.uint64(0), 0, 0  # the row's next word, built in a register: its bits so far
        for c in range(C):  # the row runs (c, kh) as im2row's columns
            for kh in range(KH):
                line = ((image * C + c) * Hp + i * step[0] + kh) * L
                for p in range(0, run_bits, RUN):
                    width = min(RUN, run_bits - p)
                    at = j * step[1] + p  # the piece's first bit in its line
                    first, o = np.uint64(line + at // 64), np.uint64(at % 64)
                    piece = flat[first] >> o
                    if o + np.uint64(width) > np.uint64(64):  # it continues in the line's next word
                        piece |= flat[first + np.uint64(1)] << (np.uint64(64) - o)
                    piece &= (np.uint64(1) << np.uint64(width)) - np.uint64(1)
                    word |= piece << np.uint64(filled)
                    filled += width
                    if filled >= 64:  # full: stored, and the piece's bits past it start the next word
                        packed[r, w] = word
                        w, filled = w + 1, filled - 64
                        word = piece >> np.uint64(width - filled)  # width - filled in 1 .. 32 bits placed
        if filled:
            packed[r, w] = word
    return packed


_gather_rows = twin(_gather_rows_loops, MIN_STEPS)


def abs_sums_ref(x):
    """(R,) float32: sum_k |x[r, k]| of x (R, K) float32."""
    return np.abs(x).sum(axis=1, dtype=np.float32)


def _abs_sums_loops(x):
    R, K = x.shape
    out = np.empty(R, np.float32)
    for r in prange(R):
        total = np.float32(0)
        for k in range(K):
            total += abs(x[r, k])
        out[r] = total
    return out


_abs_sums = twin(_abs_sums_loops, MIN_STEPS)


def abs_sums(x):
    """Fast abs_sums_ref (sums in another order: equal to float32 rounding)."""
    return _abs_sums(x.size, x)


def _window_means_loops(A, KH, KW, stride, Ho, Wo, n):
    N = A.shape[0]
    out = np.empty(N * Ho * Wo, np.float32)
    for t in prange(N * Ho):
        image, i = t // Ho, t % Ho
        for j in range(Wo):
            total = np.float32(0)
            for kh in range(KH):
                for kw in range(KW):
                    total += A[image, i * stride + kh, j * stride + kw]
            out[t * Wo + j] = total / np.float32(n)
    return out


_window_means = twin(_window_means_loops, MIN_STEPS)


def window_means(A, KH, KW, stride, n):
    """(N Ho Wo,) float32: A (N, Hp, Wp) float32 summed over each KH x KW window, / n: a row's mean
    |x| from A = sum_c |x| (XNOR-Net's K = A * k)."""
    N, Hp, Wp = A.shape
    Ho, Wo = (Hp - KH) // stride + 1, (Wp - KW) // stride + 1
    return _window_means(N * Ho * Wo * KH * KW, A, KH, KW, stride, Ho, Wo, n)


def im2row_signs(xp, KH, KW, stride):
    """Fast im2row_signs_ref: xp (N, C, Hp, Wp) float32 -> ((N*Ho*Wo, words) uint64, (N*Ho*Wo,) float32).

    Each input value is in KH*KW receptive fields. So its sign is packed once,
    line by line (bit w of line (n, c, h) is xp[n, c, h, w] >= 0), and a row
    is gathered as C*KH runs of KW consecutive bits. beta comes from
    A = sum_c |xp| summed over each KH x KW window.
    """
    N, C, Hp, Wp = xp.shape
    Ho, Wo = (Hp - KH) // stride + 1, (Wp - KW) // stride + 1
    lines = pack_signs(xp.reshape(-1, Wp)).reshape(N, C, Hp, -1)
    beta = window_means(np.abs(xp).sum(axis=1, dtype=np.float32), KH, KW, stride, C * KH * KW)
    return _gather_rows(N * Ho * Wo * C * KH, lines, KH, KW, (stride, stride), Ho, Wo), beta


def im2row_signs_nhwc(xp, KH, KW, stride):
    """Fast im2row_signs_nhwc_ref: xp (N, Hp, Wp, C) float32, channels last.

    A line of the image is one run of Wp C bits (pixel by pixel, its C channels), so a window
    line is KW C consecutive bits: KH runs per row, where channels first take C KH runs of KW."""
    N, Hp, Wp, C = xp.shape
    Ho, Wo = (Hp - KH) // stride + 1, (Wp - KW) // stride + 1
    lines = pack_signs(xp.reshape(-1, Wp * C)).reshape(N, 1, Hp, -1)
    beta = window_means(abs_sums(xp.reshape(-1, C)).reshape(N, Hp, Wp), KH, KW, stride, C * KH * KW)
    return _gather_rows(N * Ho * Wo * KH * C, lines, KH, KW * C, (stride, stride * C), Ho, Wo), beta


# --------------------------------------------------------------------------
# XNOR-popcount: binary activations times binary weights


def xnor_matmul_ref(a, w, n):
    """a (R, words), w (F, words) uint64 packed rows of n signs -> (R, F) int32 dot products."""
    exact = unpack_signs(a, n).astype(np.float64) @ unpack_signs(w, n).astype(np.float64).T
    return exact.astype(np.int32)  # integers below 2**53: float64 is exact


FILTERS_AT_ONCE = 32  # words per row up to which the popcounts run across filters (see _differences)


def transposed(w):
    """What the kernels read beside w (F, words) uint64: w.T (words, F) contiguous where rows have at
    most FILTERS_AT_ONCE words, else an empty (0, F) stand-in. Kept by the layers: it is w again."""
    return np.ascontiguousarray(w.T) if w.shape[1] <= FILTERS_AT_ONCE else np.empty((0, w.shape[0]), np.uint64)


@numba.njit(inline="always", cache=True)
def _differences(a, r, w, wt, differ):
    """differ[j] = popcount(a[r] XOR w[j]) for every filter j; wt = transposed(w).

    Short rows (LeNet-5's conv2: 8 words, fc1: 13) run across filters, 8 at once (vpopcntq where
    the CPU has it), their sums in a small array: 1.7x the filter-by-filter loop on conv2's rows;
    long ones (4096 inputs: 64 words) filter by filter across words, where that array would
    outgrow the L1 cache."""
    K = a.shape[1]
    if K <= FILTERS_AT_ONCE:
        differ[:] = 0
        for k in range(K):
            x = a[r, k]
            for j in range(differ.size):
                differ[j] += popcount(x ^ wt[k, j])
    else:
        for j in range(differ.size):
            d = 0
            for k in range(K):
                d += popcount(a[r, k] ^ w[j, k])
            differ[j] = d


def _xnor_rows_loops(a, w, wt, n):
    R, F = a.shape[0], w.shape[0]
    out = np.empty((R, F), np.int32)
    for t in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        differ = np.empty(F, np.int64)
        for r in range(t * ROW_BLOCK, min(R, (t + 1) * ROW_BLOCK)):
            _differences(a, r, w, wt, differ)
            for j in range(F):
                out[r, j] = n - 2 * differ[j]
    return out


def _xnor_filters_loops(a, w, n):
    R, K = a.shape
    F = w.shape[0]
    out = np.empty((R, F), np.int32)
    blocks = (R + ROW_BLOCK - 1) // ROW_BLOCK
    for t in prange(blocks * F):  # one filter's words stay in cache while a block of rows meets them
        first, j = (t // F) * ROW_BLOCK, t % F
        for r in range(first, min(R, first + ROW_BLOCK)):
            differ = 0
            for k in range(K):
                differ += popcount(a[r, k] ^ w[j, k])
            out[r, j] = n - 2 * differ
    return out


_xnor_rows, _xnor_filters = twin(_xnor_rows_loops, MIN_STEPS), twin(_xnor_filters_loops, MIN_STEPS)


def xnor_matmul(a, w, n, wt=None):
    """Fast xnor_matmul_ref: a (R, words), w (F, words) uint64 -> (R, F) int32; wt = transposed(w)
    (made here if not given). Long rows run filter by filter over blocks of rows: a filter's words
    are then read once per block, where row by row they would all stream past every row (4096 x
    4096 at 64 rows: 2.9 ms against 0.93)."""
    if a.shape[1] <= FILTERS_AT_ONCE:
        return _xnor_rows(a.size * w.shape[0], a, w, transposed(w) if wt is None else wt, n)
    return _xnor_filters(a.size * w.shape[0], a, w, n)


def xnor_layer_ref(a, w, n, beta, alpha, b, grid, relu, pool):
    """A binary-input layer's output, channels last: out (N, Ho', Wo', F) float32 of the rows
    a (N Ho Wo, words) of pixels (n, i, j), grid = (N, Ho, Wo), each row's products with w (F, words)

        y = (n - 2 popcount(a XOR w)) beta_r alpha_j + b_j,   then max(y, 0) if relu,

    and with pool, the maximum of each 2x2 window of pixels (Ho' = Ho // 2; else Ho' = Ho)."""
    y = xnor_matmul_ref(a, w, n).astype(np.float32) * (beta[:, None] * alpha) + b
    y = y.reshape(*grid, -1)
    if relu:
        y = np.maximum(y, 0)
    if pool:
        N, Ho, Wo, F = y.shape
        y = y[:, : Ho // 2 * 2, : Wo // 2 * 2].reshape(N, Ho // 2, 2, Wo // 2, 2, F).max(axis=(2, 4))
    return y


def _xnor_layer_loops(a, w, wt, n, beta, alpha, b, Ho, Wo, relu, pool, out):
    N, Hq, Wq, F = out.shape
    side = 2 if pool else 1
    for t in prange(N * Hq):  # one row of outputs
        image, i = t // Hq, t % Hq
        differ, best = np.empty(F, np.int64), np.empty(F, np.float32)
        for j in range(Wq):
            for q in range(side * side):  # the pixels of the pool window, or the one pixel
                r = (image * Ho + i * side + q // side) * Wo + j * side + q % side
                _differences(a, r, w, wt, differ)
                for f in range(F):
                    y = np.float32(n - 2 * differ[f]) * (beta[r] * alpha[f]) + b[f]
                    best[f] = y if q == 0 else max(best[f], y)
            for f in range(F):
                out[image, i, j, f] = max(best[f], np.float32(0)) if relu else best[f]
    return out


_xnor_layer = twin(_xnor_layer_loops, MIN_STEPS)


def xnor_layer(a, w, wt, n, beta, alpha, b, grid, relu, pool, out):
    """Fast xnor_layer_ref, written into out (N, Ho', Wo', F) float32 and returned; wt =
    transposed(w), kept by the caller. The max-pool is taken on the 4 pixels' outputs as they are
    made: the full-size output is never written."""
    (N, Ho, Wo), (F, words), side = grid, w.shape, 2 if pool else 1
    expected, expected_t = (N, Ho // side, Wo // side, F), (words if words <= FILTERS_AT_ONCE else 0, F)
    if a.shape[0] != N * Ho * Wo or out.shape != expected or wt.shape != expected_t:
        raise ValueError(f"xnor_layer: {a.shape[0]} rows for a grid {grid} (pool {pool}) into {out.shape}, expected "
                         f"{expected}; wt {wt.shape} must be transposed(w), {expected_t}")
    return _xnor_layer(a.size * w.shape[0], a, w, wt, n, beta, alpha, b, grid[1], grid[2], relu, pool, out)
