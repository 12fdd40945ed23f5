"""Direct convolution, channels last, with bias, ReLU and 2x2 max-pool in its epilogue.

What inference runs for a Conv2D (and the ReLU and MaxPool2D(2) after it),
and for a Dense, which is a 1x1 convolution over a row of N pixels. The
arithmetic is kernels.conv2d_forward's,

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
loads, sets the pace (LeNet's conv2 runs at ~90% of the FMA units' rate,
docs/techniques.md). The 8 pixels are 8 neighbours along a row, or, with
pooling, the 2x4 block that makes 2 pooled outputs, so the max, the bias
and the ReLU are applied to the sums before anything is stored. Nothing
full-size is written.

Layouts (all float32, C-contiguous):
    xp   (N, Hp, Wp, C)     the input, already zero-padded, channels last
    w    (KH, KW, C, F)     pack_filters(W); a Dense's W (in, out) is already this, with K = 1
    out  (N, Ho', Wo', F)   channels last; Ho' = Ho // 2 with pooling
The last block of filters may be narrower than 32: its loads and stores are
masked (simd.load_first, store_first), so nothing needs padding.
"""

import numba
import numpy as np
from numba import prange

from .kernels import conv2d_forward_ref, conv_output_size, maxpool_forward_ref
from .parallel import MIN_MACS, twin
from .simd import LANES, add, broadcast, fma, load_first, maximum, splat, store_first

__all__ = ["conv_block", "conv_block_ref", "dense_block", "output_shape", "pack_filters"]

BLOCK = 2 * LANES  # filters per register tile
PIXELS = 8  # output pixels per register tile


def conv_block_ref(x, W, b, stride, padding, relu, pool):
    """The specification, in NCHW: (N, C, H, W) -> (N, F, Ho', Wo'), conv then ReLU then 2x2 pool."""
    out = conv2d_forward_ref(x, W, b, stride, padding)
    if relu:
        out = np.maximum(out, 0)
    if pool:
        out = maxpool_forward_ref(out, 2, 2)[0]
    return out


def pack_filters(W):
    """W (F, C, KH, KW) as the (KH, KW, C, F) array the kernel reads: a tap's filters side by side."""
    return np.ascontiguousarray(W.transpose(2, 3, 1, 0))


