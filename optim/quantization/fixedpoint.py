"""Fixed-point requantization: scaling an int32 accumulator by a real M in integers.

Jacob et al., CVPR 2018, section 2.2, with the arithmetic of gemmlowp and
TFLite. An int32 accumulator `acc` must be scaled by a real multiplier M (in
practice 0 < M < 1) without floating point. M is stored as
M = M0 * 2^(shift - 31) with M0 an int32 in [2^30, 2^31) (`quantize_multiplier`), and

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
(`*_scalar`, Numba) and a vectorised int64 NumPy version used by the
references. `requantize` applies the whole step, clamp included, to an
array of accumulators (a conv's sums after its max-pool), beside its
NumPy reference `requantize_ref`. TFLite leaves the overflow of x * 2^shift undefined (int32 shift
in C); here it saturates to int32, so every input has a defined result.
"""

import numba
import numpy as np
from numba import prange

from minicnn.parallel import twin

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SHIFT_RANGE = (-31, 30)  # shift of M = M0 * 2^(shift - 31), as TFLite allows
scalar = numba.njit(cache=True)


def quantize_multiplier(m):
    """(M0, shift) with m ~= M0 * 2^(shift - 31), M0 in [2^30, 2^31): TFLite's QuantizeMultiplier.

    m: a real multiplier > 0 (Python or NumPy float). Returns two Python ints.
    Multipliers too small to represent (shift < -31) become (0, 0), as in TFLite.
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


# --------------------------------------------------------------------------
# Scalar versions, compiled into the Numba kernels. Arguments are int32 values
# (any integer type); the arithmetic is int64 so that a*b cannot overflow.


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


# --------------------------------------------------------------------------
# NumPy versions, elementwise, for the references


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
# Whole arrays of accumulators to int8 codes: a conv's sums after its max-pool


def requantize_ref(acc, m0, shift, z_out, lo, hi):
    """int8 (M, F) = clamp(MultiplyByQuantizedMultiplier(acc, m0, shift) + z_out, lo, hi) of int32 acc (M, F),
    m0 int32 and shift int8 (F,) per output channel."""
    return np.clip(multiply_by_quantized_multiplier(acc, m0, shift) + z_out, lo, hi).astype(np.int8)


def _requantize_loops(acc, m0, shift, z_out, lo, hi):
    M, F = acc.shape
    out = np.empty((M, F), np.int8)
    for r in prange(M):
        for f in range(F):
            out[r, f] = min(max(multiply_by_quantized_multiplier_scalar(acc[r, f], m0[f], shift[f]) + z_out, lo), hi)
    return out


_requantize = twin(_requantize_loops)


def requantize(acc, m0, shift, z_out, lo, hi):
    """Fast requantize_ref, bit for bit; acc C-contiguous int32 (M, F)."""
    return _requantize(acc.size, acc, m0, shift, z_out, lo, hi)
