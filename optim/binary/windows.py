"""A binary-input conv's operand: its input's window lines, their signs packed, and beta.

XNOR-Net (Rastegari et al., ECCV 2016) computes a binary conv's output at a
window as beta * alpha_f * (n - 2 popcount(a XOR w_f)), with a the window's
signs, beta the window's mean |x| and w_f filter f's signs (xnor.py). Here
the input x (N, Hp, Wp, C), padded, channels last, is packed once, line by
line: the KW pixels of a window's row are KW C values next to each other,
packed into L = ceil(KW C / 32) uint32 words (`window_signs`, which also
makes beta). A window is then KH lines' words, read in place (`window_rows`):
no row of signs is ever gathered. LeNet-5's conv2 (C = 20, 5 x 5) has lines
of 100 bits, in 4 words.

Tails. A line's last word holds t = KW C - 32 (L - 1) bits: 4 of conv2's 32.
Where KH lines' last words fit in one word together (KH t <= 32, KH >= 2:
`tail_bits`), each line's slot in `lines` has a word more, its tail word: the
last words of the KH lines from it down (those that exist) side by side, line
kh's at bits t kh .. t kh + t - 1. A window reads the first L - 1 words of
each of its lines and its first line's tail word, and the filters are packed
the same way (`window_filters`). The lines' bits never meet and padding bits are 0 on both
sides, so the popcount is the same: conv2's windows are 16 words, not 20
(500 bits in 512, not 640).

Each kernel comes with its NumPy reference (`*_ref`); tests/test_binary.py
checks they agree, and the XNOR products of window_rows against
window_filters against the +-1 dot products.
"""

import numba
import numpy as np
from numba import prange

from minicnn import simd
from minicnn.parallel import twin

from . import lanes
from .xnor import MIN_STEPS, Rows, check_alpha, check_blocked, run_xnor_layer

__all__ = ["conv_runner", "line_slot", "sign_words", "signs_work", "tail_bits", "window_filters", "window_rows",
           "window_signs", "window_signs_ref", "window_signs_serial"]


