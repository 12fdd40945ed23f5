"""The GEMM's operand: a layer's rows as Words, copied by im2row or read in place from the image.

qgemm reads row r's word g (4 bytes, the codes' `kernels.unsigned` ones) at x32[starts[r] + off[g]]
(kernels.Words). For
rows already laid out (im2row's, a dense layer's input), starts[r] = r G and off[g] = g. A
conv's window needs no copy when its lines are whole words in the image:

    conv_words   no padding and C a multiple of 4: the window of output pixel (n, i, j) is
                 KH lines of KW C contiguous bytes, line kh at pixel (n, i S + kh, j S)
    line_words   one channel (KW <= 8): a line of KW bytes starts anywhere in a word, so the
                 image is copied 4 times, shifted by 0-3 bytes, and a line is read as
                 L = ceil(KW / 4) words of the copy where it starts on a word; its 4L - KW
                 bytes past the window meet zero weights (line_weights)

against im2row, which copies every window (25 bytes per output pixel for a 5x5 conv). With
pool = 2 the rows come pool window by pool window (`pool_order`): the 4 pixels of each 2x2
max-pool window, for qgemm's window = 4.
"""

import functools

import numpy as np

from .kernels import ROW_ALIGN, Words, pack_weights, pad_columns, shifted_copies

__all__ = ["as_words", "conv_fits_words", "conv_words", "line_fits_words", "line_weights", "line_width",
           "line_words", "pool_order", "rows_words"]


def as_words(x):
    """x's bytes (uint8 or int8, any shape, a multiple of 4 of them) as one flat uint32 array: a view
    where x is contiguous. What a bound step does per call where its offsets are fixed."""
    return np.ascontiguousarray(x).reshape(-1).view(np.uint32)


def rows_words(a, packed):
    """The Words of the rows of a (M, K), bytes: a zero-padded to the G = packed.wp.shape[1] groups
    of 4 columns, row r's words x32[r G + g]."""
    G = packed.wp.shape[1]
    return Words(as_words(pad_columns(a, 4 * G)), *_row_offsets(len(a), G))


@functools.lru_cache(maxsize=16)
def _row_offsets(M, G):
    """(starts, off) of rows_words, kept per shape. Read-only."""
    starts, off = np.arange(M, dtype=np.int64) * G, np.arange(G, dtype=np.int64)
    starts.flags.writeable = off.flags.writeable = False
    return starts, off


def conv_fits_words(x_shape, padding):
    """Whether conv_words can read a conv's windows from an input of x_shape (N, H, W, C) in place:
    no padding to fill, and channels in whole words (C a multiple of 4)."""
    return padding == 0 and x_shape[3] % ROW_ALIGN == 0


@functools.lru_cache(maxsize=16)
def pool_order(N, Ho, Wo, pool):
    """int64 (N Hp Wp pool^2): the indices of a conv's output pixels (rows (n Ho + i) Wo + j) pool
    window by pool window, the windows in NHWC order, the pixels of each row by row; Hp = Ho // pool,
    Wp = Wo // pool (a last row or column no window covers is left out, as max-pooling does). Read-only."""
    Hp, Wp = Ho // pool, Wo // pool
    pixels = np.arange(N * Ho * Wo).reshape(N, Ho, Wo)[:, : Hp * pool, : Wp * pool]
    order = pixels.reshape(N, Hp, pool, Wp, pool).transpose(0, 1, 3, 2, 4).reshape(-1)
    order.flags.writeable = False
    return order


def conv_words(x, KH, KW, stride, pool=1):
    """The Words of the conv windows of x bytes (N, H, W, C), read in place: im2row's row of output
    pixel (n, i, j), in its (kh, kw, c) order, is the words x32[starts[(n Ho + i) Wo + j] + off[g]]
    (pool > 1: the rows in pool_order). For conv_fits_words inputs."""
    starts, off = _window_offsets(*x.shape, KH, KW, stride, pool)
    return Words(as_words(x), starts, off)


@functools.lru_cache(maxsize=16)
def _window_offsets(N, H, W, C, KH, KW, stride, pool):
    """(starts, off) of conv_words, kept per shape: worked out with numpy, they would cost a batch-1
    conv more than its arithmetic. Read-only."""
    Ho, Wo, C4 = (H - KH) // stride + 1, (W - KW) // stride + 1, C // ROW_ALIGN
    n, i, j = np.ix_(np.arange(N), np.arange(Ho) * stride, np.arange(Wo) * stride)
    kh, kw, c = np.ix_(np.arange(KH), np.arange(KW), np.arange(C4))
    starts = (((n * H + i) * W + j) * C4).reshape(-1)[pool_order(N, Ho, Wo, pool)].astype(np.int64)
    off = ((kh * W + kw) * C4 + c).reshape(-1).astype(np.int64)
    starts.flags.writeable = off.flags.writeable = False
    return starts, off


def line_fits_words(x_shape, KW, padding):
    """Whether line_words reads a conv's windows from an input of x_shape (N, H, W, C)."""
    return padding == 0 and x_shape[3] == 1 and KW <= 2 * ROW_ALIGN


def line_weights(W):
    """pack_weights of W (F, 1, KH, KW) int8 laid out for line_words: line kh's KW weights, then
    zeros up to 4 ceil(KW / 4)."""
    F, _, KH, KW = W.shape
    L = -(-KW // ROW_ALIGN)
    wt = np.zeros((F, KH, ROW_ALIGN * L), np.int8)
    wt[:, :, :KW] = W[:, 0]
    return pack_weights(wt.reshape(F, -1))


def line_words(x, KH, KW, stride, pool=1):
    """The Words of the windows of x bytes (N, H, W, 1), for line_fits_words inputs and
    line_weights: line kh of output pixel (n, i, j) is words j' // 4 .. j' // 4 + L - 1 of row
    i S + kh in the copy shifted by j' % 4 bytes, j' = j S (pool > 1: the pixels in pool_order)."""
    N, H, W, _ = x.shape
    starts, off, Wq = _line_offsets(N, H, W, KH, KW, stride, pool)
    copies = shifted_copies(x.reshape(N, H, W), ROW_ALIGN * Wq)
    return Words(as_words(copies), starts, off)


def line_width(W, KW):
    """The words per row of line_words' copies of an image W pixels wide, for lines of KW bytes: the
    last window's last word inside its row."""
    return W // ROW_ALIGN + -(-KW // ROW_ALIGN) + 1


@functools.lru_cache(maxsize=16)
def _line_offsets(N, H, W, KH, KW, stride, pool):
    """(starts, off, words per row of a copy) of line_words, kept per shape. Read-only."""
    L, Wq = -(-KW // ROW_ALIGN), line_width(W, KW)
    Ho, Wo = (H - KH) // stride + 1, (W - KW) // stride + 1
    n, i, j = np.ix_(np.arange(N), np.arange(Ho) * stride, np.arange(Wo) * stride)
    starts = ((((j % ROW_ALIGN) * N + n) * H + i) * Wq + j // ROW_ALIGN).reshape(-1)[pool_order(N, Ho, Wo, pool)]
    starts = starts.astype(np.int64)
    kh, line = np.ix_(np.arange(KH), np.arange(L))
    off = (kh * Wq + line).reshape(-1).astype(np.int64)
    starts.flags.writeable = off.flags.writeable = False
    return starts, off, Wq
