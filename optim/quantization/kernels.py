"""The int8 kernels of the integer model: im2row, int8 GEMM with int32 sums, max-pool.

Jacob et al., CVPR 2018 (integer-only inference); the requantization is
TFLite's fixed point (`fixedpoint`). Activations are int8 in NHWC layout
inside the integer model, so a convolution's receptive field, gathered by
`im2row_nhwc`, is a contiguous row

    rows[(n*Ho + i)*Wo + j, (kh*KW + kw)*C + c] = x[n, i*S + kh - P, j*S + kw - P, c]

(positions in the padding read `fill`, the input's zero point, which stands
for the real value 0), zero-padded to a multiple of ROW_ALIGN = 4 columns.
A layer is then out[r, f] = requantize(rows[r] . wt[f] + bias[f]) (`qgemm`),
or the int32 sums themselves for the last layer (`qgemm_int32`).

The weights are packed once per layer (`pack_weights`) so that one VNNI
instruction (vpdpbusd, see `dot4_add`) adds 4 products to each of 8 filters'
int32 sums: the kernel broadcasts 4 bytes of a row and runs them against 4
blocks of 8 filters, no horizontal sums, no padding of K beyond 4. Rows
are independent, so `prange` splits them over cores; small jobs run a
serial build of the same loops (`minicnn.parallel.twin`), as waking Numba's
workers costs more than they do.

Every fast kernel has a NumPy reference (`*_ref`) with the same contract;
the two agree bit for bit.
"""

from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from minicnn.kernels import conv_output_size
from minicnn.parallel import twin
from minicnn.simd import HAS_VNNI

from .affine import WMAX
from .fixedpoint import INT32_MAX, multiply_by_quantized_multiplier, multiply_by_quantized_multiplier_scalar


# --------------------------------------------------------------------------
# im2row on NHWC int8, padding with the zero point


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


def im2row_nhwc(x, KH, KW, stride, padding, fill, width):
    """Fast im2row_nhwc, same contract as im2row_nhwc_ref; serial for small inputs (batch 1)."""
    N, H, W, _ = x.shape
    rows = N * conv_output_size(H, KH, stride, padding) * conv_output_size(W, KW, stride, padding)
    return _im2row_nhwc(rows * width, np.ascontiguousarray(x), KH, KW, stride, padding, fill, width)


# --------------------------------------------------------------------------
# The 4-byte dot-product instruction
#
# x86's VNNI instruction vpdpbusd adds to each of 8 int32 lanes the dot
# product of 4 unsigned bytes with 4 signed bytes, exactly (no saturation):
# 32 multiply-adds per instruction, 4x float32's FMA. Numba does not emit it
# from loops (LLVM's vectoriser keeps to vpmaddwd, 16 int16 products), so it
# is called explicitly: `dot4_add(acc, x, wp, i)` with acc an `int32x8`
# value (an LLVM vector kept in a register), x four bytes packed in an int32
# and broadcast to the 8 lanes, and wp[i : i + 32] the 8 lanes' 4 weights.
# A CPU without VNNI gets the same arithmetic spelled as widening
# multiplies and adds, which LLVM compiles for whatever it has.
#
# The activations are int8 but vpdpbusd wants unsigned bytes: flipping the
# sign bit maps q to u = q + 128 in [0, 255], and the kernels subtract the
# constant 128 * sum_k w_k (`PackedWeights.colsum`) from each sum.


class Int32x8(types.Type):
    def __init__(self):
        super().__init__(name="int32x8")


int32x8 = Int32x8()
_V8I32, _V32I8 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.IntType(8), 32)


@register_model(Int32x8)
class _Int32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8I32)




@intrinsic
def zeros8(typingctx):
    """An int32x8 of zeros."""
    return int32x8(), lambda context, builder, sig, args: ir.Constant(_V8I32, None)


