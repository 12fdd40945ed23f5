"""Int8 quantization: the affine maps, TFLite's fixed-point arithmetic, the integer
kernels against their references, the integer model against the float model,
files and bad input."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
import numba

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from minicnn import kernels as FK
from minicnn import parallel, simd
from optim import quantization as Q
from optim.quantization import affine as A
from optim.quantization import calibration, chain, narrow, ops, qat, windows
from optim.quantization import fixedpoint as FP
from optim.quantization import kernels as K
from optim.quantization import vectors as V
from portable import AVX2_ONLY, AVX_VNNI, run_without_avx512
from strategies import conv_geometry, pool_geometry

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
int32s = st.integers(INT32_MIN, INT32_MAX) | st.sampled_from([INT32_MIN, INT32_MIN + 1, -1, 0, 1, INT32_MAX])
multipliers = st.integers(2**30, INT32_MAX)  # M0 as quantize_multiplier makes it
shifts = st.integers(*FP.SHIFT_RANGE)
seeds = st.integers(0, 2**31 - 1)


# --------------------------------------------------------------------------
# An exact big-integer transcription of TFLite's C++ (Python ints never overflow)


def c_div(n, d):
    """C integer division: truncates toward zero."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def tflite_srdhm(a, b):
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    return c_div(ab + nudge, 1 << 31)


def tflite_rdbpot(x, exponent):
    mask = (1 << exponent) - 1
    remainder = x & mask  # Python's & on negatives is two's complement, like int32
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def tflite_mbqm(x, m0, shift):
    left, right = max(shift, 0), max(-shift, 0)
    x = min(max(x * (1 << left), INT32_MIN), INT32_MAX)  # undefined in C; saturates here
    return tflite_rdbpot(tflite_srdhm(x, m0), right)


@numba.njit
def _lanes_mbqm(x, table, z, lo, hi):
    out = np.empty(x.size, np.int32)
    for i in range(0, x.size, 16):
        V.store16(out, i, V.requantize16(V.load16(x, i), table, i, z, lo, hi))
    return out


def lanes_mbqm(x, m0, shift, z=0, lo=-V.CLAMP_LIMIT, hi=V.CLAMP_LIMIT, bias=None):
    """MultiplyByQuantizedMultiplier of x int32 (16n,) plus bias, m0 int32 and shift int8 per element, as
    the kernels run it (vectors.requantize16; by default with no bias, no zero point and no clamp)."""
    return _lanes_mbqm(x, V.requantization_table(m0, shift, bias), z, lo, hi)


def lane_clamp(v):
    """v clamped to lanes_mbqm's default clamp, the widest requantize16 takes: where x 2^shift overflows,
    TFLite's result and the lanes' are both beyond it, of the same sign (vectors.requantization_table)."""
    return np.clip(v, -V.CLAMP_LIMIT, V.CLAMP_LIMIT) if isinstance(v, np.ndarray) else min(max(v, -V.CLAMP_LIMIT),
                                                                                          V.CLAMP_LIMIT)


def ours_lanes_and_numpy(x, m0, shift):
    lanes = int(lanes_mbqm(np.full(16, x, np.int32), np.full(16, m0, np.int32), np.full(16, shift, np.int8))[0])
    vector = int(FP.multiply_by_quantized_multiplier(np.array([x]), np.array([m0]), np.array([shift]))[0])
    return lanes, vector


def qgemm8(words, packed, bias, m0, shift, z, lo, hi, window=1):
    return K.signed(K.qgemm(words, packed, K.int8_epilogue(packed, bias, m0, shift, z, lo, hi), window))


def qgemm32(words, packed, bias, lo, window=1):
    return K.qgemm(words, packed, K.int32_epilogue(packed, bias, lo), window)


# --------------------------------------------------------------------------
# Fixed point


@given(int32s, int32s)
@example(1 << 15, 1 << 15)  # a*b / 2^31 = +0.5 exactly
@example(-(1 << 15), 1 << 15)  # -0.5
@example(3 << 14, 1 << 16)  # +1.5
@example(-(3 << 14), 1 << 16)  # -1.5
@example(INT32_MIN, INT32_MIN)  # the one overflow
def test_doubling_high_mul_is_tflites(a, b):
    expected = tflite_srdhm(a, b)
    if b >= 0:  # the lanes' contract: multipliers as quantize_multiplier makes them
        assert ours_lanes_and_numpy(a, b, 0)[0] == lane_clamp(expected)  # shift 0: the high product alone
    assert int(FP.saturating_rounding_doubling_high_mul(np.array([a]), np.array([b]))[0]) == expected
    if not a == b == INT32_MIN:
        # What the C code means: round(a*b / 2^31), ties toward +infinity.
        assert expected == (Fraction(a * b, 1 << 31) + Fraction(1, 2)).__floor__()


@given(int32s, st.integers(0, 31))
@example(-3, 1)
@example(3, 1)
@example(-2, 2)
@example(2, 2)
@example(INT32_MIN, 31)
def test_rounding_divide_by_pot_is_tflites(x, exponent):
    expected = tflite_rdbpot(x, exponent)
    assert int(FP.rounding_divide_by_pot(np.array([x]), np.array([exponent]))[0]) == expected
    # round(x / 2^e), ties away from zero
    q = Fraction(x, 1 << exponent)
    assert expected == (1 if q >= 0 else -1) * (abs(q) + Fraction(1, 2)).__floor__()


@given(st.integers(1, 31), st.integers(0, 2**20), st.booleans())
def test_rounding_divide_by_pot_ties_go_away_from_zero(exponent, k, negative):
    x = (2 * k + 1) << (exponent - 1)  # an exact tie: (k + 1/2) * 2^e
    if x > INT32_MAX:
        return
    x, expected = (-x, -(k + 1)) if negative else (x, k + 1)
    ours = int(FP.rounding_divide_by_pot(np.array([x]), np.array([exponent]))[0])
    assert ours == expected, f"ours {ours}, expected {expected} for the tie {x} / 2^{exponent}"


@given(int32s, multipliers, shifts)
@example(INT32_MAX, INT32_MAX, 30)  # saturating left shift
@example(INT32_MIN, 2**30, -31)  # largest right shift
@example(-(1 << 30), 2**30, 0)
def test_multiply_by_quantized_multiplier_is_tflites(x, m0, shift):
    expected = tflite_mbqm(x, m0, shift)
    lanes, vector = ours_lanes_and_numpy(x, m0, shift)
    assert lanes == lane_clamp(expected) and vector == expected, f"ours {lanes}, {vector}; TFLite {expected}"


@given(int32s, multipliers, st.integers(-31, 0))
def test_multiply_by_quantized_multiplier_rounds_x_times_m(x, m0, shift):
    # Two roundings: <= 1/2 of the high product, seen through the shift, then 1/2.
    exact = Fraction(x * m0, 1 << (31 - shift))
    ours = ours_lanes_and_numpy(x, m0, shift)[0]  # clamped, which brings it no farther from the clamped exact
    bound = Fraction(1, 2) + Fraction(1, 2 << -shift)
    assert abs(ours - lane_clamp(exact)) <= bound, f"ours {ours}, x*M = {float(exact)}"


@given(st.floats(1e-9, 1e9, allow_nan=False))
@example(1 - 2**-40)  # rounds up to 2^31: TFLite halves M0 and bumps the shift
@example(0.5)
def test_quantize_multiplier(m):
    m0, shift = FP.quantize_multiplier(m)
    if m < 2**-32:
        return
    assert 2**30 <= m0 < 2**31
    approx = Fraction(m0) * Fraction(2) ** (shift - 31)
    assert abs(approx - Fraction(m)) <= Fraction(2) ** (shift - 32), f"M0 {m0}, shift {shift} for {m}"


def test_quantize_multiplier_edges():
    assert FP.quantize_multiplier(1 - 2**-40) == (2**30, 1)
    assert FP.quantize_multiplier(0.5) == (2**30, 0)
    assert FP.quantize_multiplier(2.0**-40) == (0, 0)  # below 2^-32: TFLite gives up, as do we
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="multiplier"):
            FP.quantize_multiplier(bad)


def test_requantization_table_refuses_what_the_lanes_cannot_run():
    ok_m0, ok_shift = np.full(16, 2**30, np.int64), np.full(16, -3, np.int8)
    for m0, shift, message in [(ok_m0[:15], ok_shift[:15], "multiple of 16"), (ok_m0, ok_shift[:8], "one multiplier"),
                               (-ok_m0, ok_shift, r"\[0, 2\^31\)"), (ok_m0 << 1, ok_shift, r"\[0, 2\^31\)"),
                               (ok_m0, ok_shift - 29, "shifts must lie"), (ok_m0, ok_shift + 34, "shifts must lie"),
                               (ok_m0 - 1, ok_shift + 4, "left shift must be at least 2\\^30")]:
        with pytest.raises(ValueError, match=message):
            V.requantization_table(m0, shift)
    for bias, message in [(np.zeros(15), "one multiplier, shift and bias"), (np.full(16, 2**31), "int32")]:
        with pytest.raises(ValueError, match=message):
            V.requantization_table(ok_m0, ok_shift, bias)


