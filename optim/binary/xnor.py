"""Bit kernels for binary layers: signs packed into words and the
XNOR-popcount matrix product (Rastegari et al., XNOR-Net, ECCV 2016;
Hubara et al., Binarized Neural Networks, NeurIPS 2016).

Packing. A row v of n values becomes ceil(n / 64) uint64 words: bit k
(least significant first) of word w is 1 iff v[64 w + k] >= 0, i.e. the
sign +1, and the 64 * words - n padding bits are 0. A float32 weight takes
32 bits, its sign one: 32x smaller. A binary-input convolution packs its
input by window lines instead, and reads its windows in place (windows.py).

XNOR-popcount. For a, w in {-1, +1}^n the product a_i w_i is +1 where the
bits agree and -1 where they differ, so

    dot(a, w) = (n - d) - d = n - 2 d,      d = popcount(a XOR w).

Padding bits are 0 in both rows, their XOR is 0 and they never count, so
any n works.

The kernels run the popcounts on 32-bit words, 16 filters' side by side in a
register (`lanes`: vpxord, vpopcntd and vpaddd where AVX-512 VPOPCNTDQ
exists), 4 rows and 32 filters at a time: each load of weights serves 4
rows, the counts never leave the registers until the row ends, and a
layer's scaling, ReLU and 2x2 max-pool are applied there too.

(Real inputs against binary weights: addsub.py.)

Each kernel comes as a plain NumPy reference (`*_ref`, through
np.unpackbits and a float matrix product: the specification) and a Numba
version with the same contract; tests/test_binary.py checks they agree.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import prange

from minicnn import simd
from minicnn.parallel import twin

from . import lanes

__all__ = [
    "MIN_STEPS", "MIN_WORDS", "Rows", "blocked", "check_alpha", "check_blocked", "pack_signs", "pack_signs_ref",
    "packed_rows", "run_xnor_layer", "unpack_signs", "words_for", "xnor_layer", "xnor_layer_ref", "xnor_layer_serial",
    "xnor_matmul", "xnor_matmul_ref",
]

# Threads pay from this many inner-loop steps (a value packed or summed) on:
# below it a batch-1 LeNet-5 layer runs faster on one thread (here and in windows.py).
MIN_STEPS = 1 << 16
# The same for the popcount kernels, counted in words x filters (rows x words x filters): LeNet-5's
# conv2 (16 words a window) at batch 4, 204,800, runs in 15.7 us on one thread or two; at batch 8,
# 409,600, in 24.1 on one and 20.4 on two (xnor_layer with its checks; session 18).
MIN_WORDS = 1 << 18


@numba.njit(cache=True)
def words_for(n):
    """uint64 words holding n bits: int -> int."""
    return (n + 63) // 64


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


# --------------------------------------------------------------------------
# The kernels' operand


class Rows(NamedTuple):
    """The operand of the XNOR kernels: M rows of K uint32 words, row r's word k being
    x32[starts[r] + off[k]] (x32 uint32 flat, starts int64 (M,), off int64 (K,)): rows side by side
    (`packed_rows`), or a convolution's windows read in place from its lines (windows.window_rows)."""

    x32: np.ndarray
    starts: np.ndarray
    off: np.ndarray


def packed_rows(a):
    """Rows of a (R, words) uint64, pack_signs' rows, each word as its two 32-bit halves (blocked(w)
    splits the weights' words the same way)."""
    K = 2 * a.shape[1]
    return Rows(np.ascontiguousarray(a).view(np.uint32).reshape(-1), np.arange(a.shape[0]) * K, np.arange(K))


# --------------------------------------------------------------------------
# XNOR-popcount: binary activations times binary weights


def xnor_matmul_ref(a, w, n):
    """a (R, words), w (F, words) uint64 packed rows of n signs -> (R, F) int32 dot products."""
    exact = unpack_signs(a, n).astype(np.float64) @ unpack_signs(w, n).astype(np.float64).T
    return exact.astype(np.int32)  # integers below 2**53: float64 is exact


