"""The GEMM's operand: a layer's rows as Words, copied by im2row or read in place from the image.

qgemm reads row r's word g (4 bytes, the codes' `kernels.unsigned` ones) at x32[starts[r] + off[g]]
(kernels.Words). For
rows already laid out (im2row's, a dense layer's input), starts[r] = r G and off[g] = g. A
conv's window needs no copy when its lines are whole words in the image:

    conv_words   no padding and C a multiple of 4: the window of output pixel (n, i, j) is
                 KH lines of KW C contiguous bytes, line kh at pixel (n, i S + kh, j S)
    line_words   one channel (KW <= 8, rows of whole words): a line of KW bytes starts anywhere
                 in a word, so the input is copied 4 times, shifted by 0-3 bytes, and a line is
                 read as L = ceil(KW / 4) words of the copy where it starts on a word; its 4L - KW
                 bytes past the window meet zero weights (line_weights)

against im2row (`im2row_nhwc`, here with the shifted copies and a NumPy reference of each), which
copies every window (25 bytes per output pixel for a 5x5 conv). With pool = 2 the rows come pool
window by pool window (`pool_order`): the 4 pixels of each 2x2 max-pool window, for qgemm's
window = 4. The copies' serial builds are for compiled callers (chain.py).
"""

import functools

import numpy as np
from numba import prange

from minicnn.kernels import conv_output_size
from minicnn.parallel import twin

from .kernels import ROW_ALIGN, Words, pack_weights, pad_columns

__all__ = ["as_words", "conv_fits_words", "conv_words", "im2row_nhwc", "im2row_nhwc_ref", "im2row_work",
           "line_fits_words", "line_weights", "line_words", "pool_order", "rows_words", "shifted_copies",
           "shifted_copies_ref", "shifted_copies_work"]


# --------------------------------------------------------------------------
# Copies: im2row on NHWC bytes, padding with the zero point's byte; a one-channel image's shifted copies


def im2row_nhwc_ref(x, KH, KW, stride, padding, fill, width):
    """rows (N*Ho*Wo, width), x's dtype, of x (N, H, W, C), padded spatially with `fill`;
    columns KH*KW*C .. width - 1 are 0 (width >= KH*KW*C)."""
    p = padding
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (KH, KW), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (N, Ho, Wo, C, KH, KW)
    N, Ho, Wo, C = windows.shape[:4]
    return pad_columns(windows.transpose(0, 1, 2, 4, 5, 3).reshape(N * Ho * Wo, KH * KW * C), width)


def _im2row_nhwc_loops(x, KH, KW, stride, padding, fill, width):
    N, H, W, C = x.shape
    # conv_output_size spelled out: compiled code cannot call the Python function
    Ho = (H + 2 * padding - KH) // stride + 1
    Wo = (W + 2 * padding - KW) // stride + 1
    rows = np.empty((N * Ho * Wo, width), dtype=x.dtype)
    xf, out, run = x.reshape(-1), rows.reshape(-1), KW * C
    for t in prange(N * Ho):
        n, i = t // Ho, t % Ho
        for j in range(Wo):
            row = (t * Wo + j) * width
            at, w0 = row, j * stride - padding
            for kh in range(KH):
                h = i * stride + kh - padding
                if 0 <= h < H and 0 <= w0 and w0 + KW <= W:  # a window line inside the image: KW*C bytes in a row
                    src = ((n * H + h) * W + w0) * C
                    for k in range(run):  # unsigned indices: no negative-index test, so the copy vectorises
                        out[np.uint64(at + k)] = xf[np.uint64(src + k)]
                else:
                    for kw in range(KW):
                        w = w0 + kw
                        inside = 0 <= h < H and 0 <= w < W
                        for c in range(C):
                            out[at + kw * C + c] = xf[((n * H + h) * W + w) * C + c] if inside else fill
                at += run
            for k in range(at, row + width):
                out[np.uint64(k)] = 0
    return rows


_im2row_nhwc = twin(_im2row_nhwc_loops)
im2row_nhwc_serial = _im2row_nhwc.serial  # its serial build, for compiled callers (chain.py)


def im2row_nhwc(x, KH, KW, stride, padding, fill, width):
    """Fast im2row_nhwc, same contract as im2row_nhwc_ref; serial for small inputs (batch 1)."""
    work = im2row_work(x.shape, KH, KW, stride, padding, width)
    return _im2row_nhwc(work, np.ascontiguousarray(x), KH, KW, stride, padding, fill, width)