def _portable_dpbusd(builder, acc, x, w):
    u = builder.zext(builder.bitcast(x, _V32I8), ir.VectorType(ir.IntType(32), 32))
    s = builder.sext(builder.bitcast(w, _V32I8), ir.VectorType(ir.IntType(32), 32))
    products = builder.mul(u, s)
    for j in range(4):
        lanes = ir.Constant(ir.VectorType(ir.IntType(32), 8), [4 * lane + j for lane in range(8)])
        acc = builder.add(acc, builder.shuffle_vector(products, products, lanes))
    return acc


@intrinsic
def dot4_add(typingctx, acc, x, wp, i):
    """acc[l] + sum_j u_j * wp[i + 4 l + j], l < 8, u the 4 bytes of x (uint32) read as unsigned."""

    def codegen(context, builder, sig, args):
        acc, x, wp, i = args
        data = context.make_array(sig.args[2])(context, builder, wp).data
        w = builder.load(builder.bitcast(builder.gep(data, [i]), _V8I32.as_pointer()), align=1)
        xs = builder.insert_element(ir.Constant(_V8I32, None), builder.trunc(x, ir.IntType(32)),
                                    ir.Constant(ir.IntType(32), 0))
        xs = builder.shuffle_vector(xs, xs, ir.Constant(_V8I32, [0] * 8))
        if not HAS_VNNI:
            return _portable_dpbusd(builder, acc, xs, w)
        vpdpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8I32, [_V8I32] * 3), "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(vpdpbusd, [acc, xs, w])

    return int32x8(int32x8, types.uint32, wp, types.intp), codegen


