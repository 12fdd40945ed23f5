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

A conv of one input channel (a first layer on grayscale images, LeNet's
conv1) leaves lanes of that tile idle: a tap is one weight per filter, and
20 filters fill 20 of 32 lanes. So where that happens, at stride 1 and
with a pool after it (`in_quads`), its vectors hold 4 filters x 4 pixels
instead, lane 4a + b being filter a at pixel b: a tap is the 4 pixels'
inputs, one 16-byte load broadcast to the 4 rows (minicnn.quads), times
each group of 4 filters' weights, which pack_filters stores 4 times over
(quad_row). The tile is the same 8 pixels (two quads) by 32 filters, but a
block of F < 32 filters spends ceil(F / 4) vectors a quad: LeNet's conv1
does 10 multiply-adds a tap, not 16 (1.3-1.4x as fast, 1.4-1.7x for 8 filters;
the same bits). The epilogue takes the pool's pairs of columns from
neighbouring lanes (quads.swap_pairs), puts each pixel's 4 filters side by
side (quads.transpose4) and stores them 16 bytes at a time.

Layouts (all float32, C-contiguous):
    xp   (N, Hp, Wp, C)          the input, already zero-padded, channels last
    w    (B, KH, KW, C, 32)      pack_filters(W): B = ceil(F / 32) blocks of 32 filters, zeros past F,
                                 so that a block's weights are read front to back; for a conv in
                                 quads, (B, KH, KW, 1, 32, 4): each weight 4 times
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
from .quads import quad_first, store_quarter, swap_pairs, transpose4
from .simd import LANES, add, aligned_empty, broadcast, fma, load, load_first, maximum, splat, store_first

__all__ = [
    "DENSE_MIN_MACS", "conv_block", "conv_block_ref", "conv_block_runner", "conv_row", "dense_block",
    "dense_block_ref", "dense_block_runner", "dense_span", "filter_strides", "in_quads", "output_shape", "pack_filters",
]

BLOCK = 2 * LANES  # filters per register tile
PIXELS = 8  # output pixels per register tile
ROW_SPAN = 8 * LANES  # outputs per task of a Dense with fewer rows than a tile
QUAD = 4  # a one-channel conv's vectors: 4 filters x 4 pixels


def conv_block_ref(x, W, b, stride, padding, relu, pool):
    """The specification, in NCHW: (N, C, H, W) -> (N, F, Ho', Wo'), conv then ReLU then 2x2 pool."""
    out = conv2d_forward_ref(x, W, b, stride, padding)
    if relu:
        out = np.maximum(out, 0)
    if pool:
        out = maxpool_forward_ref(out, 2, 2)[0]
    return out