def sign_words(v):
    """v (..., n) float -> (..., ceil(n / 32)) uint32: bit t % 32 of word t // 32 is v[..., t] >= 0,
    padding bits 0: a window's signs, or a filter's."""
    S = -(-v.shape[-1] // 32)
    bits = np.zeros((*v.shape[:-1], 32 * S), np.uint8)
    bits[..., : v.shape[-1]] = v >= 0
    return np.packbits(bits, axis=-1, bitorder="little").view("<u4").astype(np.uint32)


@numba.njit(cache=True)
def tail_bits(KH, KW, C):
    """t, the bits of a line's last word, where KH >= 2 lines' last words fit one word (module
    docstring), else 0."""
    t = KW * C - 32 * ((KW * C + 31) // 32 - 1)
    return t if KH >= 2 and KH * t <= 32 else 0


@numba.njit(cache=True)
def line_slot(KH, KW, C):
    """The words of a line's slot in window_signs' lines: its L words, and the tail word if any."""
    return (KW * C + 31) // 32 + (tail_bits(KH, KW, C) > 0)


def _lines_of(x, KW, stride):
    """x (N, Hp, Wp, C) -> (N, Hp, Wo, KW C): the window lines, line (n, h, j) being the KW pixels
    from (h, j stride) on, channels last: KW C values next to each other in x (a view)."""
    lines = np.lib.stride_tricks.sliding_window_view(x, KW, axis=2)[:, :, ::stride]  # (N, Hp, Wo, C, KW)
    return lines.transpose(0, 1, 2, 4, 3).reshape(*lines.shape[:3], -1)


def window_signs_ref(x, KH, KW, stride):
    """What a binary-input conv needs of its input x (N, Hp, Wp, C) float32, padded, channels last:

        lines (N, Hp, Wo, S) uint32   sign_words of each window line (L words), S = line_slot; with
                                      tails (S = L + 1), word L of line (n, h, j) its tail word: the
                                      last words of lines (n, h + kh, j), h + kh < Hp, at bits t kh
        beta  (N Ho Wo,) float32      each KH x KW window's mean |x|

    A window is KH lines, rows i stride .. i stride + KH - 1 at column j (window_rows)."""
    lines = _lines_of(x, KW, stride)
    windows = np.lib.stride_tricks.sliding_window_view(lines, KH, axis=1)[:, ::stride]  # (N, Ho, Wo, KW C, KH)
    beta = np.abs(windows).mean(axis=(-2, -1), dtype=np.float64).astype(np.float32)
    words, t = sign_words(lines), tail_bits(KH, KW, x.shape[3])
    if t:
        Hp, last = x.shape[1], words[..., -1]
        tails = np.zeros(words.shape[:3], np.uint32)
        for kh in range(KH):
            tails[:, : Hp - kh] |= last[:, kh:] << np.uint32(t * kh)
        words = np.concatenate([words, tails[..., None]], axis=3)
    return words, beta.reshape(-1)


def _window_signs_loops(x, KH, KW, stride, lines, sums, beta):
    N, Hp, Wp, C = x.shape
    _, _, Wo, S = lines.shape
    for image in prange(N):
        _signs_of(x.reshape(-1), Hp, Wp, C, KH, KW, stride, lines.reshape(-1), Wo, S, sums, beta, image)


# A function of its own, not inlined: inlined into the threaded build's loop it compiled 1.36x slower
# than in the serial one (0.97 against 0.71 us an image on one thread), and two threads ran LeNet-5's
# conv2 signs at batch 256 1.23x faster than one, not 1.8x.
@numba.njit(cache=True, _nrt=False)
def _signs_of(x, Hp, Wp, C, KH, KW, stride, lines, Wo, S, sums, beta, image):
    """window_signs of one image, into lines of slots of S words. Each line's KW C values are next to
    each other in x: 16 a compare (lanes.sign_bits), two compares a word, and the sum of their |x| on
    the way. Then the lines' tail words, if any, and beta, the windows' sums of KH lines' sums, 16
    windows along a row at a time. (Every row's lines are packed, those no window reads included,
    with stride > KH: no zoo network has one.)"""
    run, Ho, L, t = KW * C, (Hp - KH) // stride + 1, (KW * C + 31) // 32, tail_bits(KH, KW, C)
    m0, m1 = min(16, run - 32 * (L - 1)), max(0, run - 32 * (L - 1) - 16)  # the last word's lanes in use
    for row in range(image * Hp, (image + 1) * Hp):
        at = row * Wp * C  # line (row, j) starts at pixel (row, j stride)
        for line in range(row * Wo, (row + 1) * Wo):
            total = simd.splat(0)
            for k in range(L - 1):  # whole words: the constant 16 makes the loads plain ones
                lines[line * S + k], magnitudes = _line_word(x, at + 32 * k, 16, 16)
                total = simd.add(total, magnitudes)
            lines[line * S + L - 1], magnitudes = _line_word(x, at + 32 * (L - 1), m0, m1)
            sums[line] = simd.total(simd.add(total, magnitudes))
            at += stride * C
    if t:
        _tails(lines, image * Hp * Wo, Hp, Wo, S, L, KH, t)
    scale = simd.splat(np.float32(1) / np.float32(KH * KW * C))
    for i in range(Ho):
        for j in range(0, Wo, simd.LANES):
            m, total = min(simd.LANES, Wo - j), simd.splat(0)
            for kh in range(KH):
                total = simd.add(total, simd.load_first(sums, (image * Hp + i * stride + kh) * Wo + j, m))
            simd.store_first(beta, (image * Ho + i) * Wo + j, simd.mul(total, scale), m)


@numba.njit(cache=True, _nrt=False)
def _tails(lines, first, Hp, Wo, S, L, KH, t):
    """The tail words of an image's Hp x Wo lines, from line `first` on (slots of S words), up each
    column from the bottom row: tail(h) = (tail(h + 1) << t | last word of line h), cut to KH t
    bits. One shift, or and and a line, where each window's KH lines' took KH loads and shifts (a
    fifth of the signs' time, in a loop whose variables lived on the stack)."""
    mask = np.uint32(0xFFFFFFFF) >> np.uint32(32 - KH * t)
    for j in range(first, first + Wo):
        tail = np.uint32(0)
        for line in range(j + (Hp - 1) * Wo, j - 1, -Wo):
            tail = ((tail << np.uint32(t)) | lines[np.uint64(line * S + L - 1)]) & mask
            lines[np.uint64(line * S + L)] = tail


@numba.njit(inline="always", cache=True)
def _line_word(x, at, m0, m1):
    """(word, |x|): the signs of x[at : at + m0] and x[at + 16 : at + 16 + m1] as bits 0.. and 16.. of
    one uint32, and those values' magnitudes in 16 float32 lanes (m0, m1 <= 16)."""
    v0, v1 = simd.load_first(x, at, m0), simd.load_first(x, at + 16, m1)
    word = lanes.sign_bits(v0, m0) | (lanes.sign_bits(v1, m1) << np.uint32(16))
    return word, simd.add(simd.absolute(v0), simd.absolute(v1))


_window_signs = twin(_window_signs_loops, MIN_STEPS, _nrt=False)  # no reference counts: see xnor.py
window_signs_serial = _window_signs.serial  # for compiled callers (chain.py)


def window_signs(x, KH, KW, stride):
    """Fast window_signs_ref (beta's sums in another order: equal to float32 rounding), each image
    in one pass: returns (lines, beta)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    lines, sums, beta = signs_work(x.shape, KH, KW, stride)
    _window_signs(x.size, x, KH, KW, stride, lines, sums, beta)
    return lines, beta


def signs_work(shape, KH, KW, stride):
    """(lines, sums, beta): window_signs' arrays for inputs of shape (N, Hp, Wp, C)."""
    N, Hp, Wp, C = shape
    Ho, Wo = (Hp - KH) // stride + 1, (Wp - KW) // stride + 1
    return (np.empty((N, Hp, Wo, line_slot(KH, KW, C)), np.uint32), np.empty(N * Hp * Wo, np.float32),
            np.empty(N * Ho * Wo, np.float32))


def window_rows(lines, KH, KW, C, stride):
    """xnor.Rows of the KH x KW windows (stride) read in place from window_signs' lines (N, Hp, Wo, S) of
    an input of C channels: row (n, i, j) is the words of lines (n, i stride + kh, j), kh = 0 .. KH - 1,
    or with tails (tail_bits, S = L + 1), their first L - 1 words and the tail word of line (n, i
    stride, j). window_filters packs the weights so."""
    N, Hp, Wo, S = lines.shape
    if S != line_slot(KH, KW, C):
        raise ValueError(f"lines of {S} words a slot for {KH} x {KW} windows of {C} channels, which take "
                         f"{line_slot(KH, KW, C)}")
    tails = tail_bits(KH, KW, C) > 0
    Ho, L = (Hp - KH) // stride + 1, S - 1 if tails else S
    windows = (np.arange(N)[:, None, None] * Hp + np.arange(Ho)[:, None] * stride) * Wo + np.arange(Wo)
    off = (np.arange(KH)[:, None] * Wo * S + np.arange(L - 1 if tails else L)).reshape(-1)
    return Rows(lines.reshape(-1), windows.reshape(-1) * S, np.append(off, L) if tails else off)


def window_filters(signs):
    """(F, K) uint32: the signs (F, KH, KW, C) of F filters packed line by line as window_signs packs
    an image, in window_rows' order: L = ceil(KW C / 32) words a line, K = KH L, or with tails
    (tail_bits) the first L - 1 words of each line, then the lines' last words in one."""
    F, KH, KW, C = signs.shape
    words, t = sign_words(signs.reshape(F, KH, -1)), tail_bits(KH, KW, C)
    if not t:
        return words.reshape(F, -1)
    tail = np.zeros(F, np.uint32)
    for kh in range(KH):
        tail |= words[:, kh, -1] << np.uint32(t * kh)
    return np.concatenate([words[:, :, :-1].reshape(F, -1), tail[:, None]], axis=1)


def conv_runner(padded_shape, K, stride, wb, n, alpha, b, relu, pool):
    """run(xp, out) = xnor.xnor_layer(window_rows(lines, K, K, C, stride), wb, n, beta, alpha, b, grid, relu,
    pool, out) for xp (N, Hp, Wp, C) float32 of padded_shape, channels last, with (lines, beta) =
    window_signs(xp, K, K, stride): a binary-input conv layer (a dense one: K = 1 on (N, 1, 1, C)).
    Checks, sizes and work arrays are bound here, once (at batch 1 they cost as much as the kernels),
    and each call checks only the two shapes: xp and out float32 and contiguous, as minicnn.inference's
    stages hand them. Not re-entrant: the work arrays are the runner's."""
    N, Hp, Wp, C = padded_shape
    work = signs_work(padded_shape, K, K, stride)
    lines, _, beta = work
    Ho, Wo = (Hp - K) // stride + 1, lines.shape[2]
    rows = window_rows(lines, K, K, C, stride)
    check_blocked(wb, alpha.size, rows.off.size)
    if alpha.ndim != 1 or b.shape != alpha.shape:
        raise ValueError(f"one alpha and one bias per filter, got {alpha.shape} and {b.shape}")
    check_alpha(alpha)
    size, words_x_filters = N * Hp * Wp * C, rows.starts.size * rows.off.size * alpha.size
    out_shape = (N, Ho // 2, Wo // 2, alpha.size) if pool else (N, Ho, Wo, alpha.size)

    def run(xp, out):
        if xp.shape != padded_shape or out.shape != out_shape:  # the kernels index by the bound shapes
            raise ValueError(f"a runner for inputs {padded_shape} into {out_shape} got {xp.shape} into {out.shape}")
        _window_signs(size, xp, K, K, stride, *work)
        run_xnor_layer(words_x_filters, *rows, wb, n, beta, alpha, b, Ho, Wo, relu, pool, out)
        return out

    return run