# --------------------------------------------------------------------------
# Affine quantization


@given(st.floats(1e-3, 10), st.integers(-128, 127), seeds)
def test_quantize_error_inside_and_saturation_outside(scale, zero_point, seed):
    rng = np.random.default_rng(seed)
    lo, hi = scale * (-128 - zero_point), scale * (127 - zero_point)
    r = rng.uniform(lo - 3 * scale * 128, hi + 3 * scale * 128, 500)
    q = A.affine_quantize(r, scale, zero_point)
    assert q.dtype == np.int8
    back = A.affine_dequantize(q, scale, zero_point)
    inside = (r >= lo) & (r <= hi)
    err = np.abs(back - r)[inside]
    assert err.max(initial=0) <= scale / 2 * (1 + 1e-12), f"error {err.max()} > S/2 = {scale / 2}"
    np.testing.assert_array_equal(q[r < lo - scale / 2], -128)
    np.testing.assert_array_equal(q[r > hi + scale / 2], 127)


def test_quantize_hand_computed():
    q = A.affine_quantize(np.array([-1.0, 0.0, 0.25, 0.26, 1.0, 100.0]), 0.5, 10)
    np.testing.assert_array_equal(q, [8, 10, 10, 11, 12, 127])  # 0.25 / 0.5 = 0.5 rounds to even


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(-10, 0),
       st.integers(-128, 127), st.sampled_from([np.float32, np.float64, np.float16]), seeds)
def test_quantize_nhwc_is_affine_quantize_transposed_bit_for_bit(N, C, H, W, exponent, zero_point, dtype, seed):
    scale = 2.0**exponent  # a power of two: x = k S / 2 is exact, and half of the values are ties
    x = (np.random.default_rng(seed).integers(-300, 300, (N, C, H, W)) * (scale / 2)).astype(dtype)
    expected = A.affine_quantize(x, scale, zero_point).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(A.quantize_nhwc_ref(x, scale, zero_point), expected)
    for build in ("serial", "threaded"):
        with parallel.forced(build):
            np.testing.assert_array_equal(A.quantize_nhwc(x, scale, zero_point), expected, err_msg=build)
            np.testing.assert_array_equal(A.quantize_nhwc(x, scale, zero_point, unsigned=True), K.unsigned(expected),
                                          err_msg=build)  # the bytes predict hands its kernels


@given(st.integers(1, 3), st.sampled_from([1, 3]), st.floats(1e-4, 10), st.integers(-128, 127),
       st.sampled_from([np.float32, np.float64]), seeds)
@example(2, 1, 1 / 255, -128, np.float32, 0)
def test_quantize_nhwc_by_products_rounds_as_the_division_near_halves(N, C, scale, zero_point, dtype, seed):
    """quantize_nhwc multiplies by fl32(1/S) and redoes by division the runs with a value near a half:
    values a few ulps either side of every half, ties, saturating and huge ones, any scale."""
    rng = np.random.default_rng(seed)
    half = (rng.integers(-300, 300, (N, C, 5, 6)) + 0.5) * scale
    x = np.nextafter(half.astype(dtype), rng.choice([-np.inf, np.inf], half.shape).astype(dtype))
    x = np.where(rng.random(x.shape) < 0.3, half.astype(dtype), x)  # a third: the nearest dtype value to the half
    x = np.where(rng.random(x.shape) < 0.7, rng.normal(0, 200 * scale, x.shape).astype(dtype), x)  # runs with none
    x.reshape(-1)[:2] = [1e30 * scale, -1e30 * scale]
    # and a run by products alone (a row of a channel, for C = 3): whole multiples of S, no half near,
    # with huge values (float64's past float32's range: the product is inf)
    far = 1e300 if dtype == np.float64 else 1e30
    x[0, 0, 1] = np.r_[far, -far, rng.integers(-300, 300, 4) * scale].astype(dtype)
    expected = A.quantize_nhwc_ref(x, scale, zero_point)
    for build in ("serial", "threaded"):
        with parallel.forced(build):
            np.testing.assert_array_equal(A.quantize_nhwc(x, scale, zero_point), expected, err_msg=build)


@pytest.mark.parametrize("scale, zero_point", [(2.0**-130, 0), (2.0**130, 0), (0.01, -2**22)])
def test_quantize_nhwc_outside_the_products_range_divides(scale, zero_point):
    """Where fl32(1/S) is inf or subnormal, or a far zero point leaves codes of |x / S| ~ 2^22 unsaturated
    (there a float32 product errs by about 1), the products would give other codes: the division runs."""
    rng = np.random.default_rng(0)
    k = rng.integers(-300, 300, (2, 1, 4, 4)) - zero_point
    x = (k + rng.choice([0.49, 0.51], k.shape)) * scale  # float64: 2^-130 S is no float32
    np.testing.assert_array_equal(A.quantize_nhwc(x, scale, zero_point), A.quantize_nhwc_ref(x, scale, zero_point))


@given(st.floats(-50, 0), st.floats(0, 50))
@example(-1.0, 0.2)
def test_activation_qparams_cover_the_range_and_zero(lo, hi):
    if hi - lo < 1e-6:
        return
    scale, zp = A.activation_qparams(lo, hi)
    assert -128 <= zp <= 127
    slack = scale / 2 * (1 + 1e-9)  # half a step, and the rounding of computing it (lo=-1, hi=0.2 is exact)
    assert scale * (-128 - zp) <= lo + slack and scale * (127 - zp) >= hi - slack
    assert A.affine_dequantize(A.affine_quantize(0.0, scale, zp), scale, zp) == 0.0  # the real 0 is a code


@given(seeds, st.booleans())
def test_weights_are_symmetric_per_channel(seed, per_channel):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((6, 3, 3, 3)) * rng.uniform(0.01, 5, (6, 1, 1, 1))
    W[2] = 0  # a pruned filter
    q, scales = A.quantize_weights(W, 0, per_channel)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and np.all(scales > 0)
    assert np.abs(q).max() == 127 and np.all(q[2] == 0)
    err = np.abs(q * scales.astype(np.float64)[:, None, None, None] - W)
    assert np.all(err <= scales[:, None, None, None] / 2 * (1 + 1e-6))
    if per_channel:
        assert all(np.abs(q[f]).max() == 127 for f in range(6) if f != 2)
    else:
        assert np.all(scales == scales[0])


# --------------------------------------------------------------------------
# Integer kernels against their references, bit for bit


def random_codes(rng, shape, low=-128, high=128):
    return rng.integers(low, high, shape).astype(np.int8)


@given(conv_geometry(), seeds)
def test_im2row_nhwc_matches_reference(geom, seed):
    N, C, H, W, F, k, s, p = geom
    x = random_codes(np.random.default_rng(seed), (N, H, W, C))
    fill = int(np.random.default_rng(seed + 1).integers(-128, 128))
    width = K.padded_width(k * k * C)
    for build in ("threaded", "serial"):
        with parallel.forced(build):
            rows = windows.im2row_nhwc(x, k, k, s, p, fill, width)
        np.testing.assert_array_equal(rows, windows.im2row_nhwc_ref(x, k, k, s, p, fill, width), err_msg=build)
    assert rows.shape[1] % K.ROW_ALIGN == 0 and np.all(rows[:, k * k * C:] == 0)
    # The unpadded columns are the float im2row's, reordered from (c, kh, kw) to (kh, kw, c).
    float_rows = FK.im2row_ref(FK.pad(x.transpose(0, 3, 1, 2).astype(np.float64) - fill, p), k, k, s) + fill
    reordered = float_rows.reshape(-1, C, k, k).transpose(0, 2, 3, 1).reshape(len(float_rows), -1)
    np.testing.assert_array_equal(rows[:, : k * k * C], reordered)


