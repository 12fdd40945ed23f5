"""Integer arithmetic of int8 inference: TFLite's fixed-point requantization and
the Numba kernels of the integer convolution, dense layer and max-pool.

Requantization (Jacob et al., CVPR 2018, section 2.2; gemmlowp / TFLite).
An int32 accumulator `acc` must be scaled by a real multiplier M (in
practice 0 < M < 1) without floating point. M is stored as M = M0 * 2^(shift - 31)
with M0 an int32 in [2^30, 2^31) (`quantize_multiplier`), and

    MultiplyByQuantizedMultiplier(x, M0, shift)
        = RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^max(shift, 0), M0),
                              max(-shift, 0))

    SaturatingRoundingDoublingHighMul(a, b) = (a*b + nudge) / 2^31, C division
        (truncating toward zero), nudge = 2^30 if a*b >= 0 else 1 - 2^30:
        round(a*b / 2^31) with ties toward +infinity; the one overflow case
        a = b = -2^31 saturates to 2^31 - 1.
    RoundingDivideByPOT(x, e) = round(x / 2^e), ties away from zero, using only
        an arithmetic shift, a mask and a comparison.

Each function exists twice: a scalar version compiled into the kernels
(`*_scalar`) and a vectorised int64 NumPy version used by the references.
TFLite leaves the overflow of x * 2^shift undefined (int32 shift in C); here
it saturates to int32, so every input has a defined result.

Kernels. Activations are int8 in NHWC layout inside the integer model, so a
convolution's receptive field, gathered by `im2row`, is a contiguous row

    rows[(n*Ho + i)*Wo + j, (kh*KW + kw)*C + c] = x[n, i*S + kh - P, j*S + kw - P, c]

(positions in the padding read `fill`, the input's zero point, which stands
for the real value 0). The weights are stored transposed, wt (F, KH*KW*C),
so every output is one contiguous int8 dot product. Rows and weights are
zero-padded to a multiple of ROW_ALIGN = 64 bytes: LLVM's vectorised loop
takes 64 bytes per step and leaves any remainder to a scalar loop that costs
more than the padding (measured: K = 500 is slower than K = 512), and the
zero weights add nothing to the sums. Numba vectorises that dot
product (into vpmaddwd) only when the sum is known to need 32 bits;
numba's default promotion of int8 products to int64 runs at half the
speed of float32. Rows are independent, so `prange` splits them over cores.
"""

import numba
import numpy as np
from numba import prange

from minicnn.kernels import fast

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SHIFT_RANGE = (-31, 30)  # shift of M = M0 * 2^(shift - 31), as TFLite allows
scalar = numba.njit(cache=True)


# --------------------------------------------------------------------------
# The fixed-point multiplier


def quantize_multiplier(m):
    """(M0, shift) with m ~= M0 * 2^(shift - 31), M0 in [2^30, 2^31): TFLite's QuantizeMultiplier.

    m: a real multiplier > 0. Multipliers too small to represent (shift < -31)
    become (0, 0), as in TFLite.
    """
    m = float(m)
    if not np.isfinite(m) or m <= 0:
        raise ValueError(f"a requantization multiplier must be finite and > 0, got {m}")
    q, shift = np.frexp(m)  # m = q * 2^shift, q in [0.5, 1)
    q_fixed = int(np.floor(float(q) * 2**31 + 0.5))  # TfLiteRound: half away from zero (q > 0)
    shift = int(shift)
    if q_fixed == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > SHIFT_RANGE[1]:
        raise ValueError(f"requantization multiplier {m} is too large for int32 fixed point")
    return q_fixed, shift


def _saturate_int32(x):
    return max(INT32_MIN, min(INT32_MAX, x))


def _srdhm_scalar(a, b):
    if a == INT32_MIN and b == INT32_MIN:
        return INT32_MAX
    ab = np.int64(a) * np.int64(b)
    s = ab + (np.int64(1 << 30) if ab >= 0 else np.int64(1 - (1 << 30)))
    return s >> 31 if s >= 0 else -((-s) >> 31)  # C division truncates toward zero


