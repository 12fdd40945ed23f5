"""Conv2D, ReLU and 2x2 max-pool trained as one step: the gradient reaches one conv output in four.

The layers one by one (CS231n's conv_relu_pool sandwich, run as three layers) keep the conv's
full-size output and send the pool's gradient back through it densely. But a max passes its
gradient to one position of its window. For the conv's output y = conv(x, W) + b (N, F, Ho, Wo):

    out[n, f, i, j]   = max_{a, b in {0, 1}} y[n, f, 2i + a, 2j + b]     (max(., 0) after, with a ReLU)
    code[n, f, i, j]  = 2a + b of that maximum (the first in the window's row-major order, as
                        MaxPool2D's argmax), or NONE where a ReLU made the output 0

and with g = d(loss)/d(out), (r, s) = (2i + a, 2j + b) the position the code names, xp the
padded input and S the stride, the conv's backward sums over the coded positions alone:

    dW[f, c, kh, kw]              = sum_{n, i, j} g[n, f, i, j] xp[n, c, r S + kh, s S + kw]
    dxp[n, c, r S + kh, s S + kw] += g[n, f, i, j] W[f, c, kh, kw]
    db[f]                         = sum_{n, i, j} g[n, f, i, j]

A quarter of the multiply-adds of the dense backward (two GEMMs over every output pixel, after
im2row made its rows), and nothing full-size is kept for backward: the padded input, the codes
(a byte each) and the weights. The forward is minicnn.direct's conv (channels last, no im2row),
then one pass that pools, writes the codes, and puts the output in NCHW for the next layer.

`training_steps` finds the triples in a layer list; Sequential.forward and backward run them.
"""

import numba
import numpy as np
from numba import prange

from . import direct
from .checks import check_array
from .kernels import conv2d_backward_ref, conv2d_forward_ref, hwc_matrix, pad_nhwc
from .layers import Conv2D, MaxPool2D, ReLU
from .parallel import MIN_MACS, twin
from .simd import LANES, add, fma, load_first, splat, store_first

__all__ = ["ConvPool", "NONE", "conv_pool_backward", "conv_pool_backward_ref", "conv_pool_forward",
           "conv_pool_forward_ref", "training_steps"]

NONE = 4  # the code of a window whose output a ReLU set to 0: no gradient passes it
CHUNKS = 8  # backward's runs of images, each summing a dW of its own (then added in order)


def conv_pool_forward_ref(x, W, b, stride, padding, relu):
    """(out, codes), both (N, F, Ho // 2, Wo // 2): out float, codes uint8 (module docstring)."""
    y = conv2d_forward_ref(x, W, b, stride, padding)
    N, F, Ho, Wo = y.shape
    Hq, Wq = Ho // 2, Wo // 2
    windows = y[:, :, : 2 * Hq, : 2 * Wq].reshape(N, F, Hq, 2, Wq, 2).transpose(0, 1, 2, 4, 3, 5)
    windows = windows.reshape(N, F, Hq, Wq, 4)
    codes = windows.argmax(axis=-1).astype(np.uint8)  # the first maximum on ties
    out = windows.max(axis=-1)
    if relu:
        codes[out <= 0] = NONE
        out = np.maximum(out, 0)
    return out, codes


def conv_pool_backward_ref(dout, codes, x, W, stride, padding):
    """(dx, dW, db): dout put where the codes say in the conv's full-size gradient, then its backward."""
    N, F, Hq, Wq = dout.shape
    Ho, Wo = (np.array(x.shape[2:]) + 2 * padding - W.shape[2]) // stride + 1
    dy = np.zeros((N, F, Ho, Wo), dout.dtype)
    for a in range(2):
        for b in range(2):
            dy[:, :, a : 2 * Hq : 2, b : 2 * Wq : 2] = np.where(codes == 2 * a + b, dout, 0)
    return conv2d_backward_ref(dy, x, W, stride, padding)


def _pool_loops(y, relu, out, codes):
    N, F, Hq, Wq = out.shape
    for n in prange(N):
        for i in range(Hq):
            for j in range(Wq):
                for f in range(F):
                    # selects, not branches: a window's maximum is anywhere at random (as kernels' 2x2 pool)
                    best, v = y[n, 2 * i, 2 * j, f], y[n, 2 * i, 2 * j + 1, f]
                    code = 1 if v > best else 0
                    best = v if v > best else best
                    v = y[n, 2 * i + 1, 2 * j, f]
                    code = 2 if v > best else code
                    best = v if v > best else best
                    v = y[n, 2 * i + 1, 2 * j + 1, f]
                    code = 3 if v > best else code
                    best = v if v > best else best
                    if relu and best <= 0:  # NaN stays NaN, as the ReLU layer keeps it
                        best, code = np.float32(0), NONE
                    out[n, f, i, j] = best
                    codes[n, f, i, j] = code


_pool = twin(_pool_loops)