@given(st.integers(1, 70), st.integers(1, 300), st.integers(1, 40), seeds, st.booleans())
@example(7, 33, 16, 0, False)  # the last width of one block of filters
@example(7, 33, 17, 0, False)  # the first of a pair
@example(9, 300, 11, 1, True)  # narrow: 4 chunks and a tail of 11 words, 9 rows (a last pass of 1 row)
def test_qgemm_matches_reference(M, Kdim, F, seed, relu):
    rng = np.random.default_rng(seed)
    a, wt = random_codes(rng, (M, Kdim)), random_codes(rng, (F, Kdim), -127)
    bias = rng.integers(-(2**20), 2**20, F).astype(np.int32)
    m0 = rng.integers(2**30, 2**31, F).astype(np.int32)
    shift = rng.integers(-31, 2, F).astype(np.int8)
    z = int(rng.integers(-128, 128))
    lo = z if relu else -128
    packed = K.pack_weights(wt)
    ours = qgemm8(windows.rows_words(K.unsigned(a), packed), packed, bias, m0, shift, z, lo, 127)
    ref = K.qgemm_ref(a, wt, bias, m0, shift, z, lo, 127)
    assert ours.dtype == np.int8
    np.testing.assert_array_equal(ours, ref)
    lo32 = 0 if relu else INT32_MIN
    np.testing.assert_array_equal(qgemm32(windows.rows_words(K.unsigned(a), packed), packed, bias, lo32),
                                  K.qgemm_int32_ref(a, wt, bias, lo32))


@pytest.mark.parametrize("build", ["threaded", "serial"])
@pytest.mark.parametrize("F", [45, 11])
def test_qgemm_builds_match_reference(build, F):
    """qgemm picks the threaded or the serial build by size; both must be exact, for pairs of filter
    blocks and for a single block (F <= 16: a kernel of its own)."""
    rng = np.random.default_rng(len(build))
    a, wt = random_codes(rng, (67, 203)), random_codes(rng, (F, 203), -127)
    bias = rng.integers(-(2**20), 2**20, F).astype(np.int32)
    m0, shift = rng.integers(2**30, 2**31, F).astype(np.int32), rng.integers(-31, 2, F).astype(np.int8)
    packed = K.pack_weights(wt)
    assert packed.wp.shape[0] == (1 if F <= 16 else 4)
    with parallel.forced(build):
        ours = qgemm8(windows.rows_words(K.unsigned(a), packed), packed, bias, m0, shift, 5, 5, 127)
        ours32 = qgemm32(windows.rows_words(K.unsigned(a), packed), packed, bias, INT32_MIN)
    np.testing.assert_array_equal(ours, K.qgemm_ref(a, wt, bias, m0, shift, 5, 5, 127))
    np.testing.assert_array_equal(ours32, K.qgemm_int32_ref(a, wt, bias, INT32_MIN))


def test_qgemm_hand_computed():
    a = np.array([[1, 2, 3], [-4, 0, 4]], np.int8)
    wt = np.array([[1, 1, 1], [2, -1, 0]], np.int8)
    bias = np.array([4, -1], np.int32)
    packed = K.pack_weights(wt)
    rows = windows.rows_words(K.unsigned(a), packed)
    np.testing.assert_array_equal(qgemm32(rows, packed, bias, INT32_MIN), [[10, -1], [4, -9]])
    np.testing.assert_array_equal(qgemm32(rows, packed, bias, 0), [[10, 0], [4, 0]])
    # M = 1/2 as M0 = 2^30, shift 0: one rounding, in the high product, ties toward +inf:
    # 5, -0.5 -> 0, 2, -4.5 -> -4; then + Z_out = 3
    half = np.full(2, 2**30, np.int32), np.zeros(2, np.int8)
    np.testing.assert_array_equal(qgemm8(rows, packed, bias, *half, 3, -128, 127), [[8, 3], [5, -1]])
    np.testing.assert_array_equal(qgemm8(rows, packed, bias, *half, 3, 3, 127), [[8, 3], [5, 3]])  # fused ReLU
    # M = 1/4 as M0 = 2^30, shift -1: 10 -> 5 -> 2.5 -> 3 (RoundingDivideByPOT: away from zero),
    # -1 -> -0.5 -> 0, 4 -> 2 -> 1, -9 -> -4.5 -> -4 -> -2
    quarter = np.full(2, 2**30, np.int32), np.full(2, -1, np.int8)
    np.testing.assert_array_equal(qgemm8(rows, packed, bias, *quarter, 3, -128, 127), [[6, 3], [4, 1]])


@given(st.integers(1, 3), st.sampled_from([4, 8, 12]), st.integers(1, 9), st.integers(1, 9), st.integers(1, 40),
       st.integers(1, 4), st.integers(1, 3), seeds)
