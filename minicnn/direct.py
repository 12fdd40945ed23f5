"""Direct convolution, channels last, with bias, ReLU and 2x2 max-pool in its epilogue.

What inference runs for a Conv2D (and the ReLU and MaxPool2D(2) after it),
and for a Dense, which is a 1x1 convolution over rows of 8 pixels (dense_block).
The arithmetic is kernels.conv2d_forward's,

    out[n, i, j, f] = b[f] + sum_{kh, kw, c} xp[n, i*S + kh, j*S + kw, c] * W[f, c, kh, kw]

then, when asked, y = max(out, 0) and the max over 2x2 windows moved by 2
(either order: both are monotone, and the bias is the same across a window).
It is computed without im2row: for few input channels the rows are most of
the work (LeNet's conv1 reads 25 floats per output pixel and the GEMM does
25 x 20 multiply-adds with them), and an NCHW copy of the full-size output
is written only for the pool to read it back.

The kernel holds a tile of the output in registers: 8 output pixels x 32
filters, sixteen 16-lane sums (minicnn.simd). Each tap (kh, kw, c) loads
its 32 weights once (two vectors) and each pixel's input once (broadcast to
all lanes), then does 16 fused multiply-adds: the arithmetic, not the
loads, sets the pace (the inner loop of LeNet's conv2 runs at ~90% of the
FMA units' rate; docs/techniques.md has the whole kernel's). A block of at
most 16 filters (a narrow layer) skips the second vector: 8 multiply-adds a
tap instead of 16 of which half were masked (9 or 16 filters: 1.3-1.4x).
The 8 pixels are 8 neighbours along a row, or, with pooling, the 2x4 block
that makes 2 pooled outputs, so the max, the bias and the ReLU are applied
to the sums before anything is stored: with pooling, nothing full-size is
written.
With AVX2 (the portable build) a 16-lane sum takes two registers, and the
tile's sixteen spill: correct, slower.

Layouts (all float32, C-contiguous):
    xp   (N, Hp, Wp, C)          the input, already zero-padded, channels last
    w    (B, KH, KW, C, 32)      pack_filters(W): B = ceil(F / 32) blocks of 32 filters, zeros past F,
                                 so that a block's weights are read front to back
    out  (N, Ho', Wo', F)        channels last; Ho' = Ho // 2 with pooling
The kernel takes the weights with two strides (block, tap): a Dense's W
(in, out) is read in place as blocks 32 apart and taps `out` apart. The
last block of filters may be narrower than 32: its loads and stores are
masked (simd.load_first, store_first).
"""

import numba
import numpy as np
from numba import prange

from .checks import check_kernel_array, output_array
from .kernels import conv2d_forward_ref, conv_output_size, maxpool_forward_ref
from .parallel import MIN_MACS, twin
from .simd import LANES, add, aligned_empty, broadcast, fma, load_first, maximum, splat, store_first

__all__ = [
    "conv_block", "conv_block_ref", "conv_block_runner", "conv_row", "dense_block", "dense_block_ref",
    "dense_block_runner", "dense_span", "output_shape", "pack_filters",
]

BLOCK = 2 * LANES  # filters per register tile
PIXELS = 8  # output pixels per register tile
ROW_SPAN = 8 * LANES  # outputs per task of a Dense with fewer rows than a tile


def conv_block_ref(x, W, b, stride, padding, relu, pool):
    """The specification, in NCHW: (N, C, H, W) -> (N, F, Ho', Wo'), conv then ReLU then 2x2 pool."""
    out = conv2d_forward_ref(x, W, b, stride, padding)
    if relu:
        out = np.maximum(out, 0)
    if pool:
        out = maxpool_forward_ref(out, 2, 2)[0]
    return out


