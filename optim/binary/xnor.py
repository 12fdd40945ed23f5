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


def _gather_rows_loops(lines, KH, KW, stride, Ho, Wo):
    N, C, Hp, L = lines.shape
    n = C * KH * KW
    flat, mask = lines.reshape(-1), (np.uint64(1) << np.uint64(KW)) - np.uint64(1)
    packed = np.empty((N * Ho * Wo, words_for(n)), np.uint64)
    for r in prange(N * Ho * Wo):
        image, i, j = r // (Ho * Wo), (r // Wo) % Ho, r % Wo
        at, o = j * stride // 64, np.uint64(j * stride % 64)  # where the runs start in their lines
        word, filled, w = np.uint64(0), 0, 0  # the row's next word, built in a register: its bits so far
        for c in range(C):  # the row runs (c, kh, kw) as im2row's columns
            for kh in range(KH):
                first = np.uint64(((image * C + c) * Hp + i * stride + kh) * L + at)
                run = flat[first] >> o
                if o + np.uint64(KW) > np.uint64(64):  # the run continues in the line's next word
                    run |= flat[first + np.uint64(1)] << (np.uint64(64) - o)
                run &= mask
                word |= run << np.uint64(filled)
                filled += KW
                if filled >= 64:  # full: stored, and the run's bits past it start the next word
                    packed[r, w] = word
                    w, filled = w + 1, filled - 64
                    word = run >> np.uint64(KW - filled)  # KW - filled in 1 .. KW < 64 bits already placed
        if filled:
            packed[r, w] = word
    return packed


_gather_rows = twin(_gather_rows_loops, MIN_STEPS)


def im2row_signs(xp, KH, KW, stride):
    """Fast im2row_signs_ref: xp (N, C, Hp, Wp) float32 -> ((N*Ho*Wo, words) uint64, (N*Ho*Wo,) float32).

    Each input value is in KH*KW receptive fields. So its sign is packed once,
    line by line (bit w of line (n, c, h) is xp[n, c, h, w] >= 0), and a row
    is gathered as C*KH runs of KW consecutive bits. beta comes from
    A = sum_c |xp| summed over each KH x KW window (XNOR-Net's K = A * k).
    """
    if KW >= 64:
        raise ValueError(f"binary-input convolution supports kernels narrower than 64, got {KW}")
    N, C, Hp, Wp = xp.shape
    Ho, Wo = (Hp - KH) // stride + 1, (Wp - KW) // stride + 1
    lines = pack_signs(xp.reshape(-1, Wp)).reshape(N, C, Hp, -1)
    A = np.abs(xp).sum(axis=1, dtype=np.float32)
    window_lines = A[:, :, 0 : stride * (Wo - 1) + 1 : stride].copy()  # sums of KW, then of KH of them
    for kw in range(1, KW):
        window_lines += A[:, :, kw : kw + stride * (Wo - 1) + 1 : stride]
    windows = window_lines[:, 0 : stride * (Ho - 1) + 1 : stride].copy()
    for kh in range(1, KH):
        windows += window_lines[:, kh : kh + stride * (Ho - 1) + 1 : stride]
    beta = windows.reshape(-1) / np.float32(C * KH * KW)
    return _gather_rows(N * Ho * Wo * C * KH, lines, KH, KW, stride, Ho, Wo), beta


# --------------------------------------------------------------------------
# XNOR-popcount: binary activations times binary weights


def xnor_matmul_ref(a, w, n):
    """a (R, words), w (F, words) uint64 packed rows of n signs -> (R, F) int32 dot products."""
    exact = unpack_signs(a, n).astype(np.float64) @ unpack_signs(w, n).astype(np.float64).T
    return exact.astype(np.int32)  # integers below 2**53: float64 is exact


def _xnor_matmul_loops(a, wt, n):
    R, K = a.shape
    F = wt.shape[1]
    out = np.empty((R, F), np.int32)
    for t in prange((R + ROW_BLOCK - 1) // ROW_BLOCK):
        differ = np.empty(F, np.int64)
        for r in range(t * ROW_BLOCK, min(R, (t + 1) * ROW_BLOCK)):
            differ[:] = 0
            for k in range(K):
                x = a[r, k]
                for j in range(F):  # across filters: LLVM runs 8 at once (vpopcntq where the CPU has it)
                    differ[j] += popcount(x ^ wt[k, j])
            for j in range(F):
                out[r, j] = n - 2 * differ[j]
    return out


_xnor_matmul = twin(_xnor_matmul_loops, MIN_STEPS)


def xnor_matmul(a, w, n):
    """Fast xnor_matmul_ref: a (R, words), w (F, words) uint64 -> (R, F) int32."""
    return _xnor_matmul(a.size * w.shape[0], a, np.ascontiguousarray(w.T), n)
