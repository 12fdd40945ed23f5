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

Here they are elementwise int64 NumPy, for the references; the kernels run the
same function on 16 lanes at once (`vectors.requantize16`), its two roundings
made one (`vectors.requantization_table`). TFLite leaves the
overflow of x * 2^shift undefined (int32 shift in C); here it saturates to
int32, so every input has a defined result.
"""

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
SHIFT_RANGE = (-31, 30)  # shift of M = M0 * 2^(shift - 31), as TFLite allows


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