def _rdbpot_scalar(x, exponent):
    mask = (np.int64(1) << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


saturating_rounding_doubling_high_mul_scalar = scalar(_srdhm_scalar)
rounding_divide_by_pot_scalar = scalar(_rdbpot_scalar)
_saturate_int32_scalar = scalar(_saturate_int32)


def _mbqm_scalar(x, m0, shift):
    x = _saturate_int32_scalar(np.int64(x) << max(shift, 0))
    return rounding_divide_by_pot_scalar(
        saturating_rounding_doubling_high_mul_scalar(x, m0), np.int64(max(-shift, 0))
    )


multiply_by_quantized_multiplier_scalar = scalar(_mbqm_scalar)


def saturating_rounding_doubling_high_mul(a, b):
    """Elementwise SaturatingRoundingDoublingHighMul of int32 values (any int arrays); int64 result."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ab = a * b
    s = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(s >= 0, s >> 31, -((-s) >> 31))
    return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, high)


def rounding_divide_by_pot(x, exponent):
    """Elementwise RoundingDivideByPOT: x / 2^exponent rounded, ties away from zero; int64 result."""
    x, exponent = np.asarray(x, np.int64), np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + ((x & mask) > threshold)


def multiply_by_quantized_multiplier(x, m0, shift):
    """Elementwise MultiplyByQuantizedMultiplier: ~ x * M0 * 2^(shift - 31), int64 result.

    x int32 values; m0, shift broadcast against x (per-channel multipliers
    along the last axis).
    """
    x, shift = np.asarray(x, np.int64), np.asarray(shift, np.int64)
    x = np.clip(x << np.maximum(shift, 0), INT32_MIN, INT32_MAX)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, m0), np.maximum(-shift, 0))


# --------------------------------------------------------------------------
# im2row on NHWC int8, padding with the zero point


ROW_ALIGN = 64


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


def conv_output_size(size, kernel, stride, padding):
    return 1 + (size + 2 * padding - kernel) // stride


def im2row_nhwc_ref(x, KH, KW, stride, padding, fill, width):
    """rows (N*Ho*Wo, width) of x (N, H, W, C), padded spatially with `fill`;
    columns KH*KW*C .. width - 1 are 0."""
    p = padding
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=fill)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (KH, KW), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (N, Ho, Wo, C, KH, KW)
    N, Ho, Wo, C = windows.shape[:4]
    return pad_columns(windows.transpose(0, 1, 2, 4, 5, 3).reshape(N * Ho * Wo, KH * KW * C), width)


def _im2row_nhwc_loops(x, KH, KW, stride, padding, fill, width):
    N, H, W, C = x.shape
    Ho = (H + 2 * padding - KH) // stride + 1
    Wo = (W + 2 * padding - KW) // stride + 1
    rows = np.empty((N * Ho * Wo, width), dtype=x.dtype)
    for t in prange(N * Ho):
        n, i = t // Ho, t % Ho
        for j in range(Wo):
            r = t * Wo + j
            k = 0
            for kh in range(KH):
                h = i * stride + kh - padding
                for kw in range(KW):
                    w = j * stride + kw - padding
                    inside = 0 <= h < H and 0 <= w < W
                    for c in range(C):
                        rows[r, k] = x[n, h, w, c] if inside else fill
                        k += 1
            for k in range(KH * KW * C, width):
                rows[r, k] = 0
    return rows


im2row_nhwc = fast(_im2row_nhwc_loops)


# --------------------------------------------------------------------------
# Integer matrix products: out[r, f] from the dot of row r of a with row f of wt


def qgemm_ref(a, wt, bias, m0, shift, z_out, lo, hi):
    """int8 (M, F): clamp(MBQM(a @ wt.T + bias, m0, shift) + z_out, lo, hi).

    a int8 (M, K), wt int8 (F, K), bias int32 (F,) (zero-point terms already
    folded in), m0 and shift int32 (F,) per output channel, z_out the output
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


def _dot_int8(a, r, b, f):
    """Row r of a dotted with row f of b, wrapping like int32."""
    acc = np.int32(0)
    for k in range(a.shape[1]):
        acc += np.int32(a[r, k]) * np.int32(b[f, k])
    return acc


_dot = numba.njit(inline="always", cache=True)(_dot_int8)
ROWS_PER_TASK = 64


def _qgemm_loops(a, wt, bias, m0, shift, z_out, lo, hi):
    M = a.shape[0]
    F = wt.shape[0]
    out = np.empty((M, F), dtype=np.int8)
    for task in prange((M + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        acc = np.empty(F, dtype=np.int32)
        for r in range(task * ROWS_PER_TASK, min(M, (task + 1) * ROWS_PER_TASK)):
            # Numba types the running sum as int64; storing it into int32 tells
            # LLVM only 32 bits matter, and only then does the dot product become
            # int16 multiply-adds (vpmaddwd). Using the sum directly keeps int64.
            for f in range(F):
                acc[f] = _dot(a, r, wt, f)
            for f in range(F):
                q = multiply_by_quantized_multiplier_scalar(acc[f] + bias[f], m0[f], shift[f]) + z_out
                out[r, f] = min(max(q, lo), hi)
    return out


def _qgemm_int32_loops(a, wt, bias, lo):
    M = a.shape[0]
    F = wt.shape[0]
    out = np.empty((M, F), dtype=np.int32)
    for r in prange(M):
        for f in range(F):
            out[r, f] = _dot(a, r, wt, f)  # int32 store first: see _qgemm_loops
        for f in range(F):
            out[r, f] = max(out[r, f] + bias[f], lo)
    return out


qgemm = fast(_qgemm_loops)
qgemm_int32 = fast(_qgemm_int32_loops)


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
    for t in prange(N * Ho):
        n, i = t // Ho, t % Ho
        for j in range(Wo):
            for c in range(C):
                out[n, i, j, c] = x[n, i * stride, j * stride, c]
            for dh in range(k):
                for dw in range(k):
                    for c in range(C):
                        v = x[n, i * stride + dh, j * stride + dw, c]
                        if v > out[n, i, j, c]:
                            out[n, i, j, c] = v
    return out


maxpool_nhwc = fast(_maxpool_nhwc_loops)