def im2row_work(x_shape, KH, KW, stride, padding, width):
    """im2row_nhwc's work on inputs of x_shape (N, H, W, C), in minicnn.parallel's unit for it: bytes
    written (break-even MIN_OUTPUTS)."""
    N, H, W, _ = x_shape
    return N * conv_output_size(H, KH, stride, padding) * conv_output_size(W, KW, stride, padding) * width


def shifted_copies_ref(x):
    """(4, M), x's dtype: copy s of x (M,), bytes, is x shifted left by s bytes, zero-filled:
    copies[s, k] = x[k + s] where k + s < M, else 0."""
    copies = np.zeros((ROW_ALIGN, x.size), x.dtype)
    for s in range(min(ROW_ALIGN, x.size)):
        copies[s, : x.size - s] = x[s:]
    return copies


def _shifted_copies_loops(x):
    M = x.size
    out = np.empty((ROW_ALIGN, M), x.dtype)
    of = out.reshape(-1)
    for s in prange(ROW_ALIGN):  # four long copies: they vectorise (copies of each 28-byte row did not)
        inside = max(0, M - s)
        for k in range(inside):  # unsigned indices: no negative-index test in the loop
            of[np.uint64(s * M + k)] = x[np.uint64(k + s)]
        for k in range(inside, M):
            of[np.uint64(s * M + k)] = 0
    return out


_shifted_copies = twin(_shifted_copies_loops)
shifted_copies_serial = _shifted_copies.serial  # its serial build, for compiled callers (chain.py)


def shifted_copies(x):
    """Fast shifted_copies_ref, same contract (x 1-D); serial for small inputs (batch 1)."""
    if x.ndim != 1:
        raise ValueError(f"shifted copies are of flat bytes, got an array of shape {x.shape}")
    return _shifted_copies(shifted_copies_work(x.size), np.ascontiguousarray(x))


def shifted_copies_work(M):
    """shifted_copies' work for x of M bytes, in minicnn.parallel's unit for it: bytes copied
    (break-even MIN_OUTPUTS)."""
    return ROW_ALIGN * M


# --------------------------------------------------------------------------
# Words


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
    """Whether line_words reads a conv's windows from an input of x_shape (N, H, W, C): one channel,
    no padding, lines of at most 8 bytes, and rows of whole words (a line then starts on a word of
    the same copy in every row)."""
    return padding == 0 and x_shape[3] == 1 and KW <= 2 * ROW_ALIGN and x_shape[2] % ROW_ALIGN == 0


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
    line_weights: line kh of output pixel (n, i, j), which starts at byte p = ((n H + i S + kh) W +
    j S) of x, is words p // 4 .. p // 4 + L - 1 of the copy shifted by p % 4 bytes (L = ceil(KW /
    4); pool > 1: the pixels in pool_order). Its 4 L - KW bytes past the window, the next row's
    where the line ends its row, meet line_weights' zeros; with W a multiple of 4 the last line's
    last word is the copy's last, M / 4 - 1, so the copies need no more bytes than x."""
    starts, off = _line_offsets(*x.shape[:3], KH, KW, stride, pool)
    return Words(as_words(shifted_copies(x.reshape(-1))), starts, off)


@functools.lru_cache(maxsize=16)
def _line_offsets(N, H, W, KH, KW, stride, pool):
    """(starts, off) of line_words, kept per shape. Read-only."""
    L, words = -(-KW // ROW_ALIGN), N * H * W // ROW_ALIGN
    Ho, Wo = (H - KH) // stride + 1, (W - KW) // stride + 1
    n, i, j = np.ix_(np.arange(N), np.arange(Ho) * stride, np.arange(Wo) * stride)
    first = (n * H + i) * W + j  # the first line's first byte; W % 4 == 0, so every line's shift is j's
    starts = ((first % ROW_ALIGN) * words + first // ROW_ALIGN).reshape(-1)[pool_order(N, Ho, Wo, pool)]
    starts = starts.astype(np.int64)
    kh, line = np.ix_(np.arange(KH), np.arange(L))
    off = (kh * (W // ROW_ALIGN) + line).reshape(-1).astype(np.int64)
    starts.flags.writeable = off.flags.writeable = False
    return starts, off