def conv_pool_forward(x, W, b, stride, padding, relu, y=None):
    """Fast conv_pool_forward_ref for float32 x (N, C, H, W), W (F, C, K, K), b (F,):
    (out, codes, xp), xp the padded channels-last input backward reads. y, if given, is the
    (N, Ho, Wo, F) float32 buffer the conv's full-size output is written to (a caller's, kept
    between calls: a new one of a few MB costs a page fault per 4 KB)."""
    F, _, K, _ = W.shape
    xp = pad_nhwc(x, padding)
    y = direct.conv_block(xp, direct.pack_filters(W, stride, False), b, F, K, stride, False, False, out=y)
    N, Ho, Wo, _ = y.shape
    out = np.empty((N, F, Ho // 2, Wo // 2), np.float32)
    codes = np.empty(out.shape, np.uint8)
    _pool(y.size, y, relu, out, codes)
    return out, codes, xp


def _backward_loops(dout, codes, xp, Hp, row, w, K, KC, S, C, input_grad, dxp, partial, bias):
    N, F, Hq, Wq = dout.shape
    chunks = len(bias)
    per_row = (KC + LANES - 1) // LANES  # vectors per tap row
    for c in prange(chunks):
        at, g = np.empty(Hq * Wq, np.int64), np.empty(Hq * Wq, np.float32)
        for n in range(c * N // chunks, (c + 1) * N // chunks):
            for f in range(F):
                active = _positions(dout, codes, n, f, n * Hp * row, row, S, C, at, g)
                bias[c, f] += g[:active].sum()
                for v in range(0, K * per_row, 4):  # the patch's vectors, four at a time
                    _dw_vectors(xp, at, g, active, row, KC, per_row, K * per_row, v, partial, (c * F + f) * K * KC)
                if input_grad:
                    _dx_scatter(w, at, g, active, row, K, KC, f, dxp)


@numba.njit(cache=True, inline="always")  # called per image and filter: no reference counts
def _positions(dout, codes, n, f, image, row, S, C, at, g):
    """How many of image n's outputs of filter f pass a gradient; at[k], g[k] for the k-th: where its
    patch starts in xp (flat), and its dout."""
    k = 0
    for i in range(dout.shape[2]):
        for j in range(dout.shape[3]):
            code = codes[n, f, i, j]  # written either way, kept if it passes: no branch to mispredict
            at[k] = image + (2 * i + (code >> 1) % 2) * S * row + (2 * j + code % 2) * S * C
            g[k] = dout[n, f, i, j]
            k += code != NONE
    return k


@numba.njit(cache=True)
def _vector(v, vectors, per_row, row, KC):
    """(offset in the patch, offset in its dW, lanes) of the patch's vector v: its tap row's
    (v // per_row) lanes from (v % per_row) * 16 on; 0 lanes past the last vector."""
    kh, t = v // per_row, v % per_row * LANES
    return kh * row + t, kh * KC + t, min(LANES, KC - t) if v < vectors else 0


@numba.njit(cache=True, inline="always")  # called per image and filter: no reference counts
def _dw_vectors(xp, at, g, active, row, KC, per_row, vectors, v, dw, to):
    """The patch's vectors v .. v + 3 of dW (at dw[to:]) += sum_k g[k] xp[at[k]:][the vector]:
    four independent sums in registers."""
    x0, d0, m0 = _vector(v, vectors, per_row, row, KC)
    x1, d1, m1 = _vector(v + 1, vectors, per_row, row, KC)
    x2, d2, m2 = _vector(v + 2, vectors, per_row, row, KC)
    x3, d3, m3 = _vector(v + 3, vectors, per_row, row, KC)
    a0 = a1 = a2 = a3 = splat(0.0)
    for k in range(active):
        gk, src = splat(g[k]), at[k]
        a0 = fma(gk, load_first(xp, src + x0, m0), a0)
        a1 = fma(gk, load_first(xp, src + x1, m1), a1)
        a2 = fma(gk, load_first(xp, src + x2, m2), a2)
        a3 = fma(gk, load_first(xp, src + x3, m3), a3)
    store_first(dw, to + d0, add(a0, load_first(dw, to + d0, m0)), m0)
    store_first(dw, to + d1, add(a1, load_first(dw, to + d1, m1)), m1)
    store_first(dw, to + d2, add(a2, load_first(dw, to + d2, m2)), m2)
    store_first(dw, to + d3, add(a3, load_first(dw, to + d3, m3)), m3)


@numba.njit(cache=True, inline="always")  # called per image and filter: no reference counts
def _dx_scatter(w, at, g, active, row, K, KC, f, dxp):
    """dxp[the patch at at[k]] += g[k] W[f], for each of the `active` positions."""
    for k in range(active):
        gk = splat(g[k])
        for kh in range(K):  # a tap row (kw, c) is KC floats in a row of xp
            src, tap = at[k] + kh * row, (f * K + kh) * KC
            for t in range(0, KC, LANES):
                m = min(LANES, KC - t)
                store_first(dxp, src + t, fma(gk, load_first(w, tap + t, m), load_first(dxp, src + t, m)), m)


_backward = twin(_backward_loops, min_work=MIN_MACS)


def conv_pool_backward(dout, codes, xp, W, stride, padding, input_grad=True):
    """Fast conv_pool_backward_ref from conv_pool_forward's codes and xp: (dx, dW, db), dx None
    without input_grad. dout (N, F, Hq, Wq) float32; the sums run over CHUNKS runs of images
    in the same order on either build, so both give the same bits."""
    N, F, Hq, Wq = dout.shape
    _, C, K, _ = W.shape
    _, Hp, Wp, _ = xp.shape
    w = hwc_matrix(W).reshape(-1)  # (F, K, K, C): a tap row is contiguous
    chunks = min(N, CHUNKS)
    partial, bias = np.zeros((chunks, F, K, K, C), np.float32), np.zeros((chunks, F), np.float32)
    dxp = np.zeros(xp.shape if input_grad else 0, np.float32)
    _backward(N * F * Hq * Wq * K * K * C, np.ascontiguousarray(dout, np.float32), codes, xp.reshape(-1), Hp,
              Wp * C, w, K, K * C, stride, C, input_grad, dxp.reshape(-1), partial.reshape(-1), bias)
    dW = np.ascontiguousarray(partial.sum(axis=0).transpose(0, 3, 1, 2))
    db = bias.sum(axis=0)
    if not input_grad:
        return None, dW, db
    P = padding
    dx = dxp[:, P : Hp - P, P : Wp - P].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(dx), dW, db


class ConvPool:
    """A float32 Conv2D, MaxPool2D(2, 2) and a ReLU before or after it (or none), forward and
    backward as one step: fills the conv's grads like its own backward. Other dtypes (the
    float64 of gradient checks) run the layers one by one.

    A layer of Conv2D's geometry that is not one (optim's pruned and weight-shared convs) takes
    the step's place through two methods: step_params() -> (W (F, C, K, K), b) float32, the dense
    weights to convolve with, and set_step_grads(dW, db), its own grads from theirs."""

    def __init__(self, layers):
        self.layers = tuple(layers)
        self.conv = layers[0]
        self.pool = next(layer for layer in layers if type(layer) is MaxPool2D)
        self.relu = any(type(layer) is ReLU for layer in layers)
        self.cache = self.y = None

    def forward(self, x):
        conv = self.conv
        if conv.dtype != np.float32:
            self.cache = "layers"
            for layer in self.layers:
                x = layer.forward(x)
            return x
        check_array(x, "Conv2D input", ndim=4, finite=False)
        shape = conv.output_shape(x.shape[1:])  # names a wrong channel count or too small an input
        self.pool.output_shape(shape)  # likewise, a window larger than the conv's output
        y_shape = (len(x), *shape[1:], shape[0])
        if self.y is None or self.y.shape != y_shape:
            self.y = np.empty(y_shape, np.float32)
        W, b = (conv.params["W"], conv.params["b"]) if type(conv) is Conv2D else conv.step_params()
        out, codes, xp = conv_pool_forward(x.astype(np.float32, copy=False), W, b, conv.stride, conv.padding,
                                           self.relu, self.y)
        self.cache = (codes, xp, W)
        return out

    def backward(self, dout):
        if self.cache is None:
            raise RuntimeError("ConvPool.backward before forward: the step keeps what backward needs")
        if self.cache == "layers":
            for layer in reversed(self.layers):
                dout = layer.backward(dout)
            return dout
        conv = self.conv
        codes, xp, W = self.cache
        dx, dW, db = conv_pool_backward(dout, codes, xp, W, conv.stride, conv.padding, conv.needs_input_grad)
        if type(conv) is Conv2D:
            conv.grads["W"], conv.grads["b"] = dW, db
        else:
            conv.set_step_grads(dW, db)
        return dx


def training_steps(layers):
    """The layer list as Sequential's training runs it: each Conv2D (or layer offering step_params)
    followed by [ReLU] MaxPool2D(2, 2) [ReLU] (one ReLU at most) as one ConvPool, every other layer
    itself."""
    def at(k, kind):
        return k < len(layers) and type(layers[k]) is kind

    steps, i = [], 0
    while i < len(layers):
        relu_first = at(i + 1, ReLU)
        j = i + 1 + relu_first
        convolves = at(i, Conv2D) or hasattr(layers[i], "step_params")
        if convolves and at(j, MaxPool2D) and layers[j].kernel_size == layers[j].stride == 2:
            j += 1 + (not relu_first and at(j + 1, ReLU))
            steps.append(ConvPool(layers[i:j]))
        else:
            steps.append(layers[i])
            j = i + 1
        i = j
    return steps