def pack_filters(W, stride, pool):
    """W (F, C, KH, KW) of a conv of that stride (and 2x2 pool or not) as the flat (B, KH, KW, C, 32)
    array the kernel reads 32 filters at a time, starting on a 64-byte boundary; for a conv in
    quads (`in_quads`), (B, KH, KW, 1, 32, 4), each weight 4 times (the module docstring says why).
    (Read as (KH, KW, C, F) instead, rows of F floats leave a block's 128 bytes straddling cache
    lines: LeNet's conv2 took 1.4x as long.)"""
    F = W.shape[0]
    blocks, repeat = -(-F // BLOCK), QUAD if in_quads(W.shape[1], F, stride, pool) else 1
    shape = (blocks, *W.shape[2:], W.shape[1], BLOCK, repeat)
    # On a 64-byte boundary, each vector load of weights reads one cache line, not two: 3-9% of
    # a conv's time (LeNet-5's conv2 31 -> 28 us at batch 1), and what malloc happened to return
    # made that differ from process to process.
    w = aligned_empty(int(np.prod(shape))).reshape(shape)
    w[...] = 0
    taps = W.transpose(2, 3, 1, 0)[..., None]  # (KH, KW, C, F, 1)
    for blk in range(blocks):
        width = min(BLOCK, F - blk * BLOCK)
        w[blk, ..., :width, :] = taps[..., blk * BLOCK : blk * BLOCK + width, :]
    return w.reshape(-1)


@numba.njit(cache=True)
def in_quads(C, F, stride, pool):
    """Whether a conv of C input channels and F filters (stride, 2x2 pool or not) runs in quads
    (quad_row): one input channel at stride 1 (a quad's inputs are 4 neighbours, one load), a pool
    after it (its stores then fit the tile; unpooled ones, 8 pixels x 4 filters a group, made the
    conv 0.7x as fast), and idle lanes in conv_row's tile (F not a multiple of 16: with none, quads
    ran at 0.87-0.94x)."""
    return C == 1 and stride == 1 and pool and F % LANES != 0


@numba.njit(cache=True)
def filter_strides(C, F, K, stride, pool):
    """(block, tap): the strides of pack_filters' layout for a conv of C input channels, F filters,
    K x K kernels, this stride and pool or not."""
    tap = BLOCK * QUAD if in_quads(C, F, stride, pool) else BLOCK
    return K * K * C * tap, tap


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
    costs the seed CNN's 9-tap conv a third of its speed.) A conv in quads: quad_row."""
    if in_quads(C, F, S, pool):
        quad_row(x, Hp, Wp, w, bias, F, K, relu, out, n, r, blk)
        return
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
def quad_row(x, Hp, Wp, w, bias, F, K, relu, out, n, r, blk):
    """conv_row for convs that run in quads (`in_quads`), in vectors of 4 filters x 4 pixels (the
    module docstring): a tile is the same 8 pixels as conv_row's pooled one, two quads of 4
    neighbours in conv rows 2r and 2r + 1, columns 4 tile .. 4 tile + 3, by the block's groups of 4
    filters. A pixel past the last column reads zeros and is not stored. w is pack_filters' layout
    for quads: blocks K K QUAD BLOCK floats apart, taps QUAD BLOCK apart.

    LLVM compiles the loop of taps well in a function of its own only: inlined into conv_row, or
    with an unpooled tile's stores below it, the same loop ran at 0.7-0.85x this speed."""
    Wo = Wp - K + 1
    rows, cols = (Hp - K + 1) // 2, Wo // 2
    f0 = blk * BLOCK
    groups = (min(BLOCK, F - f0) + QUAD - 1) // QUAD  # of 4 filters: vectors in use per quad
    for tile in range((cols + 1) // 2):
        j = 4 * tile
        top, bottom, m = (n * Hp + 2 * r) * Wp + j, (n * Hp + 2 * r + 1) * Wp + j, min(QUAD, Wo - j)
        z = splat(0.0)
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z  # groups 0 .. 7 of the top quad
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z  # of the bottom one
        for kh in range(K):
            for kw in range(K):
                at, xo = ((blk * K + kh) * K + kw) * QUAD * BLOCK, kh * Wp + kw
                u, v = quad_first(x, top + xo, m), quad_first(x, bottom + xo, m)
                g = load(w, at)
                a0, b0 = fma(u, g, a0), fma(v, g, b0)
                # loop-invariant tests: LLVM splits the loop by them
                if groups > 1:
                    g = load(w, at + LANES)
                    a1, b1 = fma(u, g, a1), fma(v, g, b1)
                if groups > 2:
                    g = load(w, at + 2 * LANES)
                    a2, b2 = fma(u, g, a2), fma(v, g, b2)
                if groups > 3:
                    g = load(w, at + 3 * LANES)
                    a3, b3 = fma(u, g, a3), fma(v, g, b3)
                if groups > 4:
                    g = load(w, at + 4 * LANES)
                    a4, b4 = fma(u, g, a4), fma(v, g, b4)
                if groups > 5:
                    g = load(w, at + 5 * LANES)
                    a5, b5 = fma(u, g, a5), fma(v, g, b5)
                if groups > 6:
                    g = load(w, at + 6 * LANES)
                    a6, b6 = fma(u, g, a6), fma(v, g, b6)
                if groups > 7:
                    g = load(w, at + 7 * LANES)
                    a7, b7 = fma(u, g, a7), fma(v, g, b7)
        col = j // 2
        o, two = ((n * rows + r) * cols + col) * F, col + 1 < cols  # two: both pooled outputs in the row
        _pool_quads(out, o, a0, b0, bias, f0, F, relu, two)
        if groups > 1:
            _pool_quads(out, o, a1, b1, bias, f0 + QUAD, F, relu, two)
        if groups > 2:
            _pool_quads(out, o, a2, b2, bias, f0 + 2 * QUAD, F, relu, two)
        if groups > 3:
            _pool_quads(out, o, a3, b3, bias, f0 + 3 * QUAD, F, relu, two)
        if groups > 4:
            _pool_quads(out, o, a4, b4, bias, f0 + 4 * QUAD, F, relu, two)
        if groups > 5:
            _pool_quads(out, o, a5, b5, bias, f0 + 5 * QUAD, F, relu, two)
        if groups > 6:
            _pool_quads(out, o, a6, b6, bias, f0 + 6 * QUAD, F, relu, two)
        if groups > 7:
            _pool_quads(out, o, a7, b7, bias, f0 + 7 * QUAD, F, relu, two)


@numba.njit(inline="always", cache=True)
def _pool_quads(out, at, top, bottom, bias, f, F, relu, two):
    """Filters f .. f + 3 of a quad_row tile: the maxima of quads top and bottom over pairs of
    columns, plus the bias (then max(., 0) if relu), at out[at + f] and, if two, out[at + F + f]."""
    width = min(QUAD, F - f)
    a = maximum(top, bottom)
    a = _biased(transpose4(maximum(a, swap_pairs(a))), quad_first(bias, f, width), relu)  # quarters 0, 2: the pairs
    store_quarter(out, at + f, a, 0, width)
    if two:
        store_quarter(out, at + F + f, a, 2, width)


@numba.njit(inline="always", cache=True)
def _biased(a, blo, relu):
    a = add(a, blo)
    return maximum(a, splat(0.0)) if relu else a


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
    if strides is not None and in_quads(C, F, stride, pool):  # quad_row reads pack_filters' layout only
        raise ValueError("a conv in quads reads its weights as pack_filters lays them out, not at given strides")
    block_stride, tap_stride = strides or filter_strides(C, F, K, stride, pool)

    def run(xp, w, b, out):
        _conv_block(macs, xp.reshape(-1), Hp, Wp, C, w.reshape(-1), block_stride, tap_stride, b, F, K, stride,
                    relu, pool, out.reshape(-1))
        return out

    return run


def conv_block(xp, w, b, F, K, stride, relu, pool, out=None, strides=None):
    """Fast conv_block_ref on a padded channels-last xp (N, Hp, Wp, C): returns out (N, Ho', Wo', F).

    w = pack_filters(W, stride, pool) for W (F, C, K, K), b (F,), all float32; out, if given, is written in
    place. strides: w's (block, tap) strides when it is not pack_filters' layout (dense_block).
    """
    check_kernel_array(xp, "xp")
    if xp.ndim != 4:
        raise ValueError(f"xp must be (N, Hp, Wp, C), got shape {xp.shape}")
    check_kernel_array(b, "b", (F,))
    if strides is None:
        check_kernel_array(w, "w (pack_filters' output)",
                           (-(-F // BLOCK) * filter_strides(xp.shape[3], F, K, stride, pool)[0],))
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
DENSE_MIN_MACS = MIN_MACS // 2
_dense_rows = twin(_dense_rows_loops, min_work=DENSE_MIN_MACS)


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
