"""A Dense layer with at most 16 outputs (a classifier), reading its inputs in any order.

    out[n, o] = b[o] + sum_k x[n, k] * W[order[k], o]        (then max(., 0) if relu)

With `order` the identity this is Dense. With `flatten_order`, it is Flatten
then Dense on a channels-last activation: x[n] is the (H, W, C) image read
in memory order, and each value finds its weight row where Flatten's
(C, H, W) order put it. No transposed copy of the activation is made.
(Gathering the inputs instead, to read the weights in order, is 25% faster
at batch 1 and 2.6x slower at batch 256.)

Why not BLAS: a product 10 columns wide is a bad shape for a GEMM kernel
(it packs its operands for tiles many columns wide): docs/techniques.md
has numpy's time for the seed CNN's classifier against this kernel's.
Here the 10 sums of a batch row fit one 16-lane register, so a tile of 8
rows keeps 8 registers of sums and each weight row is loaded once for all
8. Rows left over after the tiles of 8 run alone, their sum
split four ways (k mod 4) so that four multiply-adds are in flight.
"""

import numba
import numpy as np
from numba import prange

from .checks import check_kernel_array, output_array
from .parallel import MIN_MACS, twin
from .simd import LANES, add, broadcast, fma, load_first, maximum, splat, store_first

__all__ = [
    "MAX_OUTPUTS", "NARROW_MIN_MACS", "flatten_order", "input_order", "narrow_dense", "narrow_dense_ref",
    "narrow_dense_runner", "narrow_row",
]

MAX_OUTPUTS = LANES
ROWS = 8  # batch rows per register tile


def narrow_dense_ref(x, order, W, b, relu):
    """out (N, O) from x (N, K), order (K,) int, W (K, O), b (O,): the specification."""
    out = x @ W[order] + b
    return np.maximum(out, 0) if relu else out


def flatten_order(H, W, C):
    """order for x (N, H, W, C) taken flat: the (C, H, W)-order position of each value."""
    return np.arange(C * H * W).reshape(C, H, W).transpose(1, 2, 0).reshape(-1)


def input_order(shape):
    """order for a dense stage's input of `shape` (minicnn.inference): flatten_order after a Flatten
    of a channels-last (N, H, W, C), the identity for any other shape (N, ...) taken flat."""
    return flatten_order(*shape[1:]) if len(shape) == 4 else np.arange(int(np.prod(shape[1:])))


def _narrow_dense_loops(x, order, W, b, relu, out):
    N, K = x.shape
    O = W.shape[1]
    lowest, highest = 0, K - 1
    for k in range(K):  # min and max in one vectorised pass: numpy's two calls take longer at batch 1
        lowest, highest = min(lowest, order[k]), max(highest, order[k])
    if lowest < 0 or highest >= K:
        raise ValueError("narrow_dense: order must hold row numbers of W, 0 to K - 1")
    xf, Wf, of = x.reshape(-1), W.reshape(-1), out.reshape(-1)
    bias, zero = load_first(b, 0, O), splat(0.0)
    tiles = N // ROWS
    for t in prange(tiles + N % ROWS):
        if t < tiles:
            r = ROWS * t
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
            for k in range(K):
                w, j = load_first(Wf, order[k] * O, O), r * K + k
                a0 = fma(broadcast(xf, j), w, a0)
                a1 = fma(broadcast(xf, j + K), w, a1)
                a2 = fma(broadcast(xf, j + 2 * K), w, a2)
                a3 = fma(broadcast(xf, j + 3 * K), w, a3)
                a4 = fma(broadcast(xf, j + 4 * K), w, a4)
                a5 = fma(broadcast(xf, j + 5 * K), w, a5)
                a6 = fma(broadcast(xf, j + 6 * K), w, a6)
                a7 = fma(broadcast(xf, j + 7 * K), w, a7)
            sums = (a0, a1, a2, a3, a4, a5, a6, a7)
            for i in range(ROWS):
                v = add(sums[i], bias)
                store_first(of, (r + i) * O, maximum(v, zero) if relu else v, O)
        else:
            narrow_row(xf, order, Wf, b, relu, of, ROWS * tiles + t - tiles, K, O)
    return out


@numba.njit(cache=True)
def narrow_row(x, order, w, b, relu, out, r, K, O):
    """Row r of narrow_dense alone, its sum split four ways (k mod 4) so that four multiply-adds
    are in flight: one task of narrow_dense, the arrays flat."""
    a0 = a1 = a2 = a3 = splat(0.0)
    k = 0
    while k + 4 <= K:
        a0 = fma(broadcast(x, r * K + k), load_first(w, order[k] * O, O), a0)
        a1 = fma(broadcast(x, r * K + k + 1), load_first(w, order[k + 1] * O, O), a1)
        a2 = fma(broadcast(x, r * K + k + 2), load_first(w, order[k + 2] * O, O), a2)
        a3 = fma(broadcast(x, r * K + k + 3), load_first(w, order[k + 3] * O, O), a3)
        k += 4
    while k < K:
        a0 = fma(broadcast(x, r * K + k), load_first(w, order[k] * O, O), a0)
        k += 1
    v = add(add(add(a0, a1), add(a2, a3)), load_first(b, 0, O))
    store_first(out, r * O, maximum(v, splat(0.0)) if relu else v, O)


# Half the conv kernels' break-even: a classifier runs right after the network's last conv
# stage, whose worker thread is then still awake (the seed CNN's predict at batch 256, whose
# classifier does 13.8 M multiply-adds: 1.85 ms with it serial, 1.39 ms threaded).
NARROW_MIN_MACS = MIN_MACS // 2
_narrow_dense = twin(_narrow_dense_loops, min_work=NARROW_MIN_MACS)


def narrow_dense_runner(x_shape, O, relu):
    """narrow_dense for inputs of x_shape (N, K) and O outputs, nothing checked but `order`'s
    range: returns run(x, order, W, b, out) -> out (direct.conv_block_runner says why)."""
    work = x_shape[0] * x_shape[1] * O

    def run(x, order, W, b, out):
        return _narrow_dense(work, x, order, W, b, relu, out)

    return run


def narrow_dense(x, order, W, b, relu, out=None):
    """Fast narrow_dense_ref: x (N, K) float32, order (K,) int64, W (K, O <= 16) and b (O,) float32,
    all C-contiguous. out (N, O), if given, is written in place."""
    check_kernel_array(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be (N, K), got shape {x.shape}")
    (N, K), O = x.shape, W.shape[-1]
    if O > MAX_OUTPUTS:
        raise ValueError(f"narrow_dense takes at most {MAX_OUTPUTS} outputs, got W of shape {W.shape}")
    check_kernel_array(W, "W", (K, O))
    check_kernel_array(b, "b", (O,))
    check_kernel_array(order, "order", (K,), np.int64)
    out = output_array(out, (N, O))
    return narrow_dense_runner(x.shape, O, relu)(x, order, W, b, out)