def blocked(w):
    """The weights' operand of the fast kernels: w (F, K) uint32 words (windows.window_filters'), or pack_signs'
    (F, words) uint64 rows taken as their halves, as wb uint32, flat, (2 ceil(F/32), K, 16),
    wb[b, k, l] = word k of filter 16 b + l (zero filters pad F to a multiple of 32: the kernels run
    2 blocks of 16 filters per pass over a row). Made once per layer and kept."""
    if w.ndim != 2 or w.dtype not in (np.uint32, np.uint64):
        raise ValueError(f"filters' words must be a 2-D uint32 or uint64 array, got {w.dtype} {w.shape}")
    w = np.ascontiguousarray(w).view(np.uint32)
    (F, K), blocks = w.shape, -(-w.shape[0] // 32) * 2
    padded = np.zeros((blocks * lanes.LANES, K), np.uint32)
    padded[:F] = w
    return np.ascontiguousarray(padded.reshape(blocks, lanes.LANES, K).transpose(0, 2, 1)).reshape(-1)


@numba.njit(inline="always", cache=True)
def _counts(x32, s0, s1, s2, s3, off, wb, b, zero):
    """popcount(row XOR filter) of the rows whose words start at s0 .. s3 (Rows) against the 32 filters
    of blocks b and b + 1 of wb = blocked(w): 8 lanes.counts16, row by row, block by block, held in
    registers across the row (each 64-byte load of weights serves 4 rows). Block b + 1's counts start
    from `zero`: lanes.zeros(), or lanes.zeros8() where it holds at most 8 filters, counted
    on 8 lanes, a 256-bit register (LeNet-5's conv2, 50 = 16 + 16 + 16 + 2 filters: 56 lanes of
    popcounts where 64 ran), then widened."""
    K = off.size
    p0, q0, u0, v0 = lanes.zeros(), lanes.zeros(), lanes.zeros(), lanes.zeros()
    p1 = q1 = u1 = v1 = zero
    for k in range(K):
        i, j, o = (b * K + k) * lanes.LANES, ((b + 1) * K + k) * lanes.LANES, off[k]
        # unsigned indices: no negative-index test in the loop
        x0, x1, x2, x3 = x32[np.uint64(s0 + o)], x32[np.uint64(s1 + o)], x32[np.uint64(s2 + o)], x32[np.uint64(s3 + o)]
        p0, p1 = lanes.count_add(p0, x0, wb, i), lanes.count_add(p1, x0, wb, j)
        q0, q1 = lanes.count_add(q0, x1, wb, i), lanes.count_add(q1, x1, wb, j)
        u0, u1 = lanes.count_add(u0, x2, wb, i), lanes.count_add(u1, x2, wb, j)
        v0, v1 = lanes.count_add(v0, x3, wb, i), lanes.count_add(v1, x3, wb, j)
    return p0, lanes.widen(p1), q0, lanes.widen(q1), u0, lanes.widen(u1), v0, lanes.widen(v1)


@numba.njit(inline="always", cache=True)
def _counts_of(x32, starts, r0, r1, r2, r3, off, wb, b, F):
    """_counts of rows r0 .. r3 (block b + 1 on 8 lanes if it holds at most 8 of the F filters), or for
    a lone row (r0 = r1 = r2 = r3: a batch of 1 through a dense layer) its counts computed once and
    repeated (4 times the popcounts of the tile otherwise)."""
    if r1 != r0:
        s0, s1, s2, s3 = starts[r0], starts[r1], starts[r2], starts[r3]
        if F - lanes.LANES * (b + 1) <= lanes.LANES // 2:
            return _counts(x32, s0, s1, s2, s3, off, wb, b, lanes.zeros8())
        return _counts(x32, s0, s1, s2, s3, off, wb, b, lanes.zeros())
    K, s = off.size, starts[r0]
    p0, p1 = lanes.zeros(), lanes.zeros()
    for k in range(K):
        x = x32[np.uint64(s + off[k])]
        p0 = lanes.count_add(p0, x, wb, (b * K + k) * lanes.LANES)
        p1 = lanes.count_add(p1, x, wb, ((b + 1) * K + k) * lanes.LANES)
    return p0, p1, p0, p1, p0, p1, p0, p1


GROUPS_PER_TASK = 16  # groups of 4 rows (a pool window, or 4 rows in a row) per prange task


@numba.njit(inline="always", cache=True)
def _four_rows(g, R):
    """Rows 4 g .. 4 g + 3 of R, the last row repeated past the end (computed, not stored)."""
    r0 = 4 * g
    return r0, min(r0 + 1, R - 1), min(r0 + 2, R - 1), min(r0 + 3, R - 1)


def _xnor_matmul_loops(x32, starts, off, wb, n, out):
    R, F = out.shape
    o = out.reshape(-1)
    groups, pairs = (R + 3) // 4, wb.size // (2 * lanes.LANES * off.size)
    for t in prange((groups + GROUPS_PER_TASK - 1) // GROUPS_PER_TASK * pairs):
        first, b = t // pairs * GROUPS_PER_TASK, t % pairs * 2  # a task: its groups against one block pair
        for g in range(first, min(groups, first + GROUPS_PER_TASK)):
            r0, r1, r2, r3 = _four_rows(g, R)
            counts = _counts_of(x32, starts, r0, r1, r2, r3, off, wb, b, F)
            for h in range(2):
                f = lanes.LANES * (b + h)
                m = max(0, min(lanes.LANES, F - f))
                for q in range(min(4, R - r0)):
                    lanes.store_first(o, (r0 + q) * F + f, lanes.dots(counts[2 * q + h], n), m)


_xnor_matmul = twin(_xnor_matmul_loops, MIN_WORDS, _nrt=False)


def xnor_matmul(a, w, n, wb=None):
    """Fast xnor_matmul_ref: a (R, words), w (F, words) uint64 -> (R, F) int32; wb = blocked(w) (made
    here if not given)."""
    if a.dtype != np.uint64 or w.dtype != np.uint64 or a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[1] \
            or not 0 <= n <= 64 * a.shape[1]:
        raise ValueError(f"xnor_matmul takes uint64 rows of the same words, n <= 64 words: got {a.dtype} {a.shape}, "
                         f"{w.dtype} {w.shape}, n = {n}")
    rows, wb = packed_rows(a), blocked(w) if wb is None else wb
    check_blocked(wb, w.shape[0], rows.off.size)
    out = np.empty((a.shape[0], w.shape[0]), np.int32)
    _xnor_matmul(rows.starts.size * rows.off.size * w.shape[0], *rows, wb, n, out)
    return out


def check_alpha(alpha):
    """Raise ValueError unless alpha is finite and >= 0 (means of |W|): the kernels scale after the
    pool's maximum, which holds for those."""
    if not np.all(np.isfinite(alpha) & (alpha >= 0)):
        raise ValueError(f"alpha scales must be finite and >= 0 (means of |W|), got min {np.min(alpha)}")


def check_blocked(wb, F, K):
    """wb, checked to be blocked(w) of F filters of K words a row, as the kernels read it."""
    if wb.dtype != np.uint32 or not wb.flags.c_contiguous or wb.shape != (-(-F // 32) * 32 * K,):
        raise ValueError(f"weights of {wb.shape} for {F} filters of {K} words: expected blocked(w), "
                         f"({-(-F // 32) * 32 * K},)")
    return wb


def xnor_layer_ref(a, w, n, beta, alpha, b, grid, relu, pool):
    """A binary-input layer's output, channels last: out (N, Ho', Wo', F) float32 of the rows
    a (N Ho Wo, words) of pixels (n, i, j), grid = (N, Ho, Wo), each row's products with w (F, words)

        y = ((n - 2 popcount(a XOR w)) beta_r) alpha_j + b_j,   then max(y, 0) if relu,

    and with pool, the maximum of each 2x2 window of pixels (Ho' = Ho // 2; else Ho' = Ho), in float32
    in that order. alpha_j >= 0 (means of |W|), so y grows with (n - 2 d) beta_r, rounding included:
    the fast kernel takes the pool's maximum of those, then scales once."""
    y = (xnor_matmul_ref(a, w, n).astype(np.float32) * beta[:, None]) * alpha + b
    y = y.reshape(*grid, -1)
    if relu:
        y = np.maximum(y, 0)
    if pool:
        N, Ho, Wo, F = y.shape
        y = y[:, : Ho // 2 * 2, : Wo // 2 * 2].reshape(N, Ho // 2, 2, Wo // 2, 2, F).max(axis=(2, 4))
    return y


@numba.njit(inline="always", cache=True)
def _products(d, n, beta_r):
    """float32 (n - 2 d) beta_r: 16 filters' products with row r, scaled by its beta."""
    return simd.mul(lanes.to_float(lanes.dots(d, n)), simd.splat(beta_r))


@numba.njit(inline="always", cache=True)
def _store(o, at, z, alpha_f, b_f, m, relu):
    """o[at : at + m] = z alpha_f + b_f (then max(., 0) if relu): m filters' outputs."""
    y = simd.add(simd.mul(z, alpha_f), b_f)
    simd.store_first(o, at, simd.maximum(y, simd.splat(0)) if relu else y, m)


def _xnor_layer_loops(x32, starts, off, wb, n, beta, alpha, bias, Ho, Wo, relu, pool, out):
    N, Hq, Wq, _ = out.shape
    groups = N * Hq * Wq if pool else (starts.size + 3) // 4  # pool windows, or 4 rows in a row
    pairs = wb.size // (2 * lanes.LANES * off.size)
    for t in prange((groups + GROUPS_PER_TASK - 1) // GROUPS_PER_TASK * pairs):
        _layer_task(x32, starts, off, wb, n, beta, alpha, bias, Ho, Wo, relu, pool, out.reshape(-1), Hq, Wq, groups,
                    t // pairs * GROUPS_PER_TASK, t % pairs * 2)


@numba.njit(inline="always", cache=True)
def _layer_task(x32, starts, off, wb, n, beta, alpha, bias, Ho, Wo, relu, pool, o, Hq, Wq, groups, first, b):
    """Groups first .. first + GROUPS_PER_TASK - 1 against blocks b and b + 1 of the filters: one
    task of xnor_layer. A pool's windows are counted on from the task's first, not divided out of
    g (three integer divisions a window)."""
    R, F = starts.size, alpha.size
    f0, f1 = lanes.LANES * b, lanes.LANES * (b + 1)
    m0, m1 = max(0, min(lanes.LANES, F - f0)), max(0, min(lanes.LANES, F - f1))
    # loaded once a task: the kernel's stores to o could alias them, so LLVM would reload them
    alpha0, alpha1 = simd.load_first(alpha, f0, m0), simd.load_first(alpha, f1, m1)
    bias0, bias1 = simd.load_first(bias, f0, m0), simd.load_first(bias, f1, m1)
    image = i = j = 0  # with pool: the place of window g, counted on from the task's first
    if pool:
        image, i, j = first // (Hq * Wq), first // Wq % Hq, first % Wq
    for g in range(first, min(groups, first + GROUPS_PER_TASK)):
        if pool:  # the window's 4 pixels
            r0 = (image * Ho + 2 * i) * Wo + 2 * j
            r1, r2, r3 = r0 + 1, r0 + Wo, r0 + Wo + 1
            j += 1
            if j == Wq:
                i, j = i + 1, 0
                if i == Hq:
                    image, i = image + 1, 0
        else:
            r0, r1, r2, r3 = _four_rows(g, R)
        c0, c1, c2, c3, c4, c5, c6, c7 = _counts_of(x32, starts, r0, r1, r2, r3, off, wb, b, F)
        z0, z2, z4, z6 = _products(c0, n, beta[r0]), _products(c2, n, beta[r1]), _products(c4, n, beta[r2]), \
            _products(c6, n, beta[r3])  # filters f0 ..
        z1, z3, z5, z7 = _products(c1, n, beta[r0]), _products(c3, n, beta[r1]), _products(c5, n, beta[r2]), \
            _products(c7, n, beta[r3])  # filters f1 ..
        if pool:
            _store(o, g * F + f0, simd.maximum(simd.maximum(z0, z2), simd.maximum(z4, z6)), alpha0, bias0, m0, relu)
            _store(o, g * F + f1, simd.maximum(simd.maximum(z1, z3), simd.maximum(z5, z7)), alpha1, bias1, m1, relu)
            continue
        for q, (lo, hi) in enumerate(((z0, z1), (z2, z3), (z4, z5), (z6, z7))):
            if r0 + q < R:
                _store(o, (r0 + q) * F + f0, lo, alpha0, bias0, m0, relu)
                _store(o, (r0 + q) * F + f1, hi, alpha1, bias1, m1, relu)


_xnor_layer = twin(_xnor_layer_loops, MIN_WORDS, _nrt=False)
xnor_layer_serial = _xnor_layer.serial  # for compiled callers (chain.py)
run_xnor_layer = _xnor_layer  # (work, *rows, ...): xnor_layer without its checks, for windows.conv_runner


def xnor_layer(rows, wb, n, beta, alpha, b, grid, relu, pool, out):
    """Fast xnor_layer_ref, written into out (N, Ho', Wo', F) float32 and returned: rows (Rows) the
    N Ho Wo rows of pixels (n, i, j), wb = blocked(w), kept by the caller, alpha finite and >= 0.
    The max-pool is taken on the 4 pixels' (n - 2 d) beta as they are made, in registers, and alpha,
    b and the ReLU applied once to the maximum: the full-size output is never written."""
    (N, Ho, Wo), F, side = grid, out.shape[3], 2 if pool else 1
    if rows.starts.size != N * Ho * Wo or out.shape != (N, Ho // side, Wo // side, F) or beta.size != N * Ho * Wo \
            or alpha.shape != (F,) or b.shape != (F,):
        raise ValueError(f"xnor_layer: {rows.starts.size} rows and {beta.size} betas for a grid {grid} (pool {pool}), "
                         f"into {out.shape}, alpha {alpha.shape} and b {b.shape}: expected one of each per row, "
                         f"and per filter")
    if any(v.dtype != np.float32 or not v.flags.c_contiguous for v in (beta, alpha, b, out)) \
            or not 0 <= n <= 32 * rows.off.size:
        raise ValueError(f"xnor_layer: beta, alpha, b and out must be contiguous float32, n <= 32 words; got "
                         f"{beta.dtype}, {alpha.dtype}, {b.dtype}, {out.dtype}, n = {n}")
    check_blocked(wb, F, rows.off.size)
    check_alpha(alpha)
    _xnor_layer(rows.starts.size * rows.off.size * F, *rows, wb, n, beta, alpha, b, Ho, Wo, relu, pool, out)
    return out
