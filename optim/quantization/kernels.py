"""The int8 kernels of the integer model: int8 GEMM with int32 sums, max-pool.

Jacob et al., CVPR 2018 (integer-only inference); the requantization is
TFLite's fixed point (`fixedpoint`). Activations are int8 codes q in NHWC
layout inside the integer model, which the fast kernels read and write as
the unsigned bytes q + 128 (`unsigned`: the sign bit flipped, the same
order), the operand vpdpbusd takes as it is. A convolution's receptive
field, gathered by `windows.im2row_nhwc`, is a contiguous row

    rows[(n*Ho + i)*Wo + j, (kh*KW + kw)*C + c] = x[n, i*S + kh - P, j*S + kw - P, c]

(positions in the padding read `fill`, the byte of the input's zero point,
which stands for the real value 0), zero-padded to a multiple of ROW_ALIGN = 4 columns.
A layer is then out[r, f] = requantize(rows[r] . wt[f] + bias[f]) (`qgemm`),
or the int32 sums themselves for the last layer, and a conv followed by a
2x2 max-pool takes the maximum of each window's 4 sums before requantizing
(the same codes: requantization never decreases): one requantization in 4.

The weights are packed once per layer (`pack_weights`) so that one VNNI
instruction (vpdpbusd, see `vectors.dot4_add`) adds 4 products to each of 16 filters'
int32 sums: the kernel broadcasts 4 bytes of a row from memory and runs them
against 2 blocks of 16 filters (a layer of at most 16 filters is one block,
run by a kernel of its own), no horizontal sums, no padding of K beyond 4.
(Flipped in the kernel instead, each broadcast took a register and a
shuffle port: LeNet-5's int8 predict at batch 256 ran 1.2x slower.) A layer
of at most 12 filters on whole rows of words (a classifier) would leave 4 or
more of the 16 lanes idle: it runs narrow.py's kernel, whose lanes run along
the rows instead. Rows
are independent, so `prange` splits them over cores; the epilogue
(bias, requantization, clamp, store: `vectors.finish16`) runs on 16 filters
at a time, a pool window's sums maximised and finished while still in
registers; small jobs run a
serial build of the same loops (`minicnn.parallel.twin`), as waking Numba's
workers costs more than they do.

Every fast kernel has a NumPy reference (`*_ref`) with the same contract;
the two agree bit for bit.
"""

from typing import NamedTuple

import numba
import numpy as np
from numba import prange

from minicnn.parallel import twin
from minicnn.simd import HAS_VNNI

from .affine import QMAX, QMIN, WMAX
from .fixedpoint import INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier
from .narrow import narrow_loops, pack_narrow
from .vectors import LANES, add16, dot4_add, finish16, load16, max16, requantization_table, store16, zeros16


# --------------------------------------------------------------------------
# The kernels' bytes, and rows of whole words


ROW_ALIGN = 4  # the kernels read rows 4 bytes (one dot4_add group) at a time