def pack_filters(W):
    """W (F, C, KH, KW) as the flat (B, KH, KW, C, 32) array the kernel reads 32 filters at a time,
    starting on a 64-byte boundary.
    (Read as (KH, KW, C, F) instead, rows of F floats leave a block's 128 bytes straddling cache
    lines: LeNet's conv2 took 1.4x as long.)"""
    F = W.shape[0]
    blocks = -(-F // BLOCK)
    shape = (blocks, *W.shape[2:], W.shape[1], BLOCK)
    # On a 64-byte boundary, each vector load of weights reads one cache line, not two: 3-9% of
    # a conv's time (LeNet-5's conv2 31 -> 28 us at batch 1), and what malloc happened to return
    # made that differ from process to process.
    w = aligned_empty(int(np.prod(shape))).reshape(shape)
    w[...] = 0
    taps = W.transpose(2, 3, 1, 0)  # (KH, KW, C, F)
    for blk in range(blocks):
        width = min(BLOCK, F - blk * BLOCK)
        w[blk, ..., :width] = taps[..., blk * BLOCK : blk * BLOCK + width]
    return w.reshape(-1)


def output_shape(xp_shape, F, K, stride, pool):
    """(N, Ho', Wo', F) of conv_block on a padded input of xp_shape (N, Hp, Wp, C)."""
    N, Hp, Wp, _ = xp_shape
    Ho, Wo = conv_output_size(Hp, K, stride, 0), conv_output_size(Wp, K, stride, 0)
    return (N, Ho // 2, Wo // 2, F) if pool else (N, Ho, Wo, F)


def _conv_block_loops(x, Hp, Wp, C, w, block_stride, tap_stride, bias, F, K, S, relu, pool, out):
    Ho = (Hp - K) // S + 1
    rows = Ho // 2 if pool else Ho
    blocks = (F + BLOCK - 1) // BLOCK
    for t in prange(x.size // (Hp * Wp * C) * rows * blocks):  # one output row, one block of filters
        n, r, blk = t // (rows * blocks), t // blocks % rows, t % blocks
        conv_row(x, Hp, Wp, C, w, block_stride, tap_stride, bias, F, K, S, relu, pool, out, n, r, blk)
    return out


@numba.njit(cache=True)
def conv_row(x, Hp, Wp, C, w, block_stride, tap_stride, bias, F, K, S, relu, pool, out, n, r, blk):
    """Output row r of image n (pooled row r with pool), filters 32 blk .. 32 blk + 31, tile by tile:
    one task of conv_block, whose arguments it takes flat. A function of its own, not the body of
    the prange: inside a parallel loop LLVM compiles it 1.5x slower. (A task per tile instead
    costs the seed CNN's 9-tap conv a third of its speed.)"""
    Ho, Wo = (Hp - K) // S + 1, (Wp - K) // S + 1
    rows, cols = (Ho // 2, Wo // 2) if pool else (Ho, Wo)
    f0 = blk * BLOCK
    width = min(BLOCK, F - f0)
    wlo, whi = min(width, LANES), max(width - LANES, 0)  # lanes in use of each vector
    blo, bhi = load_first(bias, f0, wlo), load_first(bias, f0 + LANES, whi)
    for tile in range((cols + 1) // 2 if pool else (cols + PIXELS - 1) // PIXELS):
        # The 8 pixels' window origins. With pooling: conv rows 2r and 2r + 1, columns
        # 4 tile .. 4 tile + 3. A pixel past the last column is computed as the last one
        # (clamped) and not stored.
        if pool:
            j = 4 * tile
            top, bottom = (n * Hp + 2 * r * S) * Wp, (n * Hp + (2 * r + 1) * S) * Wp
            c0, c1, c2, c3 = j * S, min(j + 1, Wo - 1) * S, min(j + 2, Wo - 1) * S, min(j + 3, Wo - 1) * S
            o0, o1, o2, o3 = (top + c0) * C, (top + c1) * C, (top + c2) * C, (top + c3) * C
            o4, o5, o6, o7 = (bottom + c0) * C, (bottom + c1) * C, (bottom + c2) * C, (bottom + c3) * C
        else:
            j = PIXELS * tile
            row = (n * Hp + r * S) * Wp
            o0, o1, o2, o3 = (row + j * S) * C, (row + min(j + 1, Wo - 1) * S) * C, \
                (row + min(j + 2, Wo - 1) * S) * C, (row + min(j + 3, Wo - 1) * S) * C
            o4, o5, o6, o7 = (row + min(j + 4, Wo - 1) * S) * C, (row + min(j + 5, Wo - 1) * S) * C, \
                (row + min(j + 6, Wo - 1) * S) * C, (row + min(j + 7, Wo - 1) * S) * C
        z = splat(0.0)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z  # filters f0 .. f0 + 15 of the 8 pixels
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z  # filters f0 + 16 .. f0 + 31
        run = K * C  # a window's kh-th line: contiguous in NHWC
        for kh in range(K):
            xo = kh * Wp * C
            for k in range(run):
                at = blk * block_stride + (kh * run + k) * tap_stride
                lo = load_first(w, at, wlo)
                v0, v1, v2, v3 = broadcast(x, o0 + xo + k), broadcast(x, o1 + xo + k), \
                    broadcast(x, o2 + xo + k), broadcast(x, o3 + xo + k)
                v4, v5, v6, v7 = broadcast(x, o4 + xo + k), broadcast(x, o5 + xo + k), \
                    broadcast(x, o6 + xo + k), broadcast(x, o7 + xo + k)
                a0, a1, a2, a3 = fma(v0, lo, a0), fma(v1, lo, a1), fma(v2, lo, a2), fma(v3, lo, a3)
                a4, a5, a6, a7 = fma(v4, lo, a4), fma(v5, lo, a5), fma(v6, lo, a6), fma(v7, lo, a7)
                if whi:  # loop-invariant: LLVM keeps a loop without it for narrow blocks
                    hi = load_first(w, at + LANES, whi)
                    b0, b1, b2, b3 = fma(v0, hi, b0), fma(v1, hi, b1), fma(v2, hi, b2), fma(v3, hi, b3)
                    b4, b5, b6, b7 = fma(v4, hi, b4), fma(v5, hi, b5), fma(v6, hi, b6), fma(v7, hi, b7)
        col = j // 2 if pool else j  # the tile's first output column
        at = ((n * rows + r) * cols + col) * F + f0
        if pool:
            _emit(out, at, maximum(maximum(a0, a1), maximum(a4, a5)), maximum(maximum(b0, b1), maximum(b4, b5)),
                  blo, bhi, relu, wlo, whi)
            if col + 1 < cols:
                _emit(out, at + F, maximum(maximum(a2, a3), maximum(a6, a7)), maximum(maximum(b2, b3), maximum(b6, b7)),
                      blo, bhi, relu, wlo, whi)
            continue
        left = cols - col  # pixels of this tile inside the row
        _emit(out, at, a0, b0, blo, bhi, relu, wlo, whi)
        if left > 1:
            _emit(out, at + F, a1, b1, blo, bhi, relu, wlo, whi)
        if left > 2:
            _emit(out, at + 2 * F, a2, b2, blo, bhi, relu, wlo, whi)
        if left > 3:
            _emit(out, at + 3 * F, a3, b3, blo, bhi, relu, wlo, whi)
        if left > 4:
            _emit(out, at + 4 * F, a4, b4, blo, bhi, relu, wlo, whi)
        if left > 5:
            _emit(out, at + 5 * F, a5, b5, blo, bhi, relu, wlo, whi)
        if left > 6:
            _emit(out, at + 6 * F, a6, b6, blo, bhi, relu, wlo, whi)
        if left > 7:
            _emit(out, at + 7 * F, a7, b7, blo, bhi, relu, wlo, whi)


@numba.njit(cache=True)
def _emit(out, at, lo, hi, blo, bhi, relu, wlo, whi):
    """out[at : at + wlo + whi] = [lo + blo, hi + bhi], first through max(., 0) if relu."""
    lo, hi = add(lo, blo), add(hi, bhi)
    if relu:
        lo, hi = maximum(lo, splat(0.0)), maximum(hi, splat(0.0))
    store_first(out, at, lo, wlo)
    store_first(out, at + LANES, hi, whi)


_conv_block = twin(_conv_block_loops, min_work=MIN_MACS)


def conv_block_runner(xp_shape, F, K, stride, relu, pool, strides=None):
    """conv_block for padded inputs of xp_shape (N, Hp, Wp, C), its sizes worked out once and
    nothing checked: returns run(xp, w, b, out) -> out.

    conv_block is the checked call. minicnn.inference binds a runner per stage and input shape
    to arrays it made: at batch 1, the checks and sizes of every call cost as much as a small
    layer's arithmetic.
    """
    N, Hp, Wp, C = xp_shape
    macs = N * conv_output_size(Hp, K, stride, 0) * conv_output_size(Wp, K, stride, 0) * F * K * K * C
    block_stride, tap_stride = strides or (K * K * C * BLOCK, BLOCK)

    def run(xp, w, b, out):
        _conv_block(macs, xp.reshape(-1), Hp, Wp, C, w.reshape(-1), block_stride, tap_stride, b, F, K, stride,
                    relu, pool, out.reshape(-1))
        return out

    return run


def conv_block(xp, w, b, F, K, stride, relu, pool, out=None, strides=None):
    """Fast conv_block_ref on a padded channels-last xp (N, Hp, Wp, C): returns out (N, Ho', Wo', F).

    w = pack_filters(W) for W (F, C, K, K), b (F,), all float32; out, if given, is written in
    place. strides: w's (block, tap) strides when it is not pack_filters' layout (dense_block).
    """
    check_kernel_array(xp, "xp")
    if xp.ndim != 4:
        raise ValueError(f"xp must be (N, Hp, Wp, C), got shape {xp.shape}")
    check_kernel_array(b, "b", (F,))
    if strides is None:
        check_kernel_array(w, "w (pack_filters' output)", (-(-F // BLOCK) * K * K * xp.shape[3] * BLOCK,))
    out = output_array(out, output_shape(xp.shape, F, K, stride, pool))
    return conv_block_runner(xp.shape, F, K, stride, relu, pool, strides)(xp, w, b, out)


def _dense_rows_loops(x, at, W, b, relu, out):
    N, C = x.shape
    F = W.shape[1]
    spans = (F + ROW_SPAN - 1) // ROW_SPAN
    for t in prange(N * spans):
        dense_span(x.reshape(-1), at, W.reshape(-1), b, relu, out.reshape(-1), t // spans, t % spans * ROW_SPAN, C, F)
    return out


@numba.njit(cache=True)
def dense_span(x, at, w, b, relu, out, n, f0, C, F):
    """out[n, f0 : f0 + 128] = b + sum_k x[n C + at[k]] w[k, f0 : f0 + 128] (then max(., 0) if relu),
    eight 16-lane sums, each weight read once: a row of a Dense (at the identity), or of Flatten then
    Dense on a channels-last input (at[k] where the input's value k in Flatten's order lies). One
    task of dense_block for fewer rows than a register tile; w (C, F) and the rest flat."""
    width = min(ROW_SPAN, F - f0)
    # lanes in use of each of the eight vectors
    m0, m1, m2, m3 = min(width, 16), min(max(width - 16, 0), 16), min(max(width - 32, 0), 16), \
        min(max(width - 48, 0), 16)
    m4, m5, m6, m7 = min(max(width - 64, 0), 16), min(max(width - 80, 0), 16), min(max(width - 96, 0), 16), \
        max(width - 112, 0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = splat(0.0)
    for k in range(C):
        v, i = broadcast(x, n * C + at[k]), k * F + f0
        s0, s1 = fma(v, load_first(w, i, m0), s0), fma(v, load_first(w, i + 16, m1), s1)
        s2, s3 = fma(v, load_first(w, i + 32, m2), s2), fma(v, load_first(w, i + 48, m3), s3)
        s4, s5 = fma(v, load_first(w, i + 64, m4), s4), fma(v, load_first(w, i + 80, m5), s5)
        s6, s7 = fma(v, load_first(w, i + 96, m6), s6), fma(v, load_first(w, i + 112, m7), s7)
    o = n * F + f0
    _emit(out, o, s0, s1, load_first(b, f0, m0), load_first(b, f0 + 16, m1), relu, m0, m1)
    _emit(out, o + 32, s2, s3, load_first(b, f0 + 32, m2), load_first(b, f0 + 48, m3), relu, m2, m3)
    _emit(out, o + 64, s4, s5, load_first(b, f0 + 64, m4), load_first(b, f0 + 80, m5), relu, m4, m5)
    _emit(out, o + 96, s6, s7, load_first(b, f0 + 96, m6), load_first(b, f0 + 112, m7), relu, m6, m7)


# Half the conv kernels' break-even: each multiply-add here reads a weight of its own, so two
# cores' caches pay sooner (LeNet-5's fc1 at batch 1, 400 K: 33 us serial, 25 us threaded).
_dense_rows = twin(_dense_rows_loops, min_work=MIN_MACS // 2)


def dense_block_ref(x, W, b, relu):
    """The specification: max(x @ W + b, 0) if relu, else x @ W + b."""
    out = x @ W + b
    return np.maximum(out, 0) if relu else out


def dense_block_runner(x_shape, F, relu):
    """dense_block for inputs of x_shape (N, in) and F outputs, nothing checked: returns
    run(x, W, b, out) -> out (conv_block_runner says why)."""
    N, C = x_shape
    full = N - N % PIXELS
    image = (1, full // PIXELS, PIXELS)  # the groups of 8 rows, as one image of rows of 8 pixels
    if full:
        groups = conv_block_runner((*image, C), F, 1, 1, relu, False, strides=(BLOCK, F))
    identity = np.arange(C)

    def run(x, W, b, out):
        if full:
            groups(x[:full].reshape(*image, C), W, b, out[:full].reshape(*image, F))
        if full < N:
            _dense_rows((N - full) * C * F, x[full:], identity, W, b, relu, out[full:])
        return out

    return run


def dense_block(x, W, b, relu, out=None):
    """Fast dense_block_ref: x (N, in), W (in, out), b (out,), float32 and C-contiguous.
    out (N, out), if given, is written in place.

    Rows in groups of 8 are a 1x1 conv_block, each group one row of 8 pixels, so that each
    weight is loaded once for 8 rows. The rows left over run alone, 128 outputs per task
    (a register tile of them would leave most of its sums idle): the time goes to reading
    W once per row (LeNet-5's fc1: 1.6 MB).
    """
    check_kernel_array(x, "x")
    if x.ndim != 2:
        raise ValueError(f"x must be (N, in_features), got shape {x.shape}")
    (N, C), F = x.shape, W.shape[-1]
    check_kernel_array(W, "W", (C, F))
    check_kernel_array(b, "b", (F,))
    out = output_array(out, (N, F))
    return dense_block_runner(x.shape, F, relu)(x, W, b, out)
