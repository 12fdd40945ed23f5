"""Real inputs times binary weights, 16 outputs to a vector: masked adds where floats multiply-add.

A binary layer with real inputs (BinaryConnect, Courbariaux et al., NeurIPS
2015) has weights alpha_j * s_ji with s_ji in {-1, +1}. For a row x of n reals,

    y_j = alpha_j * sum_i s_ji x_i + b_j = alpha_j * (2 P_j - S) + b_j,
    P_j = sum_{i: s_ji = +1} x_i,       S = sum_i x_i.

P for 16 outputs at once takes one masked add per input: the signs of input
i for outputs 16g .. 16g + 15 are the bits of one uint16 (`pack_lanes`), and
simd.add_where(P, lanes, i, [x_i] * 16) adds x_i in the lanes whose sign is +1.
Where the float kernel (minicnn.direct.dense_block) reads a 4-byte weight
per multiply-add, this reads one bit: at batch 1, where reading the weights
is the work (LeNet-5's fc1: 1.6 MB of float32, 50 KB of bits), it is faster;
over many rows a masked add issues at the rate of a multiply-add, and the
two kernels run level.

Layout: lanes (G, n) uint16, G = ceil(F / 16); bit l of lanes[g, i] is 1 iff
s_{16g+l, i} = +1, and the bits of outputs past F are 0.

Like direct.dense_block, the kernel holds a tile of 8 rows x 32 outputs
(sixteen 16-lane sums) for rows in groups of 8: each pair of masks is loaded
once for 8 rows and each input once for 32 outputs. The rows left over run
alone, 128 outputs (eight sums) per task, or, in a layer of fewer than 8
groups (at most 112 outputs), 16 outputs per task as eight sums over every
eighth input: eight masked adds in flight either way, each one waits 4
cycles for the one before it. (So a row alone there adds in another order
than a row of a tile, and the two can differ in the last bits, as in
minicnn.narrow.) S is a row's plain sum, taken once.
"""

import numba
import numpy as np
from numba import prange

from minicnn.checks import check_kernel_array, output_array
from minicnn.parallel import MIN_MACS, twin
from minicnn.simd import LANES, add, add_where, broadcast, fma, load, load_first, maximum, splat, store_first, total

__all__ = [
    "ADDSUB_BELOW", "addsub_dense", "addsub_dense_ref", "addsub_dense_runner", "addsub_dense_serial", "pack_lanes",
]

ROWS = 8  # rows per tile
ADDSUB_BELOW = 8  # rows: a real-input PackedBinaryDense runs these kernels below, the float one from here