def padded_width(k):
    """k rounded up to a multiple of ROW_ALIGN."""
    return -(-k // ROW_ALIGN) * ROW_ALIGN


def pad_columns(a, width):
    """a (M, K) followed by zero columns up to (M, width)."""
    if a.shape[1] == width:
        return a
    out = np.zeros((a.shape[0], width), dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def unsigned(q):
    """uint8 q + 128 of int8 codes q (any shape): the bytes the fast kernels read and write."""
    return np.bitwise_xor(q.view(np.uint8), np.uint8(0x80))


def signed(u):
    """int8 codes u - 128 of the kernels' bytes u uint8: unsigned's inverse. (int32 sums, a last
    layer's output, are returned as they are.)"""
    return np.bitwise_xor(u, np.uint8(0x80)).view(np.int8) if u.dtype == np.uint8 else u


# --------------------------------------------------------------------------
# Integer matrix products: out[r, f] from the dot of row r of a with row f of wt


class PackedWeights(NamedTuple):
    """The operand of the fast kernels for weights wt int8 (F, K).

    wp int8 (2 ceil(F/32), ceil(K/4), 16, 4) (one block for F <= 16), zero-padded: wp[b, g, l, j] =
    wt[16 b + l, 4 g + j], the dot4_add operand of filters 16b .. 16b + 15 and
    columns 4g .. 4g + 3 (without VNNI, each (b, g)'s 64 bytes in the order (j // 2, l, j % 2):
    the pairs of columns that vpmaddwd adds, see vectors.dot4_add); colsum int32 (F,) = sum_k wt[f, k], for the 128
    the unsigned bytes add: sum_k (a_k + 128) wt[f, k] - 128 colsum[f] = a . wt[f].
    """

    wp: np.ndarray
    colsum: np.ndarray
    vnni: bool = HAS_VNNI  # the layout's CPU: weights pickled on one CPU and used on another are refused
    wd: np.ndarray = np.zeros((0, 0), np.int8)  # narrow.pack_narrow(wt): the narrow kernel's, if narrow


def pack_weights(wt):
    """PackedWeights of wt int8 (F, K), K <= MAX_K so that the unsigned sums fit in int32.

    F is padded with zero filters to a multiple of 32: the kernels run 2 blocks
    of 16 filters per pass over a row, and a zero block costs less than the
    extra passes a remainder would take. At most 16 filters (a classifier's
    10, a narrowed conv's) are one block, which a kernel of its own runs."""
    if wt.dtype != np.int8 or wt.ndim != 2:
        raise ValueError(f"weights must be a 2-D int8 array, got {wt.dtype} {wt.shape}")
    F, K_ = wt.shape
    if wt.size and wt.min() < -WMAX:  # -128 would break the bound below (and the fast and reference kernels' agreement)
        raise ValueError(f"weight codes must lie in [-{WMAX}, {WMAX}] (symmetric int8), got {wt.min()}")
    if K_ > MAX_K:
        raise ValueError(f"{K_} products per output could overflow the int32 accumulators (at most {MAX_K})")
    Fb, G = (1 if F <= LANES else -(-F // 32) * 2), -(-K_ // 4)  # one block, or whole passes of 2
    padded = np.zeros((Fb * LANES, G * 4), dtype=np.int8)
    padded[:F, :K_] = wt
    wp = padded.reshape(Fb, LANES, G, 4).transpose(0, 2, 1, 3)
    if not HAS_VNNI:  # dot4_add's vpmaddwd takes columns 0, 1 of the 16 filters, then 2, 3
        wp = wp.reshape(Fb, G, LANES, 2, 2).transpose(0, 1, 3, 2, 4)
    return PackedWeights(np.ascontiguousarray(wp).reshape(Fb, G, LANES, 4),
                         wt.astype(np.int32).sum(axis=1, dtype=np.int32), HAS_VNNI, pack_narrow(wt))


MAX_K = INT32_MAX // (255 * WMAX)  # |sum_k u_k w_k| <= K 255 WMAX, u_k the unsigned activations


def qgemm_ref(a, wt, bias, m0, shift, z_out, lo, hi):
    """int8 (M, F): clamp(MBQM(a @ wt.T + bias, m0, shift) + z_out, lo, hi).

    a int8 (M, K), wt int8 (F, K), bias int32 (F,) (zero-point terms already
    folded in), m0 int32 and shift int8 (F,) per output channel, z_out the output
    zero point, [lo, hi] the clamp (lo = z_out fuses a ReLU). Precondition,
    checked when a layer is built: the accumulators fit in int32.
    """
    acc = a.astype(np.int64) @ wt.astype(np.int64).T + bias  # exact: no BLAS for int64
    q = multiply_by_quantized_multiplier(acc, m0, shift) + z_out
    return np.clip(q, lo, hi).astype(np.int8)


def qgemm_int32_ref(a, wt, bias, lo):
    """int32 (M, F): max(a @ wt.T + bias, lo): the accumulators of the last layer."""
    acc = a.astype(np.int64) @ wt.astype(np.int64).T + bias
    return np.clip(acc, lo, INT32_MAX).astype(np.int32)


@numba.njit(inline="always", cache=True)
def _row_sums(x32, start, off, wp, acc, at):
    """acc[at + f] = sum_k (a_k + 128) wt[f, k] for all 32 ceil(F/32) filters, padding included.

    The row's codes a_k, as the bytes a_k + 128 (`unsigned`), 4 per uint32 word, are the words
    x32[start + off[g]], g < G: a row of im2row's output (off = 0, 1, ..., G - 1), or a conv's
    window read in place from the image (`conv_words`). wp int8, PackedWeights.wp flattened; acc
    int32, its 32 ceil(F/32) values from `at` overwritten. Two filter blocks share each broadcast
    word (32 filters per pass).
    """
    G = off.size
    for b in range(0, wp.size // (64 * G), 2):  # wp: 16 filters x 4 bytes per block and group
        s0, s1 = zeros16(), zeros16()
        for g in range(G):
            x = x32[np.uint64(start + off[g])]  # unsigned index: no negative-index test in the loop
            i = (b * G + g) * 64
            s0 = dot4_add(s0, x, wp, i)
            s1 = dot4_add(s1, x, wp, i + G * 64)
        store16(acc, at + 16 * b, s0)
        store16(acc, at + 16 * b + 16, s1)


@numba.njit(inline="always", cache=True)
def _eight_rows_pass(x32, starts, r, s, off, wp, b):
    """The sums of blocks b and b + 1 (32 filters) for the eight rows r .. r + 3 and s .. s + 3, as
    _row_sums makes them: 16 vectors (row by row, block by block), each 64-byte load of weights serving
    8 rows, not one. (With 4 rows a pass, the seed CNN's conv at batch 256 took 1.09x as long. AVX2's 16
    registers cannot hold the 16 sums, which spill, yet its int8 predict gained too: 1.04x-1.09x.)"""
    G = off.size
    t0, t1, t2, t3, t4, t5, t6, t7 = (starts[r], starts[r + 1], starts[r + 2], starts[r + 3],
                                      starts[s], starts[s + 1], starts[s + 2], starts[s + 3])
    p0, p1, q0, q1, u0, u1, v0, v1 = zeros16(), zeros16(), zeros16(), zeros16(), zeros16(), zeros16(), \
        zeros16(), zeros16()  # rows r .. r + 3, blocks b and b + 1
    P0, P1, Q0, Q1, U0, U1, V0, V1 = zeros16(), zeros16(), zeros16(), zeros16(), zeros16(), zeros16(), \
        zeros16(), zeros16()  # rows s .. s + 3
    for g in range(G):
        o, i, j = off[g], (b * G + g) * 64, (b * G + g + G) * 64
        x0, x1, x2, x3 = x32[np.uint64(t0 + o)], x32[np.uint64(t1 + o)], x32[np.uint64(t2 + o)], x32[np.uint64(t3 + o)]
        p0, p1, q0, q1 = dot4_add(p0, x0, wp, i), dot4_add(p1, x0, wp, j), dot4_add(q0, x1, wp, i), \
            dot4_add(q1, x1, wp, j)
        u0, u1, v0, v1 = dot4_add(u0, x2, wp, i), dot4_add(u1, x2, wp, j), dot4_add(v0, x3, wp, i), \
            dot4_add(v1, x3, wp, j)
        x0, x1, x2, x3 = x32[np.uint64(t4 + o)], x32[np.uint64(t5 + o)], x32[np.uint64(t6 + o)], x32[np.uint64(t7 + o)]
        P0, P1, Q0, Q1 = dot4_add(P0, x0, wp, i), dot4_add(P1, x0, wp, j), dot4_add(Q0, x1, wp, i), \
            dot4_add(Q1, x1, wp, j)
        U0, U1, V0, V1 = dot4_add(U0, x2, wp, i), dot4_add(U1, x2, wp, j), dot4_add(V0, x3, wp, i), \
            dot4_add(V1, x3, wp, j)
    return p0, p1, q0, q1, u0, u1, v0, v1, P0, P1, Q0, Q1, U0, U1, V0, V1


@numba.njit(inline="always", cache=True)
def _eight_rows_sums(x32, starts, r, off, wp, acc):
    """_row_sums of rows r .. r + 7 at once, row i's from acc[i F'], F' = 32 ceil(F/32)."""
    F32 = wp.size // (4 * off.size)
    for b in range(0, wp.size // (64 * off.size), 2):
        sums = _eight_rows_pass(x32, starts, r, r + 4, off, wp, b)
        for row in range(8):
            store16(acc, row * F32 + 16 * b, sums[2 * row])
            store16(acc, row * F32 + 16 * b + 16, sums[2 * row + 1])


@numba.njit(inline="always", cache=True)
def _pooled_windows(x32, starts, r, s, off, wp, bias, table, z_out, lo, hi, o, F, both):
    """The outputs of the 2x2 pool windows whose 4 pixels are rows r .. r + 3 and s .. s + 3, stored
    at o[r // 4 F] and, if both, o[s // 4 F]: per 32 filters, the maximum of each window's sums taken
    in registers, then the epilogue (vectors.finish16; filters f >= F not stored). (Stored in acc and
    read back by _finish, the sums took a third of the seed CNN's conv at batch 256.)"""
    for b in range(0, wp.size // (64 * off.size), 2):
        p0, p1, q0, q1, u0, u1, v0, v1, P0, P1, Q0, Q1, U0, U1, V0, V1 = _eight_rows_pass(x32, starts, r, s, off,
                                                                                           wp, b)
        f = 16 * b
        at, n0, n1 = r // 4 * F + f, min(LANES, F - f), min(LANES, F - f - 16)
        finish16(o, at, max16(max16(p0, q0), max16(u0, v0)), bias, table, f, z_out, lo, hi, n0)
        finish16(o, at + 16, max16(max16(p1, q1), max16(u1, v1)), bias, table, f + 16, z_out, lo, hi, n1)
        if both:
            at = s // 4 * F + f
            finish16(o, at, max16(max16(P0, Q0), max16(U0, V0)), bias, table, f, z_out, lo, hi, n0)
            finish16(o, at + 16, max16(max16(P1, Q1), max16(U1, V1)), bias, table, f + 16, z_out, lo, hi, n1)


ROWS_PER_TASK = 64


class Epilogue(NamedTuple):
    """What qgemm does with each output's sum s (exact, int32), per filter f < F, the arrays padded to
    the packed weights' filters (16 for F <= 16, else 32 ceil(F/32)):

        unsigned codes   clamp(MBQM(s + bias[f], m0[f], shift[f]) + z_out, lo, hi), uint8
        int32            max(s + bias[f], lo)                           (table empty)

    bias int32 is the layer's less 128 colsum (the unsigned bytes' offset, PackedWeights), table int64
    the multipliers m0, shifts and that bias as the lanes take them (vectors.requantization_table);
    z_out, lo and hi, for codes, those of the int8 codes plus 128 (`unsigned`). Built once per layer
    by `int8_epilogue` or `int32_epilogue`."""

    bias: np.ndarray
    table: np.ndarray
    z_out: int
    lo: int
    hi: int
    F: int


def _padded(packed, values, dtype):
    out = np.zeros(packed.wp.shape[0] * LANES, dtype)
    out[: len(values)] = values
    return out


def int32_epilogue(packed, bias, lo):
    """The Epilogue of qgemm_int32_ref(., wt, bias, lo), packed = pack_weights(wt)."""
    unsigned = np.asarray(bias, np.int64) - 128 * packed.colsum.astype(np.int64)
    if np.abs(unsigned).max(initial=0) > INT32_MAX:
        raise ValueError("bias - 128 sum_k w_k must fit in int32 (the layer's accumulators could overflow)")
    return Epilogue(_padded(packed, unsigned, np.int32), np.zeros(0, np.int64), 0, int(lo), INT32_MAX, len(bias))


def int8_epilogue(packed, bias, m0, shift, z_out, lo, hi):
    """The Epilogue of qgemm_ref(., wt, bias, m0, shift, z_out, lo, hi), packed = pack_weights(wt), its
    codes written unsigned."""
    if not len(m0) == len(shift) == len(bias):
        raise ValueError(f"one multiplier and shift per filter: got {len(m0)} and {len(shift)} for {len(bias)}")
    if not QMIN <= min(z_out, lo, hi) <= max(z_out, lo, hi) <= QMAX:  # int8 codes, whose bytes finish16 writes
        raise ValueError(f"the output zero point and clamp must be int8 codes, got {z_out}, [{lo}, {hi}]")
    plain = int32_epilogue(packed, bias, INT32_MIN)  # its bias: the unsigned bytes' one
    table = requantization_table(_padded(packed, m0, np.int64), _padded(packed, shift, np.int64), plain.bias)  # checks
    return plain._replace(table=table, z_out=int(z_out) + 128, lo=int(lo) + 128, hi=int(hi) + 128)


@numba.njit(inline="always", cache=True)
def _finish(acc, rows, F32, bias, table, z_out, lo, hi, o, at, F):
    """The outputs of `rows` rows' sums acc[i F32 + f], F values each, stored in the flat o from
    o[at] on, 16 filters at a time (vectors.finish16)."""
    for row in range(rows):
        for f in range(0, F, LANES):
            finish16(o, at + row * F + f, load16(acc, row * F32 + f), bias, table, f, z_out, lo, hi,
                     min(LANES, F - f))


def _qgemm_loops(x32, starts, window, off, wp, bias, table, z_out, lo, hi, out):
    """out (M, F), M = starts.size // window: output m's sums are the maximum of rows m window ..
    (m + 1) window - 1 (window 1, or 4: a 2x2 max-pool's pixels), requantized to unsigned codes, or
    int32 when table is empty. Rows run 8 at a time (two windows of 4 are one pass, finished in
    registers; a task's odd last window is computed as both windows of its pass, stored once), the last
    few one by one: one loop calling both tiles through a test runs at half speed in the serial build."""
    F, F32 = out.shape[1], bias.size
    o = out.reshape(-1)
    rows_end = starts.size // window * window
    for task in prange((rows_end + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        start, end = task * ROWS_PER_TASK, min(rows_end, (task + 1) * ROWS_PER_TASK)
        if window == 4:
            for r0 in range(start, end, 8):
                both = r0 + 8 <= end
                _pooled_windows(x32, starts, r0, r0 + 4 if both else r0, off, wp, bias, table, z_out, lo, hi,
                                o, F, both)
            continue
        acc = np.empty(8 * F32, dtype=np.int32)
        eights = start + (end - start) // 8 * 8
        for r0 in range(start, eights, 8):
            _eight_rows_sums(x32, starts, r0, off, wp, acc)
            _finish(acc, 8, F32, bias, table, z_out, lo, hi, o, r0 * F, F)
        for r in range(eights, end):  # window 1 here
            _row_sums(x32, starts[r], off, wp, acc, 0)
            _finish(acc, 1, F32, bias, table, z_out, lo, hi, o, r * F, F)
    return out


@numba.njit(inline="always", cache=True)
def _four_rows_block(x32, t0, t1, t2, t3, off, wp):
    """The sums of a single block of 16 filters for the four rows whose words start at t0 .. t3."""
    p, q, u, v = zeros16(), zeros16(), zeros16(), zeros16()
    for g in range(off.size):
        o, i = off[g], g * 64
        p, q = dot4_add(p, x32[np.uint64(t0 + o)], wp, i), dot4_add(q, x32[np.uint64(t1 + o)], wp, i)
        u, v = dot4_add(u, x32[np.uint64(t2 + o)], wp, i), dot4_add(v, x32[np.uint64(t3 + o)], wp, i)
    return p, q, u, v


def _qgemm_block_loops(x32, starts, window, off, wp, bias, table, z_out, lo, hi, out):
    """_qgemm_loops for at most 16 filters, packed as one block: four rows (or one pool window) a pass,
    the last few rows alone. A kernel of its own: the pair loops with a test for a lone block ran the
    AVX2 build's GEMM 1.5x slower (session 13)."""
    F = out.shape[1]
    o = out.reshape(-1)
    rows_end = starts.size // window * window
    for task in prange((rows_end + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        start, end = task * ROWS_PER_TASK, min(rows_end, (task + 1) * ROWS_PER_TASK)
        if window == 4:
            for r0 in range(start, end, 4):
                p, q, u, v = _four_rows_block(x32, starts[r0], starts[r0 + 1], starts[r0 + 2], starts[r0 + 3], off, wp)
                finish16(o, r0 // 4 * F, max16(max16(p, q), max16(u, v)), bias, table, 0, z_out, lo, hi, F)
            continue
        fours = start + (end - start) // 4 * 4
        for r0 in range(start, fours, 4):
            p, q, u, v = _four_rows_block(x32, starts[r0], starts[r0 + 1], starts[r0 + 2], starts[r0 + 3], off, wp)
            finish16(o, r0 * F, p, bias, table, 0, z_out, lo, hi, F)
            finish16(o, (r0 + 1) * F, q, bias, table, 0, z_out, lo, hi, F)
            finish16(o, (r0 + 2) * F, u, bias, table, 0, z_out, lo, hi, F)
            finish16(o, (r0 + 3) * F, v, bias, table, 0, z_out, lo, hi, F)
        for r in range(fours, end):  # window 1 here; two sums, so that one vpdpbusd need not wait for the last
            p, q, t = zeros16(), zeros16(), starts[r]
            for g in range(0, off.size - 1, 2):
                p = dot4_add(p, x32[np.uint64(t + off[g])], wp, g * 64)
                q = dot4_add(q, x32[np.uint64(t + off[g + 1])], wp, g * 64 + 64)
            if off.size % 2:
                p = dot4_add(p, x32[np.uint64(t + off[off.size - 1])], wp, off.size * 64 - 64)
            finish16(o, r * F, add16(p, q), bias, table, 0, z_out, lo, hi, F)
    return out


MIN_MACS = 2_000_000  # multiply-adds below which waking the workers costs more than they save
_qgemm = twin(_qgemm_loops, MIN_MACS)
_qgemm_block = twin(_qgemm_block_loops, MIN_MACS)
_qgemm_narrow = twin(narrow_loops, MIN_MACS)
_qgemm_pairs_serial, _qgemm_block_serial, _qgemm_narrow_serial = _qgemm.serial, _qgemm_block.serial, \
    _qgemm_narrow.serial


def uses_narrow(packed, off, window):
    """Whether qgemm runs narrow.py's kernel: weights packed narrow, rows of whole runs of words (off
    0, 1, ..., G - 1: a dense layer's, or im2row's), no pool window."""
    return window == 1 and packed.wd.size > 0 and np.array_equal(off, np.arange(off.size))


@numba.njit(inline="always", cache=True)
def one_block(wp, off):
    """Whether weights wp (PackedWeights.wp flattened) of off.size words a row are one block of 16 filters."""
    return wp.size == 64 * off.size


@numba.njit(cache=True)
def qgemm_serial(x32, starts, window, off, wp, wd, bias, table, z_out, lo, hi, out):
    """The serial GEMM of qgemm_runner's run, for compiled callers (chain.py): the narrow build where wd
    (flattened PackedWeights.wd) is not empty (uses_narrow), the one-block build for at most 16
    filters, else the pairs'."""
    if wd.size:
        return _qgemm_narrow_serial(x32, starts, off.size, ROWS_PER_TASK, wd, wp, bias, table, z_out, lo, hi, out)
    if one_block(wp, off):
        return _qgemm_block_serial(x32, starts, window, off, wp, bias, table, z_out, lo, hi, out)
    return _qgemm_pairs_serial(x32, starts, window, off, wp, bias, table, z_out, lo, hi, out)


class Words(NamedTuple):
    """The operand of qgemm: M rows of G words (4 bytes each, `unsigned` codes), row r's word g being
    x32[starts[r] + off[g]]. x32 uint32 flat, starts int64 (M,), off int64 (G,)."""

    x32: np.ndarray
    starts: np.ndarray
    off: np.ndarray


def qgemm(words, packed, epilogue, window=1):
    """unsigned(qgemm_ref(a, wt, bias, m0, shift, z_out, lo, hi)), or qgemm_int32_ref(a, wt, bias, lo),
    bit for bit, with words = windows.rows_words(unsigned(a), packed) (or a conv's windows read in
    place, its im2row rows a), packed = pack_weights(wt) and epilogue = int8_epilogue(packed, bias,
    m0, ...) (or int32_epilogue).

    window = 4: of each 4 consecutive rows, their maximum: one output (M // 4, F) per 2x2 max-pool
    window, when the words' rows run pool window by pool window (windows.py)."""
    if not isinstance(words, Words):
        raise TypeError(f"qgemm takes Words (optim.quantization.windows), got {type(words).__name__}")
    return qgemm_runner(words.starts, words.off, packed, epilogue, window)(words.x32)


def qgemm_runner(starts, off, packed, epilogue, window=1):
    """run(x32) = qgemm(Words(x32, starts, off), packed, epilogue, window), all but the words bound
    once: at batch 1 an unbound call's checks and sizes cost about a tenth of a conv."""
    if window not in (1, 4):
        raise ValueError(f"qgemm pools windows of 1 or 4 rows, got {window}")
    if packed.vnni != HAS_VNNI:
        raise ValueError(f"weights packed for a CPU {'with' if packed.vnni else 'without'} VNNI, run on one "
                         f"{'with' if HAS_VNNI else 'without'}: pack them again (pack_weights)")
    if starts.size % window or off.size != packed.wp.shape[1] or epilogue.bias.size != LANES * packed.wp.shape[0]:
        raise ValueError(f"qgemm: {starts.size} rows of {off.size} words for windows of {window}, against weights "
                         f"of {packed.wp.shape[1]} words and an epilogue of {epilogue.bias.size} filters for "
                         f"{LANES * packed.wp.shape[0]}")
    shape, dtype = (starts.size // window, epilogue.F), (np.uint8 if epilogue.table.size else np.int32)
    wp, fixed = packed.wp.reshape(-1), tuple(epilogue[:5])
    work = qgemm_work(starts, off, epilogue.F)
    if uses_narrow(packed, off, window):
        wd = packed.wd.reshape(-1)
        return lambda x32: _qgemm_narrow(work, x32, starts, off.size, ROWS_PER_TASK, wd, wp, *fixed,
                                         np.empty(shape, dtype))
    kernel = _qgemm_block if one_block(wp, off) else _qgemm
    return lambda x32: kernel(work, x32, starts, window, off, wp, *fixed, np.empty(shape, dtype))


def qgemm_work(starts, off, F):
    """The work of a qgemm of those rows and words for F filters, in minicnn.parallel's unit for it
    (multiply-adds; its break-even MIN_MACS)."""
    return starts.size * ROW_ALIGN * off.size * F


# --------------------------------------------------------------------------
# Max-pooling in the integer domain: requantization is monotone, so the max
# of the int8 codes is the code of the max (and of their unsigned bytes, the byte of the max).


def maxpool_nhwc_ref(x, k, stride):
    """(N, Ho, Wo, C) maxima of k x k windows of x (N, H, W, C), any dtype."""
    windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))
    return windows[:, ::stride, ::stride].max(axis=(-2, -1))


def _maxpool_nhwc_loops(x, k, stride):
    N, H, W, C = x.shape
    Ho = (H - k) // stride + 1
    Wo = (W - k) // stride + 1
    out = np.empty((N, Ho, Wo, C), dtype=x.dtype)
    xf, of = x.reshape(-1), out.reshape(-1)
    for t in prange(N * Ho):
        n, i = t // Ho, t % Ho
        for j in range(Wo):
            at, first = (t * Wo + j) * C, ((n * H + i * stride) * W + j * stride) * C
            for c in range(C):  # unsigned indices (no negative-index test): the channel loops vectorise
                of[np.uint64(at + c)] = xf[np.uint64(first + c)]
            for dh in range(k):
                for dw in range(k):
                    src = first + (dh * W + dw) * C
                    for c in range(C):
                        of[np.uint64(at + c)] = max(of[np.uint64(at + c)], xf[np.uint64(src + c)])
    return out


_maxpool_nhwc = twin(_maxpool_nhwc_loops)


def maxpool_nhwc(x, k, stride):
    """Fast maxpool_nhwc, same contract as maxpool_nhwc_ref; serial for small inputs (batch 1)."""
    return _maxpool_nhwc(x.size, np.ascontiguousarray(x), k, stride)