def test_qgemm_on_windows_read_in_place_is_qgemm_on_im2row(N, C, H, W, F, k, stride, seed):
    assume(min(H, W) >= k)
    rng = np.random.default_rng(seed)
    x, wt = random_codes(rng, (N, H, W, C)), random_codes(rng, (F, k * k * C), -127)
    assert windows.conv_fits_words(x.shape, 0) and not windows.conv_fits_words(x.shape, 1)
    rows = windows.im2row_nhwc_ref(x, k, k, stride, 0, 0, k * k * C)
    u = K.unsigned(x)
    assert_qgemm_on_words_is_qgemm_on_rows(lambda pool: windows.conv_words(u, k, k, stride, pool), K.pack_weights(wt),
                                           rows, wt, rng, (N, (H - k) // stride + 1, (W - k) // stride + 1))


def assert_qgemm_on_words_is_qgemm_on_rows(make_words, packed, rows, wt, rng, grid):
    """qgemm, int8 and int32 out, on make_words(pool) (in both builds) against the references on
    im2row's rows of the conv output grid (N, Ho, Wo); with pool = 2 (window = 4) against the
    references' 2x2 max-pool."""
    F = len(wt)
    bias = rng.integers(-(2**20), 2**20, F).astype(np.int32)
    m0, shift = rng.integers(2**30, 2**31, F).astype(np.int32), rng.integers(-31, 2, F).astype(np.int8)
    codes = K.qgemm_ref(rows, wt, bias, m0, shift, 3, -128, 127).reshape(*grid, F)
    sums = K.qgemm_int32_ref(rows, wt, bias, INT32_MIN).reshape(*grid, F)
    for build in ("serial", "threaded"):
        for pool in (1, 2) if min(grid[1:]) >= 2 else (1,):
            expected, expected32 = (K.maxpool_nhwc_ref(a, pool, pool).reshape(-1, F) for a in (codes, sums))
            with parallel.forced(build):
                words, window = make_words(pool), pool * pool
                np.testing.assert_array_equal(qgemm8(words, packed, bias, m0, shift, 3, -128, 127, window), expected,
                                              err_msg=f"{build}, pool {pool}")
                np.testing.assert_array_equal(qgemm32(words, packed, bias, INT32_MIN, window), expected32,
                                              err_msg=f"{build}, pool {pool}")


@given(pool_geometry(), seeds)
def test_maxpool_nhwc_matches_reference_and_float_pool(geom, seed):
    N, C, H, W, k, s = geom
    x = random_codes(np.random.default_rng(seed), (N, H, W, C))
    for build in ("threaded", "serial"):
        with parallel.forced(build):
            ours = K.maxpool_nhwc(x, k, s)
        np.testing.assert_array_equal(ours, K.maxpool_nhwc_ref(x, k, s), err_msg=build)
    float_pool, _ = FK.maxpool_forward_ref(x.transpose(0, 3, 1, 2).astype(np.float64), k, s)
    np.testing.assert_array_equal(ours.transpose(0, 3, 1, 2), float_pool)


# --------------------------------------------------------------------------
# One integer layer against exact real arithmetic


def conv_layer_case(seed, geom, relu):
    """An IntConv2D with random codes and scales, its input codes, and the exact real output."""
    N, C, H, W, F, k, s, p = geom
    rng = np.random.default_rng(seed)
    Wq = random_codes(rng, (F, C, k, k), -127)
    w_scale = rng.uniform(1e-3, 1e-1, F).astype(np.float32)
    in_q = (float(rng.uniform(1e-3, 1e-1)), int(rng.integers(-128, 128)))
    out_q = (float(rng.uniform(1e-3, 1)), int(rng.integers(-128, 128)))
    b = rng.integers(-5000, 5000, F).astype(np.int32)
    op = ops.IntConv2D(Wq, w_scale, b, in_q, out_q, relu, s, p)
    x = random_codes(rng, (N, H, W, C))
    x_real = A.affine_dequantize(x, *in_q).transpose(0, 3, 1, 2)
    w_real = Wq * w_scale.astype(np.float64)[:, None, None, None]
    y = FK.conv2d_forward_ref(x_real, w_real, b * in_q[0] * w_scale.astype(np.float64), s, p)
    return op, x, (np.maximum(y, 0) if relu else y)


@given(seeds, conv_geometry(), st.booleans(), st.just((2, 2)) | st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_int_conv_pooled_before_requantizing_gives_the_same_codes(seed, geom, relu, pool_size):
    (k, stride), (op, x, _) = pool_size, conv_layer_case(seed, geom, relu)
    _, Ho, Wo = op.output_shape((x.shape[3], x.shape[1], x.shape[2]))
    assume(min(Ho, Wo) >= k)
    last = ops.IntConv2D(op.W, op.w_scale, op.b, op.in_q, None, relu, op.stride, op.padding)  # int32 sums out
    pool = ops.IntMaxPool2D(op.out_q, k, stride)  # a pool passes codes through: its (S, Z) is not read
    for conv in (op, last):
        expected = pool.forward(conv.forward(x, reference=True), reference=True)
        for build in ("serial", "threaded"):
            with parallel.forced(build):
                step = conv.bind(x.shape, pool)  # on the kernels' bytes
                np.testing.assert_array_equal(K.signed(step(K.unsigned(x))), expected, err_msg=build)


@numba.njit
def lanes_add(u, v):
    out = np.empty(u.size, np.int32)
    for i in range(0, u.size, 16):
        V.store16(out, i, V.add16(V.load16(u, i), V.load16(v, i)))
    return out


def test_add16_wraps_as_int32_addition():
    u = np.array([INT32_MAX, INT32_MIN, -1, 0, 1, 2**30] * 3 + [5, -7], np.int32)
    v = np.array([1, -1, 1, 0, -1, 2**30] * 3 + [INT32_MAX, INT32_MIN], np.int32)
    np.testing.assert_array_equal(lanes_add(u, v), (u.astype(np.int64) + v).astype(np.int32))


@given(seeds, st.integers(0, 30), st.booleans())
def test_requantize16_is_the_numpy_arithmetic_on_every_lane(seed, bits, right):
    """Many values at once, every shift and multiplier in range (or only right shifts, which the table's
    short path runs), biases, and a third of the lanes exact ties (M0 = 2^30 halves x = odd 2^e exactly,
    then the shift by e leaves k + 1/2; odd 2^e +- 1 makes a tie of the first rounding): the kernels'
    lanes and the table's NumPy meaning agree with the reference, value for value."""
    rng = np.random.default_rng(seed)
    n = 8 * 512
    shift = rng.integers(FP.SHIFT_RANGE[0], -1 if right else FP.SHIFT_RANGE[1], n, endpoint=True).astype(np.int8)
    m0 = np.where(rng.random(n) < 0.02, 0, rng.integers(0, 2**31, n))
    x = rng.integers(-(2**bits), 2**bits, n, endpoint=True)
    tie, e = rng.random(n) < 0.3, rng.integers(1, 20, n)
    odd, nudge = 2 * rng.integers(-1000, 1000, n) + 1, rng.integers(-1, 2, n)
    m0, shift = np.where(tie, 2**30, m0).astype(np.int32), np.where(tie, -e, shift).astype(np.int8)
    m0 = np.where(shift > 0, m0 | 2**30, m0).astype(np.int32)  # quantize_multiplier's M0 where it shifts left
    # x / 2 = odd 2^(e-1): a tie of the final rounding; +-1 more, a tie of the first (toward +infinity),
    # whose result, for -1, is a tie of the second
    x = np.clip(np.where(tie, (odd << e) + nudge, x), INT32_MIN, INT32_MAX).astype(np.int32)
    x[:6] = [INT32_MIN, INT32_MAX, 0, -1, 1, INT32_MIN + 1]
    expected = FP.multiply_by_quantized_multiplier(x, m0, shift)
    np.testing.assert_array_equal(lanes_mbqm(x, m0, shift), lane_clamp(expected))
    # a clamp at lo >= z (a fused ReLU) skips the correction of negative results: the same codes
    np.testing.assert_array_equal(lanes_mbqm(x, m0, shift, 3, 3, 130), np.clip(expected + 3, 3, 130))
    # a bias, taken into the table: the sums x - bias plus it (both int32) are x
    bias = rng.integers(-(2**bits), 2**bits, n, endpoint=True)
    sums = np.clip(x.astype(np.int64) - bias, INT32_MIN, INT32_MAX)
    bias = (x - sums).astype(np.int32)
    np.testing.assert_array_equal(lanes_mbqm(sums.astype(np.int32), m0, shift, bias=bias), lane_clamp(expected))
    np.testing.assert_array_equal(lanes_mbqm(sums.astype(np.int32), m0, shift, 3, 3, 130, bias),
                                  np.clip(expected + 3, 3, 130))
    table = V.requantization_table(m0, shift, bias)
    numpy_lanes = np.concatenate([V._requantize16_python(sums[i : i + 16].astype(np.int32), table, i, 3, -5, 130)
                                  for i in range(0, n, 16)])
    np.testing.assert_array_equal(numpy_lanes, np.clip(expected + 3, -5, 130))
    assert (table.reshape(-1, 8, 8)[:, 7, 0] == 0).all() == right  # every group short, or (nearly surely) not


def test_requantization_table_takes_the_short_path_where_every_shift_is_right():
    """Per 16 filters: the short row (S - 32 in order, then zeros) where all shift right or have M0 = 0,
    the 64-bit shifts S where one does not."""
    m0, shift = np.full(32, 2**30, np.int64), np.full(32, -3, np.int8)
    m0[5], shift[5] = 0, 0  # a filter whose result is 0 (quantize_multiplier's (0, 0)): it counts as right
    shift[20] = 0
    rows = V.requantization_table(m0, shift).reshape(2, 8, 8)
    np.testing.assert_array_equal(rows[0, 6].view(np.int32), np.where(np.arange(16) == 5, 0, 2))
    x = np.arange(-16, 16, dtype=np.int32) * 1000
    np.testing.assert_array_equal(lanes_mbqm(x, m0, shift), FP.multiply_by_quantized_multiplier(x, m0, shift))
    assert (rows[0, 7] == 0).all()
    np.testing.assert_array_equal(rows[1, 6:].T.reshape(-1), 31 - np.where(np.arange(16) == 4, 0, -3))


@given(seeds, conv_geometry(), st.booleans())
def test_int_conv_is_exact_real_conv_rounded_once(seed, geom, relu):
    op, x, y = conv_layer_case(seed, geom, relu)
    out = op.forward(x)
    np.testing.assert_array_equal(out, op.forward(x, reference=True))
    scale, zp = op.out_q
    got = A.affine_dequantize(out, scale, zp).transpose(0, 3, 1, 2)
    lo, hi = scale * (-128 - zp), scale * (127 - zp)
    target = np.clip(y, lo, hi)  # saturation is the only other error
    # <= S_out (two roundings) + |y| 2^-31 (M0's 31 bits) + float64 noise
    bound = scale + np.abs(y) * 2.0**-31 + 1e-9
    worst = np.abs(got - target).max(initial=0)
    assert np.all(np.abs(got - target) <= bound), f"worst error {worst} vs S_out {scale}"


# --------------------------------------------------------------------------
# Whole models


def small_models(seed):
    rng = np.random.default_rng(seed)
    return {
        "lenet-like": Sequential([
            Conv2D(1, 4, 5, rng=rng), MaxPool2D(2), Conv2D(4, 6, 3, rng=rng), ReLU(), MaxPool2D(2),
            Flatten(), Dense(6 * 5 * 5, 16, rng=rng), ReLU(), Dense(16, 10, rng=rng)]),
        "strided, padded, loose relu": Sequential([
            Conv2D(1, 5, 3, stride=2, padding=1, rng=rng), MaxPool2D(2), ReLU(),
            Flatten(), Dense(5 * 7 * 7, 10, rng=rng)]),
        "mlp": Sequential([Flatten(), Dense(784, 20, rng=rng), ReLU(), Dense(20, 10, rng=rng), ReLU()]),
    }


def error_bound(model, qmodel, x):
    """Elementwise bound on |int8 logits - float logits| from the quantization steps;
    on the way, check each integer layer against exact real arithmetic.

    Along the float layers, e bounds |dequantized integer activation - float
    activation|. The input: S_in / 2. A layer y = W x + b computed on the
    dequantized x' with quantized W', b' differs from the float one by
    |W| e + |W' - W| |x'| + |b' - b| <= |W| e + (S_w / 2) |x'| + S_b / 2, and its
    requantization adds S_out (two roundings) + S_out / 2 (a range endpoint
    may lie S/2 past the last code); ReLU and max-pool are 1-Lipschitz.
    The bound assumes every error adds up with the same sign, so it is loose
    (~100x the errors seen); the per-layer check is the tight one: an integer
    layer's output is within 1.5 S_out of the exact real layer with the
    quantized weights on its dequantized input (exact for the int32 last layer).
    """
    steps = calibration.plan(model)
    a = x.astype(np.float64)
    e = np.full_like(a, qmodel.input_q[0] / 2)
    q = qmodel.quantize_input(x)
    for (op_name, i, relu), op in zip(steps, qmodel.layers):
        layer = model.layers[i]
        x_int = A.affine_dequantize(q, *op.in_q) if op_name == "compute" else None
        q = op.forward(q)
        if op_name == "compute":
            conv = layer.kind == "conv2d"
            if conv:
                x_int = x_int.transpose(0, 3, 1, 2)
            W, b = layer.params["W"].astype(np.float64), layer.params["b"].astype(np.float64)
            half_sw = op.w_scale.astype(np.float64) / 2
            half_sb = op.in_q[0] * half_sw
            w_q = op.W * op.w_scale.astype(np.float64).reshape((-1, 1, 1, 1) if conv else (1, -1))
            b_q = op.b * op.in_q[0] * op.w_scale.astype(np.float64)
            exact = (FK.conv2d_forward_ref(x_int, w_q, b_q, layer.stride, layer.padding) if conv else x_int @ w_q + b_q)
            exact = np.maximum(exact, 0) if relu else exact
            scale, zero_point = op.output_scale
            got = A.affine_dequantize(q, scale, zero_point)
            got = got.transpose(0, 3, 1, 2) if conv else got
            tight = 1.5 * scale if op.out_q is not None else 1e-9 * np.abs(exact).max()
            assert np.abs(got - exact).max() <= tight + 1e-9, f"layer {i}: {np.abs(got - exact).max()} > {tight}"
            if conv:
                ext = (layer.stride, layer.padding)
                grow = FK.conv2d_forward_ref(e, np.abs(W), half_sb, *ext) + FK.conv2d_forward_ref(
                    np.abs(x_int), np.broadcast_to(half_sw[:, None, None, None], W.shape), np.zeros_like(b), *ext)
                a = FK.conv2d_forward_ref(a, W, b, *ext)
            else:
                grow = e @ np.abs(W) + np.abs(x_int) @ np.broadcast_to(half_sw, W.shape) + half_sb
                a = a @ W + b
            e = grow + (1.5 * op.out_q[0] if op.out_q is not None else 0)
            if relu:
                a = np.maximum(a, 0)
        elif op_name == "maxpool2d":
            a = FK.maxpool_forward_ref(a, layer.kernel_size, layer.stride)[0]
            e = FK.maxpool_forward_ref(e, layer.kernel_size, layer.stride)[0]
        elif op_name == "flatten":
            a, e = a.reshape(len(a), -1), e.reshape(len(e), -1)
        else:
            a = np.maximum(a, 0)
    return a, e


@pytest.mark.parametrize("name", ["lenet-like", "strided, padded, loose relu", "mlp"])
def test_integer_model_steps_bound_to_shapes_stay_exact(name):
    """forward_int keeps steps bound to a few input shapes: batches of ever new and returning sizes,
    more shapes than it keeps, each bit for bit with the references."""
    rng = np.random.default_rng(2)
    qmodel = Q.quantize_model(small_models(0)[name], rng.random((16, 1, 28, 28), dtype=np.float32))
    for n in (1, 3, 1, 5, 2, 7, 3, 1, 6, 5):
        x = rng.random((n, 1, 28, 28), dtype=np.float32)
        np.testing.assert_array_equal(qmodel.predict(x), qmodel.predict(x, reference=True), err_msg=f"batch {n}")


@given(seeds, st.integers(1, 8), st.integers(1, 2), st.integers(0, 1), st.booleans(), st.sampled_from([0, 3, 4]),
       st.sampled_from([13, 40]), st.integers(1, 3))
def test_a_chain_is_the_steps_and_the_references_bit_for_bit(seed, k, stride, padding, pool, second, units, n):
    """A one-channel conv (its lines read from shifted copies, or with padding im2row's rows), its 2x2
    pool or none, maybe a second conv (on 4 channels read in place, on 3 through im2row) and two dense
    layers (the first on rows padded to whole words where they are not; its units one block of filters
    or a pair): at small batches predict
    runs them as one Chain (the second call of a shape; the first binds the steps), with the steps'
    logits and the references', bit for bit; forced threaded, it runs the steps."""
    rng = np.random.default_rng(seed)
    layers = [Conv2D(1, second or 5, k, stride=stride, padding=padding, rng=rng)] + ([MaxPool2D(2)] if pool else [])
    C, side = second or 5, (28 + 2 * padding - k) // stride + 1
    side //= 2 if pool else 1
    if second and side >= 3:
        layers += [Conv2D(second, 6, 3, rng=rng), ReLU()]
        C, side = 6, side - 2
    model = Sequential(layers + [Flatten(), Dense(C * side * side, units, rng=rng), ReLU(), Dense(units, 10, rng=rng)])
    qmodel = Q.quantize_model(model, rng.random((8, 1, 28, 28), dtype=np.float32))
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    expected = qmodel.predict(x, reference=True)
    np.testing.assert_array_equal(qmodel.predict(x), expected)  # the steps, bound
    chain = qmodel.chain_for(x.shape)
    with parallel.forced("auto"):
        assert chain is not None and chain.runs()
    np.testing.assert_array_equal(chain(x, qmodel.input_q), expected)
    with pytest.raises(ValueError, match="this chain runs inputs of shape"):
        chain(np.concatenate([x, x]), qmodel.input_q)
    for build in ("serial", "threaded"):
        with parallel.forced(build):
            assert chain.runs() == (build == "serial")
            np.testing.assert_array_equal(qmodel.predict(x), expected, err_msg=build)


@pytest.mark.parametrize("name", ["lenet-like", "mlp"])
def test_big_batches_map_a_chain_over_groups_of_images_bit_for_bit(name):
    """Two or more groups of TASK_IMAGES: predict maps the groups' chain over them (one parallel loop, or
    its serial build), the rest as a smaller batch; the same bits as the references, every build."""
    rng = np.random.default_rng(5)
    qmodel = Q.quantize_model(small_models(0)[name], rng.random((8, 1, 28, 28), dtype=np.float32))
    B = chain.TASK_IMAGES
    for n in (2 * B, 2 * B + 5, 3 * B - 1):
        x = rng.random((n, 1, 28, 28), dtype=np.float32)
        expected = qmodel.predict(x, reference=True)
        for build in ("serial", "threaded", "auto"):
            with parallel.forced(build):
                np.testing.assert_array_equal(qmodel.predict(x), expected, err_msg=f"{n} images, {build}")
    group = qmodel.chain_for((B, 1, 28, 28))
    assert (group is not None) == chain.MAPS  # without AVX-512 predict keeps to the steps: no group bound
    if group is None:
        return
    np.testing.assert_array_equal(group.map(x[: 2 * B], qmodel.input_q), expected[: 2 * B])
    for bad in (x[: B + 1], x[: 2 * B, :, :27]):
        with pytest.raises(ValueError, match="this chain maps groups of inputs of shape"):
            group.map(bad, qmodel.input_q)


def test_steps_that_do_not_chain():
    """A separate ReLU, or a last layer with codes out: no chain. (The MLP chains: its first dense
    layer reads the input's bytes, NHWC, as they are.)"""
    rng = np.random.default_rng(3)
    x = rng.random((2, 1, 28, 28), dtype=np.float32)
    for name, chained in (("strided, padded, loose relu", False), ("mlp", True)):
        qmodel = Q.quantize_model(small_models(0)[name], x)
        np.testing.assert_array_equal(qmodel.predict(x), qmodel.predict(x, reference=True))
        assert (qmodel.chain_for(x.shape) is not None) == chained, name
        np.testing.assert_array_equal(qmodel.predict(x), qmodel.predict(x, reference=True))
    qmodel = Q.quantize_model(small_models(0)["lenet-like"], x)
    conv, pool = qmodel.layers[:2]
    for steps in ([], [conv.bind((2, 28, 28, 1), pool)]):  # nothing; a last step with codes, not sums
        with pytest.raises(ValueError, match="a chain runs convs and dense layers"):
            chain.Chain(steps, x.shape, np.ones(4))
    qmodel = Q.quantize_model(small_models(0)["mlp"], x)
    qmodel.predict(x)
    assert qmodel.chain_for(x.shape) is not None
    qmodel.layers[-1] = Q.quantize_model(small_models(1)["mlp"], x).layers[-1]  # ops changed: bound anew
    assert qmodel.chain_for(x.shape) is None
    np.testing.assert_array_equal(qmodel.predict(x), qmodel.predict(x, reference=True))
    np.testing.assert_array_equal(qmodel.predict(x), qmodel.predict(x, reference=True))


def test_a_chain_is_made_for_predicts_inputs_and_reads_the_input_scale_each_call():
    """Codes of another shape through forward_int, as many bytes as predict's input (the dense layer
    takes any 4-D shape of its size), bind their steps but make no chain that predict's inputs would
    meet; and the chain quantizes with the model's input (S, Z) as it is at the call, as the steps do."""
    rng = np.random.default_rng(4)
    model = Sequential([Conv2D(4, 2, 3, rng=rng), Flatten(), Dense(2 * 8 * 8, 10, rng=rng)], input_shape=(4, 10, 10))
    qmodel = Q.quantize_model(model, rng.random((8, 4, 10, 10), dtype=np.float32))
    x = rng.random((1, 4, 10, 10), dtype=np.float32)
    q = rng.integers(-128, 128, (1, 6, 18, 4)).astype(np.int8)  # 432 bytes, not 400: conv output 4 x 16 x 2
    np.testing.assert_array_equal(qmodel.forward_int(q), qmodel.forward_int(q, reference=True))
    assert qmodel.chain_for(x.shape) is None
    for _ in range(2):  # bind, then the chain
        np.testing.assert_array_equal(qmodel.predict(x), qmodel.predict(x, reference=True))
    assert qmodel.chain_for(x.shape) is not None
    qmodel.input_q = (qmodel.input_q[0] * 2, qmodel.input_q[1] + 3)
    np.testing.assert_array_equal(qmodel.predict(x), qmodel.predict(x, reference=True))


@pytest.mark.parametrize("name", ["lenet-like", "strided, padded, loose relu", "mlp"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_integer_model_within_quantization_bound_of_float_model(name, per_channel):
    model = small_models(0)[name]
    x = np.random.default_rng(1).random((64, 1, 28, 28), dtype=np.float32)
    qmodel = Q.quantize_model(model, x, per_channel=per_channel)
    logits = qmodel.predict(x)
    np.testing.assert_array_equal(logits, qmodel.predict(x, reference=True))  # Numba == NumPy, bit for bit
    float_logits, bound = error_bound(model, qmodel, x)
    np.testing.assert_allclose(float_logits, model.predict(x), rtol=1e-4, atol=1e-5)
    err = np.abs(logits - float_logits)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound * (1 + 1e-6) + 1e-6), (
        f"int8 logit {logits[worst]} vs float {float_logits[worst]}: error {err[worst]:.3g} > bound {bound[worst]:.3g}")


def test_fused_relu_is_a_clamp_at_the_zero_point():
    model = small_models(0)["lenet-like"]
    x = np.random.default_rng(2).random((16, 1, 28, 28), dtype=np.float32)
    qmodel = Q.quantize_model(model, x)
    conv2 = qmodel.layers[2]
    assert conv2.relu and not qmodel.layers[0].relu
    q = qmodel.quantize_input(x)
    for op in qmodel.layers[:3]:
        q = op.forward(q)
    assert q.min() == conv2.out_q[1]  # the code of 0.0, and nothing below it


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained for one epoch on 2000 images, and test data."""
    x, y, x_test, y_test = minicnn.datasets.load("mnist10k")
    model = small_models(0)["lenet-like"]
    minicnn.fit(model, x[:2000], y[:2000], epochs=1, batch_size=32, verbose=False)
    return model, x[:2000], y[:2000], x_test[:1000], y_test[:1000]


@pytest.mark.parametrize("method", calibration.METHODS)
def test_post_training_quantization_keeps_accuracy(trained, method):
    model, x, _, x_test, y_test = trained
    before = {k: v.copy() for k, v in model.layers[0].params.items()}
    qmodel = Q.quantize_model(model, x[:500], method=method)
    float_acc, int_acc = minicnn.evaluate(model, x_test, y_test), minicnn.evaluate(qmodel, x_test, y_test)
    assert int_acc >= float_acc - 0.01, f"int8 {int_acc:.4f} vs float {float_acc:.4f} ({method})"
    np.testing.assert_array_equal(model.layers[0].params["W"], before["W"])  # the float model is untouched
    assert [r.method for r in qmodel.ranges] == [method] * 4 and "scale" in Q.format_ranges(qmodel.ranges)


def test_percentile_clips_and_ema_lies_inside_minmax(trained):
    model, x, *_ = trained
    full = Q.calibrate(model, x[:512], "minmax")
    for method in ("percentile", "ema"):
        for r, m in zip(Q.calibrate(model, x[:512], method, percentile=99.0), full):
            assert m.lo <= r.lo <= r.hi <= m.hi and (r.seen_lo, r.seen_hi) == (m.lo, m.hi)
    assert Q.calibrate(model, x[:512], "percentile", percentile=99.0)[1].hi < full[1].hi


def test_save_load_round_trip_is_bit_exact(trained, tmp_path):
    model, x, _, x_test, _ = trained
    qmodel = Q.quantize_model(model, x[:300], per_channel=True)
    path = tmp_path / "int8.npz"
    qmodel.save(path)
    loaded = minicnn.load(path)
    assert isinstance(loaded, Q.QuantizedModel)
    np.testing.assert_array_equal(loaded.predict(x_test), qmodel.predict(x_test))
    for a, b in zip(qmodel.layers, loaded.layers):
        for name, arr in a.state().items():
            assert arr.dtype == b.state()[name].dtype
            np.testing.assert_array_equal(arr, b.state()[name])
    with np.load(path) as f:
        stored = sum(f[k].nbytes for k in f.files if k != "meta")
    assert sum(op.stats()["bytes"] for op in loaded.layers) == stored  # the summary reports the real bytes
    assert f"{stored:,}" in loaded.summary() and "IntConv2D" in loaded.summary()


def test_lenet5_file_is_a_quarter_of_float32(tmp_path):
    model = minicnn.zoo.lenet5(seed=0)
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    Q.quantize_model(model, x).save(tmp_path / "int8.npz")
    model.save(tmp_path / "float.npz")
    ratio = (tmp_path / "int8.npz").stat().st_size / (tmp_path / "float.npz").stat().st_size
    assert ratio <= 0.27, f"int8 file is {ratio:.4f} of the float32 file"


def test_quantization_aware_training(trained):
    model, x, y, x_test, y_test = trained
    before = model.layers[0].params["W"].copy()
    qmodel = Q.quantization_aware_training(model, x, y, epochs=1, calibration_size=500, verbose=False)
    np.testing.assert_array_equal(model.layers[0].params["W"], before)
    assert [r.method for r in qmodel.ranges] == ["qat-ema"] * 4
    float_acc, int_acc = minicnn.evaluate(model, x_test, y_test), minicnn.evaluate(qmodel, x_test, y_test)
    assert int_acc >= float_acc - 0.01, f"QAT int8 {int_acc:.4f} vs float {float_acc:.4f}"


def test_fake_quant_weights_forward_and_straight_through_gradient():
    rng = np.random.default_rng(0)
    conv = Conv2D(2, 3, 3, rng=rng).astype(np.float64)
    fq = qat.FakeQuantWeights(conv, per_channel=True)
    q, scales = A.quantize_weights(conv.params["W"], 0)
    plain = Conv2D(2, 3, 3).astype(np.float64)
    plain.params["W"] = q * scales.astype(np.float64)[:, None, None, None]
    plain.params["b"] = conv.params["b"]
    x = rng.standard_normal((2, 2, 6, 6))
    np.testing.assert_allclose(fq.forward(x), plain.forward(x), rtol=1e-12)
    dout = rng.standard_normal((2, 3, 4, 4))
    dx = fq.backward(dout)
    np.testing.assert_allclose(dx, plain.backward(dout), rtol=1e-12)  # gradient at the rounded weights ...
    np.testing.assert_allclose(fq.grads["W"], plain.grads["W"], rtol=1e-12)  # ... applied to the float ones
    # Given the rounded weights the layer is linear in x: its input gradient is exact.
    from gradcheck import numerical_gradient, relative_error
    assert relative_error(dx, numerical_gradient(lambda: fq.forward(x), x, dout)) < 1e-6
    assert fq.release() is conv and conv.params is fq.params


def test_fake_quant_activation_straight_through_inside_the_range():
    fq = qat.FakeQuantActivation(-1.0, 1.0)
    fq.observing = False
    x = np.array([[-3.0, -0.5, 0.0, 0.3, 0.99, 2.0]])  # codes reach 127 * 2/255 = 0.996
    out = fq.forward(x)
    scale, _ = A.activation_qparams(-1, 1)
    assert np.all(np.abs(out[:, 1:5] - x[:, 1:5]) <= scale / 2 + 1e-12)
    np.testing.assert_array_equal(fq.backward(np.ones_like(x)), [[0, 1, 1, 1, 1, 0]])


# --------------------------------------------------------------------------
# Bad input


def test_bad_calibration_data():
    model = small_models(0)["mlp"]
    with pytest.raises(ValueError, match="empty"):
        Q.quantize_model(model, np.zeros((0, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="per-sample shape"):
        Q.quantize_model(model, np.zeros((4, 1, 14, 14), np.float32))
    with pytest.raises(ValueError, match="rank"):
        Q.quantize_model(model, np.zeros((4, 28, 28), np.float32))
    with pytest.raises(TypeError, match="floating"):
        Q.quantize_model(model, np.zeros((4, 1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="unknown calibration method"):
        Q.quantize_model(model, np.ones((4, 1, 28, 28), np.float32), method="kl")


def test_all_constant_activations_have_no_range():
    model = small_models(0)["mlp"]
    with pytest.raises(ValueError, match="input: every calibration value is 0"):
        Q.quantize_model(model, np.zeros((4, 1, 28, 28), np.float32))
    for layer in model.layers:
        for p in layer.params.values():
            p[...] = 0  # a dead network: its hidden activations are all 0
    with pytest.raises(ValueError, match="2: ReLU output: every calibration value is 0"):
        Q.quantize_model(model, np.ones((4, 1, 28, 28), np.float32))


def test_bad_scales_bits_and_layers():
    for scale in (0.0, -1.0, float("nan"), np.array([1.0, 0.0])):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            A.affine_quantize(np.zeros(2), scale, 0)
    W, b = np.ones((3, 2), np.int8), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="weight scales"):
        ops.IntDense(W, np.array([0.1, -0.1], np.float32), b, (0.1, 0), (0.1, 0), False)
    with pytest.raises(ValueError, match="output scale"):
        ops.IntDense(W, np.array([0.1, 0.1], np.float32), b, (0.1, 0), (0.0, 0), False)
    with pytest.raises(ValueError, match="output zero point"):
        ops.IntDense(W, np.array([0.1, 0.1], np.float32), b, (0.1, 0), (0.1, 200), False)
    with pytest.raises(ValueError, match="weight codes"):
        ops.IntDense(np.full((3, 2), -128, np.int8), np.array([0.1, 0.1], np.float32), b, (0.1, 0), (0.1, 0), False)
    for bits in (1, 4, 16, True, "8"):
        with pytest.raises(ValueError, match="unsupported bit width"):
            Q.quantize_model(small_models(0)["mlp"], np.ones((2, 1, 28, 28), np.float32), bits=bits)

    class Odd(ReLU):
        kind = "odd"

    with pytest.raises(ValueError, match="kind 'odd'"):
        calibration.plan(Sequential([Flatten(), Odd(), Dense(784, 10)]))


@pytest.mark.parametrize("damage, message", [
    (lambda a: a.update({"ops.0.W": a["ops.0.W"].astype(np.float32)}), "expected int8 weights"),
    (lambda a: a.pop("ops.0.multiplier"), "missing its 'multiplier'"),
    (lambda a: a.update({"ops.0.b": a["ops.0.b"][:-1]}), "expected int32"),
    (lambda a: a.update({"ops.0.multiplier": a["ops.0.multiplier"] + 1}), "do not match"),
    (lambda a: a.update({"ops.9.W": np.zeros(3, np.int8)}), "unexpected arrays"),
])
def test_a_file_whose_arrays_do_not_match_is_refused(tmp_path, damage, message):
    model = small_models(0)["lenet-like"]
    path = tmp_path / "q.npz"
    Q.quantize_model(model, np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)).save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    damage(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match=message):
        minicnn.load(path)


def test_cli_quantize(tmp_path, capsys):
    from optim.app.cli import main

    src, out = tmp_path / "mlp.npz", tmp_path / "mlp-int8.npz"
    minicnn.zoo.lenet300(seed=0).save(src)
    assert main(["quantize", "--model", str(src), "--bits", "8", "--per-channel", "--calibration", "200",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("Total") == 2 and "zero pt" in text and "IntDense" in text
    accuracy = float(text.rsplit("test accuracy ", 1)[1].split()[0])
    x, y = minicnn.datasets.load()[2:]
    assert abs(minicnn.evaluate(minicnn.load(out), x, y) - accuracy) <= 5e-5
    with pytest.raises(SystemExit):
        main(["quantize", "--model", str(src), "--bits", "4", "--out", str(out)])
    assert "invalid choice: 4" in capsys.readouterr().err


@given(st.integers(1, 200), seeds)
def test_shifted_copies_match_reference(M, seed):
    x = random_codes(np.random.default_rng(seed), (M,))
    expected = windows.shifted_copies_ref(x)
    assert expected.shape == (4, M)
    np.testing.assert_array_equal(expected[1], np.r_[x[1:], 0])  # the copy shifted by a byte
    for build in ("serial", "threaded"):
        with parallel.forced(build):
            np.testing.assert_array_equal(windows.shifted_copies(x), expected, err_msg=build)
    with pytest.raises(ValueError, match="flat bytes"):
        windows.shifted_copies(x.reshape(1, -1))


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 4), st.integers(1, 20), st.integers(1, 8),
       st.integers(1, 8), st.integers(1, 3), seeds)
def test_qgemm_on_one_channel_lines_read_in_place_is_qgemm_on_im2row(N, H, W4, F, KH, KW, stride, seed):
    """Lines read from the shifted copies, those that end their row running into the next row's
    bytes (which meet zero weights), against im2row's rows; rows not of whole words take im2row."""
    W = 4 * W4
    assume(H >= KH and W >= KW)
    rng = np.random.default_rng(seed)
    x, Wq = random_codes(rng, (N, H, W, 1)), random_codes(rng, (F, 1, KH, KW), -127)
    assert windows.line_fits_words(x.shape, KW, 0) and not windows.line_fits_words(x.shape, KW, 1)
    assert not windows.line_fits_words((N, H, W + 1, 1), KW, 0)
    rows = windows.im2row_nhwc_ref(x, KH, KW, stride, 0, 0, KH * KW)
    assert_qgemm_on_words_is_qgemm_on_rows(lambda pool: windows.line_words(K.unsigned(x), KH, KW, stride, pool),
                                           windows.line_weights(Wq), rows, Wq.transpose(0, 2, 3, 1).reshape(F, -1),
                                           rng, (N, (H - KH) // stride + 1, (W - KW) // stride + 1))


@pytest.mark.parametrize("build, vnni", [(AVX2_ONLY, False), (AVX_VNNI, True)], ids=["avx2", "avx-vnni"])
def test_int8_lenet_without_avx512_matches_the_references(build, vnni):
    """Without AVX-512: windows read in place (conv1's shifted copies, conv2's 20 channels), the GEMM
    with its pool and requantization (16 lanes in two registers) in both builds, the narrow kernel of
    the classifiers, bit for bit with the NumPy references; without VNNI (the products spelled out),
    and with AVX-VNNI (two 256-bit vpdpbusd per 16 lanes), where the CPU can run it. At batch 1, the
    same as one Chain; the seed CNN at 37 images (its classifier narrow; without AVX-512, no groups)."""
    if vnni and "avxvnni" not in simd.host_features():
        pytest.skip("this CPU has no AVX-VNNI (VEX-encoded vpdpbusd): that build cannot run here")
    run_without_avx512(
        "import numpy as np\n"
        "from minicnn import parallel, zoo\n"
        "from optim.quantization import quantize_model, vectors\n"
        f"assert vectors.HAS_VNNI == {vnni} and not vectors.HAS_VNNI_512\n"
        "x = np.random.default_rng(1).random((37, 1, 28, 28), dtype=np.float32)\n"
        "s = quantize_model(zoo.build('seed_cnn', seed=0), x, per_channel=True)\n"
        "assert np.array_equal(s.predict(x), s.predict(x, reference=True))  # steps (no groups), the narrow dense\n"
        "x = x[:9]\n"
        "q = quantize_model(zoo.build('lenet5', seed=0), x, per_channel=True)\n"
        "for build in ('serial', 'threaded'):\n"
        "    with parallel.forced(build):\n"
        "        assert np.array_equal(q.predict(x), q.predict(x, reference=True)), build\n"
        "x = x[:1]\n"
        "expected = q.predict(x, reference=True)\n"
        "assert np.array_equal(q.predict(x), expected) and q.chain_for(x.shape).runs()\n"
        "assert np.array_equal(q.predict(x), expected)  # the chain\n"
        "print('ok')\n", build)


def test_requantize16_without_avx512_is_the_numpy_arithmetic():
    """The AVX2 build's requantization (its 64-bit lanes in four registers, arithmetic shifts spelled
    out): every shift, then right shifts only (the table's short path), exact ties of both roundings,
    saturating left shifts and the int32 extremes, with and without a clamp that skips the correction
    of negative results."""
    run_without_avx512(
        "import numba, numpy as np\n"
        "from optim.quantization import fixedpoint as FP, vectors as V\n"
        "@numba.njit\n"
        "def lanes(x, table, z, lo, hi):\n"
        "    out = np.empty(x.size, np.int32)\n"
        "    for i in range(0, x.size, 16):\n"
        "        V.store16(out, i, V.requantize16(V.load16(x, i), table, i, z, lo, hi))\n"
        "    return out\n"
        "rng = np.random.default_rng(0)\n"
        "n = 16 * 1024\n"
        "shift = rng.integers(-31, 31, n).astype(np.int8)\n"
        "m0 = rng.integers(0, 2**31, n).astype(np.int32)\n"
        "x = (rng.integers(-2**31, 2**31, n) >> rng.integers(0, 32, n)).astype(np.int32)\n"
        "tie, e = rng.random(n) < 0.3, rng.integers(1, 20, n)\n"
        "m0, shift = np.where(tie, 2**30, m0).astype(np.int32), np.where(tie, -e, shift).astype(np.int8)\n"
        "m0 = np.where(shift > 0, m0 | 2**30, m0).astype(np.int32)  # quantize_multiplier's where it shifts left\n"
        "x = np.where(tie, ((2 * rng.integers(-1000, 1000, n) + 1) << e) + rng.integers(-1, 2, n), x)\n"
        "x = x.astype(np.int32)\n"
        "x[:6] = [-2**31, 2**31 - 1, 0, -1, 1, -2**31 + 1]\n"
        "L = V.CLAMP_LIMIT\n"
        "for right in (False, True):  # every shift, or right shifts only: the table's short path\n"
        "    s = -1 - np.abs(shift + 1) % 31 if right else shift\n"
        "    bias = (rng.integers(-2**20, 2**20, n) * right).astype(np.int32)  # the short path with a bias\n"
        "    v = (np.clip(x.astype(np.int64) + bias, -2**31, 2**31 - 1) - bias).astype(np.int32)  # v + bias: int32\n"
        "    ref = FP.multiply_by_quantized_multiplier(v.astype(np.int64) + bias, m0, s)\n"
        "    table = V.requantization_table(m0, s, bias)\n"
        "    assert (table.reshape(-1, 64)[:, 56] == 0).all() == right\n"
        "    assert np.array_equal(lanes(v, table, 0, -L, L), np.clip(ref, -L, L))\n"
        "    assert np.array_equal(lanes(v, table, 3, 3, 130), np.clip(ref + 3, 3, 130))  # a fused ReLU\n"
        "print('ok')\n")


def test_weights_packed_for_another_cpu_are_refused():
    """The layout of pack_weights depends on VNNI: weights packed on one CPU (an op pickled there)
    and run on another would give wrong sums, so the kernels refuse them, naming why."""
    packed = K.pack_weights(np.ones((3, 8), np.int8))
    assert packed.vnni == V.HAS_VNNI
    foreign = packed._replace(vnni=not packed.vnni)
    with pytest.raises(ValueError, match="pack them again"):
        K.qgemm_runner(np.zeros(1, np.int64), np.arange(2), foreign, K.int32_epilogue(foreign, np.zeros(3, np.int32), 0))


@given(st.integers(-128, 127), seeds)
def test_pass_through_steps_on_bytes_are_their_ops_on_codes(zero_point, seed):
    """An IntReLU's and an IntMaxPool2D's bound steps on the kernels' bytes give the bytes of what the
    ops give on the codes; after a last layer, on int32 sums, the sums' own maximum."""
    q = np.random.default_rng(seed).integers(-128, 128, (2, 4, 4, 3)).astype(np.int8)
    for op in (ops.IntReLU((0.5, zero_point)), ops.IntMaxPool2D((0.5, zero_point), 2, 2)):
        np.testing.assert_array_equal(K.signed(op.bind(q.shape)(K.unsigned(q))), op.forward(q, reference=True))
    sums = q.astype(np.int32) * 1000
    np.testing.assert_array_equal(ops.IntReLU((0.5, 0)).bind(sums.shape)(sums), np.maximum(sums, 0))


@given(st.lists(st.integers(-128, 127), min_size=1, max_size=64))
def test_unsigned_bytes_keep_the_codes_and_their_order(values):
    """The kernels' bytes q + 128 round-trip to the codes, and sort as the codes do (max-pooling and
    ReLU's max run on them unchanged)."""
    q = np.array(values, np.int8)
    u = K.unsigned(q)
    assert u.dtype == np.uint8
    np.testing.assert_array_equal(u.astype(np.int64), q.astype(np.int64) + 128)
    np.testing.assert_array_equal(K.signed(u), q)
    np.testing.assert_array_equal(np.argsort(u, kind="stable"), np.argsort(q, kind="stable"))


def force_spelling(monkeypatch, spelling):
    """vectors' flags as a CPU of that spelling has them (skipped where this one cannot run it), for the
    functions compiled next; returns whether it has VNNI."""
    vnni, wide = spelling != "portable", spelling == "vnni512"
    if (wide and not V.HAS_VNNI_512) or (vnni and not V.HAS_VNNI):
        pytest.skip(f"this CPU cannot run the {spelling} spelling")
    monkeypatch.setattr(V, "HAS_VNNI", vnni)
    monkeypatch.setattr(V, "HAS_VNNI_512", wide)
    return vnni


@pytest.mark.parametrize("spelling", ["vnni512", "vnni256", "portable"])
def test_dot4_add_every_spelling(monkeypatch, spelling):
    """The 512-bit VNNI instruction, two 256-bit ones (AVX-VNNI without AVX-512) and the portable
    widening arithmetic give the same exact sums, each on pack_weights' layout for it (without VNNI,
    the 64 bytes are ordered (j // 2, l, j % 2)).

    The flags are read when a function using dot4_add is compiled, so a fresh function compiled
    with them forced off exercises the path such a CPU runs.
    """
    vnni = force_spelling(monkeypatch, spelling)

    @numba.njit
    def one_step(x_word, wp):
        out = np.empty(16, np.int32)
        V.store16(out, 0, V.dot4_add(V.zeros16(), x_word, wp, 0))
        return out

    rng = np.random.default_rng(1)
    u = rng.integers(0, 256, 4).astype(np.uint8)
    wp = rng.integers(-128, 128, 64).astype(np.int8)
    x_word = np.uint32(int.from_bytes(u.tobytes(), "little"))
    w = wp.reshape(16, 4) if vnni else wp.reshape(2, 16, 2).transpose(1, 0, 2).reshape(16, 4)  # w[l, j]
    expected = (u.astype(np.int64)[None, :] * w.astype(np.int64)).sum(axis=1)
    np.testing.assert_array_equal(one_step(x_word, wp), expected)


@pytest.mark.parametrize("spelling", ["vnni512", "vnni256", "portable"])
def test_dot64_add_and_sum16_every_spelling(monkeypatch, spelling):
    """A row's 64 bytes against a filter's, by each spelling of dot64_add (the portable one sums in other
    lanes): sum16 of the lanes is the exact dot product, extremes included (as test_dot4_add_every_spelling)."""
    force_spelling(monkeypatch, spelling)

    @numba.njit
    def dot(x32, xi, wd, wi):
        return V.sum16(V.dot64_add(V.dot64_add(V.zeros16(), x32, xi, wd, wi), x32, xi + 16, wd, wi + 64))

    rng = np.random.default_rng(2)
    u, w = rng.integers(0, 256, 136).astype(np.uint8), rng.integers(-127, 128, 136).astype(np.int8)
    u[4:68], w[8:72] = 255, -127  # the largest products, all of one sign
    expected = int(u[4:132].astype(np.int64) @ w[8:136].astype(np.int64))
    assert dot(u.view(np.uint32), 1, w, 8) == expected
    np.testing.assert_array_equal(V._sum16_python(V._dot64_add_python(np.zeros(16, np.int32), u.view(np.uint32), 1,
                                                                      w, 8)), int(u[4:68].astype(np.int64) @ w[8:72]))


def test_narrow_weights_and_when_qgemm_runs_them():
    """pack_narrow: whole chunks of 64 bytes of at most 12 filters, an even number of them; qgemm runs the
    narrow kernel on rows of whole runs of words, without a pool window."""
    wt = np.arange(-60, 60, dtype=np.int8).reshape(3, 40).repeat(4, axis=1)[:, :130]  # K = 130: 33 words, 2 chunks
    wd = narrow.pack_narrow(wt)
    assert wd.shape == (4, 128) and np.array_equal(wd[:3], wt[:, :128]) and not wd[3].any()
    assert narrow.pack_narrow(np.ones((13, 130), np.int8)).size == 0  # a 13th filter: qgemm's lanes are full enough
    assert narrow.pack_narrow(np.ones((3, 60), np.int8)).size == 0  # 15 words: no whole chunk
    packed = K.pack_weights(wt)
    assert K.uses_narrow(packed, np.arange(33), 1)
    assert not K.uses_narrow(packed, np.arange(33), 4) and not K.uses_narrow(packed, np.arange(33) * 2, 1)