def pack_lanes(signs):
    """signs (F, n), any reals: (ceil(F / 16), n) uint16 whose bit l of [g, i] is signs[16g + l, i] > 0."""
    F, n = signs.shape
    G = -(-F // LANES)
    positive = np.zeros((G * LANES, n), np.uint32)
    positive[:F] = signs > 0
    weights = (np.uint32(1) << np.arange(LANES, dtype=np.uint32))[None, :, None]  # lane l is bit l
    return (positive.reshape(G, LANES, n) * weights).sum(axis=1).astype(np.uint16)


def addsub_dense_ref(x, signs, alpha, b, relu=False):
    """The specification: y (R, F) = (x @ signs.T) * alpha + b for x (R, n), signs (F, n) in {-1, +1};
    max(y, 0) if relu."""
    y = (x @ signs.T) * alpha + b
    return np.maximum(y, 0) if relu else y


@numba.njit(cache=True)
def _row_sum(x, start, n):
    """sum(x[start : start + n]) as two 16-lane sums, added at the end (so in another order than a loop's).
    (A plain loop, even with fastmath's reassociation, stayed scalar: the seed CNN's 5,408 inputs took
    2.6 us a row against 0.3.)"""
    a0 = a1 = splat(0.0)
    end = start + n // 32 * 32
    for i in range(start, end, 32):
        a0, a1 = add(a0, load(x, i)), add(a1, load(x, i + LANES))
    for i in range(end, start + n, LANES):
        a0 = add(a0, load_first(x, i, min(LANES, start + n - i)))
    return total(add(a0, a1))


@numba.njit(cache=True)
def _emit(out, at, p, S, alpha, b, f, F, relu):
    """out[at : at + w] = alpha[f : f + w] * (2 p - S) + b[f : f + w], w = the outputs left of 16 from f;
    through max(., 0) if relu."""
    w = min(max(F - f, 0), LANES)
    y = fma(load_first(alpha, f, w), add(add(p, p), splat(-S)), load_first(b, f, w))
    store_first(out, at, maximum(y, splat(0.0)) if relu else y, w)


@numba.njit(cache=True)
def _tile(x, lanes, alpha, b, out, r, g, n, G, F, relu):
    """Rows r .. r + 7, outputs 16g .. 16g + 31."""
    two = g + 1 < G
    z = splat(0.0)
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = z  # outputs 16g .. 16g + 15 of the 8 rows
    q0 = q1 = q2 = q3 = q4 = q5 = q6 = q7 = z  # outputs 16g + 16 .. 16g + 31
    for i in range(n):
        at, lo, hi = r * n + i, g * n + i, (g + 1) * n + i
        v0, v1, v2, v3 = broadcast(x, at), broadcast(x, at + n), broadcast(x, at + 2 * n), broadcast(x, at + 3 * n)
        v4, v5, v6, v7 = broadcast(x, at + 4 * n), broadcast(x, at + 5 * n), broadcast(x, at + 6 * n), \
            broadcast(x, at + 7 * n)
        p0, p1, p2, p3 = add_where(p0, lanes, lo, v0), add_where(p1, lanes, lo, v1), add_where(p2, lanes, lo, v2), \
            add_where(p3, lanes, lo, v3)
        p4, p5, p6, p7 = add_where(p4, lanes, lo, v4), add_where(p5, lanes, lo, v5), add_where(p6, lanes, lo, v6), \
            add_where(p7, lanes, lo, v7)
        if two:  # loop-invariant: LLVM keeps a loop without it for a last group alone
            q0, q1, q2, q3 = add_where(q0, lanes, hi, v0), add_where(q1, lanes, hi, v1), \
                add_where(q2, lanes, hi, v2), add_where(q3, lanes, hi, v3)
            q4, q5, q6, q7 = add_where(q4, lanes, hi, v4), add_where(q5, lanes, hi, v5), \
                add_where(q6, lanes, hi, v6), add_where(q7, lanes, hi, v7)
    f = LANES * g
    for k, (p, q) in enumerate(((p0, q0), (p1, q1), (p2, q2), (p3, q3), (p4, q4), (p5, q5), (p6, q6), (p7, q7))):
        S = _row_sum(x, (r + k) * n, n)
        _emit(out, (r + k) * F + f, p, S, alpha, b, f, F, relu)
        _emit(out, (r + k) * F + f + LANES, q, S, alpha, b, f + LANES, F, relu)


@numba.njit(cache=True)
def _span(x, lanes, alpha, b, out, r, g, first, n, F, relu):
    """Row r alone, groups g .. g + 7 (outputs 16g .. 16g + 127): eight sums, each mask read once.
    Stores groups g + first .. g + 7: a row's last span starts 8 groups before the end, so that
    every span has 8 (a test per group in the loop would cost more than the groups it saves)."""
    z = splat(0.0)
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = z
    for i in range(n):
        v, at = broadcast(x, r * n + i), g * n + i
        p0, p1 = add_where(p0, lanes, at, v), add_where(p1, lanes, at + n, v)
        p2, p3 = add_where(p2, lanes, at + 2 * n, v), add_where(p3, lanes, at + 3 * n, v)
        p4, p5 = add_where(p4, lanes, at + 4 * n, v), add_where(p5, lanes, at + 5 * n, v)
        p6, p7 = add_where(p6, lanes, at + 6 * n, v), add_where(p7, lanes, at + 7 * n, v)
    S = _row_sum(x, r * n, n)
    for k, p in enumerate((p0, p1, p2, p3, p4, p5, p6, p7)):
        if k >= first:
            f = LANES * (g + k)
            _emit(out, r * F + f, p, S, alpha, b, f, F, relu)


@numba.njit(cache=True)
def _group(x, lanes, alpha, b, out, r, g, n, F, relu):
    """Row r alone, group g (outputs 16g .. 16g + 15), for layers of fewer than 8 groups: eight
    sums over every eighth input, added at the end, so that eight adds are in flight, as in _span."""
    z = splat(0.0)
    p0 = p1 = p2 = p3 = p4 = p5 = p6 = p7 = z
    full = n - n % 8
    for i in range(0, full, 8):
        v, at = r * n + i, g * n + i
        p0, p1 = add_where(p0, lanes, at, broadcast(x, v)), add_where(p1, lanes, at + 1, broadcast(x, v + 1))
        p2, p3 = add_where(p2, lanes, at + 2, broadcast(x, v + 2)), add_where(p3, lanes, at + 3, broadcast(x, v + 3))
        p4, p5 = add_where(p4, lanes, at + 4, broadcast(x, v + 4)), add_where(p5, lanes, at + 5, broadcast(x, v + 5))
        p6, p7 = add_where(p6, lanes, at + 6, broadcast(x, v + 6)), add_where(p7, lanes, at + 7, broadcast(x, v + 7))
    for i in range(full, n):
        p0 = add_where(p0, lanes, g * n + i, broadcast(x, r * n + i))
    p = add(add(add(p0, p1), add(p2, p3)), add(add(p4, p5), add(p6, p7)))
    f = LANES * g
    _emit(out, r * F + f, p, _row_sum(x, r * n, n), alpha, b, f, F, relu)


def _addsub_dense_loops(x, lanes, alpha, b, relu, out):
    R, n = x.shape
    G, F = lanes.shape[0], out.shape[1]
    tiles, pairs = R // ROWS, (G + 1) // 2
    alone = (G + 7) // 8 if G >= 8 else G  # tasks per row left over: spans of 8 groups, or groups
    xf, lf, of = x.reshape(-1), lanes.reshape(-1), out.reshape(-1)
    for t in prange(tiles * pairs + (R - tiles * ROWS) * alone):
        if t < tiles * pairs:
            _tile(xf, lf, alpha, b, of, t // pairs * ROWS, t % pairs * 2, n, G, F, relu)
            continue
        r, s = tiles * ROWS + (t - tiles * pairs) // alone, (t - tiles * pairs) % alone
        if G >= 8:
            g = min(8 * s, G - 8)
            _span(xf, lf, alpha, b, of, r, g, 8 * s - g, n, F, relu)
        else:
            _group(xf, lf, alpha, b, of, r, s, n, F, relu)


# A weight is a bit here, so the threads pay where they do for the conv kernels (LeNet-5's fc1 at
# batch 1, 400 K masked adds: 9 us serial, 12 us threaded).
_addsub_dense = twin(_addsub_dense_loops, min_work=MIN_MACS, _nrt=False)  # no NRT: xnor.py says why
addsub_dense_serial = _addsub_dense.serial  # for compiled callers (chain.py)


def addsub_dense_runner(x_shape, F, relu):
    """addsub_dense for x of x_shape (R, n) and F outputs, nothing checked: returns
    run(x, lanes, alpha, b, out) -> out (minicnn.direct.conv_block_runner says why)."""
    work = x_shape[0] * x_shape[1] * F

    def run(x, lanes, alpha, b, out):
        _addsub_dense(work, x, lanes, alpha, b, relu, out)
        return out

    return run


def addsub_dense(x, lanes, alpha, b, relu=False, out=None):
    """Fast addsub_dense_ref (then max(., 0) if relu): x (R, n) float32, lanes = pack_lanes(signs)
    (ceil(F / 16), n) uint16, alpha (F,) and b (F,) float32, all C-contiguous: returns out (R, F),
    written in place if given."""
    check_kernel_array(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be (R, n), got shape {x.shape}")
    R, n = x.shape
    F = alpha.shape[0] if isinstance(alpha, np.ndarray) else -1
    check_kernel_array(alpha, "alpha", (F,))
    check_kernel_array(b, "b", (F,))
    check_kernel_array(lanes, "lanes (pack_lanes' output)", (-(-F // LANES), n), np.uint16)
    out = output_array(out, (R, F))
    return addsub_dense_runner(x.shape, F, relu)(x, lanes, alpha, b, out)