def output_shape(xp_shape, F, K, stride, pool):
    """(N, Ho', Wo', F) of conv_block on a padded input of xp_shape (N, Hp, Wp, C)."""
    N, Hp, Wp, _ = xp_shape
    Ho, Wo = conv_output_size(Hp, K, stride, 0), conv_output_size(Wp, K, stride, 0)
    return (N, Ho // 2, Wo // 2, F) if pool else (N, Ho, Wo, F)


def _conv_block_loops(x, Hp, Wp, C, w, bias, F, K, S, relu, pool, out):
    Ho, Wo = (Hp - K) // S + 1, (Wp - K) // S + 1
    rows, cols = (Ho // 2, Wo // 2) if pool else (Ho, Wo)
    tiles = (cols + 1) // 2 if pool else (cols + PIXELS - 1) // PIXELS  # per output row
    blocks = (F + BLOCK - 1) // BLOCK
    per_image = rows * tiles * blocks
    for t in prange(x.size // (Hp * Wp * C) * per_image):  # one tile of one block of filters per task
        n, rest = t // per_image, t % per_image
        r, rest = rest // (tiles * blocks), rest % (tiles * blocks)
        _tile(x, Hp, Wp, C, w, bias, F, K, S, relu, pool, out, n, r, rest // blocks, rest % blocks)
    return out


@numba.njit(cache=True)
def _tile(x, Hp, Wp, C, w, bias, F, K, S, relu, pool, out, n, r, tile, blk):
    """Output tile `tile` of row r of image n, filters 32 blk .. 32 blk + 31. A function of its
    own, not the body of the prange: inside a parallel loop LLVM compiles it 1.5x slower."""
    Ho, Wo = (Hp - K) // S + 1, (Wp - K) // S + 1
    rows, cols = (Ho // 2, Wo // 2) if pool else (Ho, Wo)
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
    f0 = blk * BLOCK
    width = min(BLOCK, F - f0)
    wlo, whi = min(width, LANES), max(width - LANES, 0)  # lanes in use of each vector
    z = splat(0.0)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = z  # filters f0 .. f0 + 15 of the 8 pixels
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = z  # filters f0 + 16 .. f0 + 31
    run = K * C  # a window's kh-th line: contiguous in NHWC
    for kh in range(K):
        xo = kh * Wp * C
        for k in range(run):
            at = (kh * run + k) * F + f0
            lo, hi = load_first(w, at, wlo), load_first(w, at + LANES, whi)
            v = broadcast(x, o0 + xo + k)
            a0, b0 = fma(v, lo, a0), fma(v, hi, b0)
            v = broadcast(x, o1 + xo + k)
            a1, b1 = fma(v, lo, a1), fma(v, hi, b1)
            v = broadcast(x, o2 + xo + k)
            a2, b2 = fma(v, lo, a2), fma(v, hi, b2)
            v = broadcast(x, o3 + xo + k)
            a3, b3 = fma(v, lo, a3), fma(v, hi, b3)
            v = broadcast(x, o4 + xo + k)
            a4, b4 = fma(v, lo, a4), fma(v, hi, b4)
            v = broadcast(x, o5 + xo + k)
            a5, b5 = fma(v, lo, a5), fma(v, hi, b5)
            v = broadcast(x, o6 + xo + k)
            a6, b6 = fma(v, lo, a6), fma(v, hi, b6)
            v = broadcast(x, o7 + xo + k)
            a7, b7 = fma(v, lo, a7), fma(v, hi, b7)
    blo, bhi = load_first(bias, f0, wlo), load_first(bias, f0 + LANES, whi)
    col = j // 2 if pool else j  # the tile's first output column
    at = ((n * rows + r) * cols + col) * F + f0
    if pool:
        _emit(out, at, maximum(maximum(a0, a1), maximum(a4, a5)), maximum(maximum(b0, b1), maximum(b4, b5)),
              blo, bhi, relu, wlo, whi)
        if col + 1 < cols:
            _emit(out, at + F, maximum(maximum(a2, a3), maximum(a6, a7)), maximum(maximum(b2, b3), maximum(b6, b7)),
                  blo, bhi, relu, wlo, whi)
        return
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


def conv_block(xp, w, b, F, K, stride, relu, pool, out=None):
    """Fast conv_block_ref on a padded channels-last xp (N, Hp, Wp, C): returns out (N, Ho', Wo', F).

    w = pack_filters(W), b (F,); out, if given, is written in place.
    """
    shape = output_shape(xp.shape, F, K, stride, pool)
    out = _output(out, shape)
    N, Hp, Wp, C = xp.shape
    macs = N * conv_output_size(Hp, K, stride, 0) * conv_output_size(Wp, K, stride, 0) * F * K * K * C
    _conv_block(macs, xp.reshape(-1), Hp, Wp, C, w.reshape(-1), b, F, K, stride, relu, pool, out.reshape(-1))
    return out


def _output(out, shape):
    """out, checked to be what the kernel writes through a flat view, or a new array of shape."""
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}, got "
                         f"{out.dtype} {out.shape}{'' if out.flags.c_contiguous else ' (not contiguous)'}")
    return out


def dense_block(x, W, b, relu, out=None):
    """max(x @ W + b, 0 if relu): x (N, in), W (in, out), b (out,) float32, as a 1x1 conv_block
    over a row of N pixels (the batch). out (N, out), if given, is written in place."""
    N, C = x.shape
    out = conv_block(x.reshape(1, 1, N, C), W, b, W.shape[1], 1, 1, relu, False,
                     None if out is None else out.reshape(1, 1, N, -1))
    return out.reshape(N, -1)