@intrinsic
def store8(typingctx, out, i, acc):
    """out[i : i + 8] = acc (out an int32 array)."""

    def codegen(context, builder, sig, args):
        out, i, acc = args
        data = context.make_array(sig.args[0])(context, builder, out).data
        builder.store(acc, builder.bitcast(builder.gep(data, [i]), _V8I32.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(out, types.intp, int32x8), codegen


# The same three in NumPy: what they mean, and what runs with NUMBA_DISABLE_JIT=1.


def _zeros8_python():
    return np.zeros(8, np.int32)


def _dot4_add_python(acc, x, wp, i):
    u = np.array([(int(x) >> (8 * j)) & 255 for j in range(4)], np.int64)
    return (acc + wp.reshape(-1)[i : i + 32].reshape(8, 4).astype(np.int64) @ u).astype(np.int32)


def _store8_python(out, i, acc):
    out.reshape(-1)[i : i + 8] = acc


if numba.config.DISABLE_JIT:
    zeros8, dot4_add, store8 = _zeros8_python, _dot4_add_python, _store8_python


# --------------------------------------------------------------------------
# Integer matrix products: out[r, f] from the dot of row r of a with row f of wt


class PackedWeights(NamedTuple):
    """The operand of the fast kernels for weights wt int8 (F, K).

    wp int8 (4 ceil(F/32), ceil(K/4), 8, 4), zero-padded: wp[b, g, l, j] =
    wt[8 b + l, 4 g + j], the dot4_add operand of filters 8b .. 8b + 7 and
    columns 4g .. 4g + 3; colsum int32 (F,) = sum_k wt[f, k], for the 128
    the unsigned bytes add: sum_k (a_k + 128) wt[f, k] - 128 colsum[f] = a . wt[f].
    """

    wp: np.ndarray
    colsum: np.ndarray


def pack_weights(wt):
    """PackedWeights of wt int8 (F, K), K <= MAX_K so that the unsigned sums fit in int32.

    F is padded with zero filters to a multiple of 32: the kernels run 4 blocks
    of 8 filters per pass over a row, and a zero block costs less than the
    extra passes a remainder would take."""
    if wt.dtype != np.int8 or wt.ndim != 2:
        raise ValueError(f"weights must be a 2-D int8 array, got {wt.dtype} {wt.shape}")
    F, K_ = wt.shape
    if wt.size and wt.min() < -WMAX:  # -128 would break the bound below (and the fast and reference kernels' agreement)
        raise ValueError(f"weight codes must lie in [-{WMAX}, {WMAX}] (symmetric int8), got {wt.min()}")
    if K_ > MAX_K:
        raise ValueError(f"{K_} products per output could overflow the int32 accumulators (at most {MAX_K})")
    Fb, G = -(-F // 32) * 4, -(-K_ // 4)  # whole passes of 4 blocks: see _row_sums
    padded = np.zeros((Fb * 8, G * 4), dtype=np.int8)
    padded[:F, :K_] = wt
    wp = np.ascontiguousarray(padded.reshape(Fb, 8, G, 4).transpose(0, 2, 1, 3))
    return PackedWeights(wp, wt.astype(np.int32).sum(axis=1, dtype=np.int32))


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

    The row's int8 values a_k, 4 bytes per uint32 word, are the words x32[start + off[g]], g < G:
    a row of im2row's output (off = 0, 1, ..., G - 1), or a conv's window read in place from the
    image (`conv_words`). wp int8, PackedWeights.wp flattened; acc int32, its 32 ceil(F/32)
    values from `at` overwritten. Four filter blocks share each broadcast word (32 filters per pass).
    """
    G = off.size
    flip = np.uint32(0x80808080)
    for b in range(0, wp.size // (32 * G), 4):  # wp: 8 filters x 4 bytes per block and group
        s0, s1, s2, s3 = zeros8(), zeros8(), zeros8(), zeros8()
        for g in range(G):
            x = x32[np.uint64(start + off[g])] ^ flip  # unsigned: no negative-index test in the loop
            i = (b * G + g) * 32
            s0 = dot4_add(s0, x, wp, i)
            s1 = dot4_add(s1, x, wp, i + G * 32)
            s2 = dot4_add(s2, x, wp, i + 2 * G * 32)
            s3 = dot4_add(s3, x, wp, i + 3 * G * 32)
        store8(acc, at + 8 * b, s0)
        store8(acc, at + 8 * b + 8, s1)
        store8(acc, at + 8 * b + 16, s2)
        store8(acc, at + 8 * b + 24, s3)


@numba.njit(inline="always", cache=True)
def _four_rows_sums(x32, starts, r, off, wp, acc):
    """_row_sums of rows r .. r + 3 at once, row i's from acc[i F'], F' = 32 ceil(F/32): each 32-byte
    load of weights serves 4 rows (16 sums in registers), not one."""
    G = off.size
    F32 = wp.size // (4 * G)
    flip = np.uint32(0x80808080)
    t0, t1, t2, t3 = starts[r], starts[r + 1], starts[r + 2], starts[r + 3]
    for b in range(0, wp.size // (32 * G), 4):
        p0, p1, p2, p3 = zeros8(), zeros8(), zeros8(), zeros8()  # row r, blocks b .. b + 3
        q0, q1, q2, q3 = zeros8(), zeros8(), zeros8(), zeros8()  # row r + 1
        u0, u1, u2, u3 = zeros8(), zeros8(), zeros8(), zeros8()  # row r + 2
        v0, v1, v2, v3 = zeros8(), zeros8(), zeros8(), zeros8()  # row r + 3
        for g in range(G):
            o = off[g]
            x0, x1 = x32[np.uint64(t0 + o)] ^ flip, x32[np.uint64(t1 + o)] ^ flip
            x2, x3 = x32[np.uint64(t2 + o)] ^ flip, x32[np.uint64(t3 + o)] ^ flip
            i, j = (b * G + g) * 32, G * 32
            p0, p1, p2, p3 = dot4_add(p0, x0, wp, i), dot4_add(p1, x0, wp, i + j), dot4_add(p2, x0, wp, i + 2 * j), \
                dot4_add(p3, x0, wp, i + 3 * j)
            q0, q1, q2, q3 = dot4_add(q0, x1, wp, i), dot4_add(q1, x1, wp, i + j), dot4_add(q2, x1, wp, i + 2 * j), \
                dot4_add(q3, x1, wp, i + 3 * j)
            u0, u1, u2, u3 = dot4_add(u0, x2, wp, i), dot4_add(u1, x2, wp, i + j), dot4_add(u2, x2, wp, i + 2 * j), \
                dot4_add(u3, x2, wp, i + 3 * j)
            v0, v1, v2, v3 = dot4_add(v0, x3, wp, i), dot4_add(v1, x3, wp, i + j), dot4_add(v2, x3, wp, i + 2 * j), \
                dot4_add(v3, x3, wp, i + 3 * j)
        rows = ((p0, p1, p2, p3), (q0, q1, q2, q3), (u0, u1, u2, u3), (v0, v1, v2, v3))
        for row, (s0, s1, s2, s3) in enumerate(rows):
            at = row * F32 + 8 * b
            store8(acc, at, s0)
            store8(acc, at + 8, s1)
            store8(acc, at + 16, s2)
            store8(acc, at + 24, s3)


ROWS_PER_TASK = 64


@numba.njit(inline="always", cache=True)
def _sums(x32, starts, r0, rows, off, wp, acc, F32):
    """The sums of rows r0 .. r0 + rows - 1 (rows <= 4), row i's from acc[i F32]: 4 at once if 4."""
    if rows == 4:
        _four_rows_sums(x32, starts, r0, off, wp, acc)
    else:
        for i in range(rows):
            _row_sums(x32, starts[r0 + i], off, wp, acc, i * F32)


def _qgemm_loops(x32, starts, off, wp, colsum, bias, m0, shift, z_out, lo, hi, out):
    """out (M, F) int8: the sums requantized; or int32, when m0 is empty: the sums, max(., lo)."""
    M, F = starts.size, bias.shape[0]
    F32 = wp.size // (4 * off.size)
    for task in prange((M + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(4 * F32, dtype=np.int32)
        end = min(M, (task + 1) * ROWS_PER_TASK)
        for r0 in range(task * ROWS_PER_TASK, end, 4):
            rows = min(4, end - r0)
            _sums(x32, starts, r0, rows, off, wp, acc, F32)
            for i in range(rows):
                for f in range(F):
                    dot = acc[i * F32 + f] - 128 * colsum[f] + bias[f]  # int64 arithmetic: exact
                    if m0.size:
                        q = multiply_by_quantized_multiplier_scalar(dot, m0[f], shift[f]) + z_out
                        out[r0 + i, f] = min(max(q, lo), hi)
                    else:
                        out[r0 + i, f] = max(dot, lo)
    return out


MIN_MACS = 2_000_000  # multiply-adds below which waking the workers costs more than they save
_qgemm = twin(_qgemm_loops, MIN_MACS)


class Words(NamedTuple):
    """The operand of qgemm: M rows of G words (4 int8 values each), row r's word g being
    x32[starts[r] + off[g]]. x32 uint32 flat, starts int64 (M,), off int64 (G,)."""

    x32: np.ndarray
    starts: np.ndarray
    off: np.ndarray


def _check_words(words):
    if not isinstance(words, Words):
        raise TypeError(f"qgemm takes Words (optim.quantization.windows), got {type(words).__name__}")
    return words


def qgemm(words, packed, bias, m0, shift, z_out, lo, hi):
    """qgemm_ref(a, wt, bias, m0, shift, z_out, lo, hi) with words = windows.rows_words(a, packed)
    (or a conv's windows read in place, its im2row rows a) and packed = pack_weights(wt), bit for bit."""
    x32, starts, off = _check_words(words)
    work = starts.size * 4 * off.size * len(bias)
    out = np.empty((starts.size, len(bias)), np.int8)
    return _qgemm(work, x32, starts, off, packed.wp.reshape(-1), packed.colsum, bias, m0, shift, z_out, lo, hi, out)


def qgemm_int32(words, packed, bias, lo):
    """qgemm_int32_ref(a, wt, bias, lo), with words and packed as for qgemm, bit for bit."""
    x32, starts, off = _check_words(words)
    work = starts.size * 4 * off.size * len(bias)
    out, none = np.empty((starts.size, len(bias)), np.int32), np.zeros(0, np.int32)  # no multipliers: int32 out
    return _qgemm(work, x32, starts, off, packed.wp.reshape(-1), packed.colsum, bias, none, none.astype(np.int8), 0,
                  lo, INT32_MAX, out)


# --------------------------------------------------------------------------
# Max-pooling in the integer domain: requantization is monotone, so the max
# of the int8 codes is the code of the max.


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
