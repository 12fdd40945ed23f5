"""Affine quantization of tensors to int8 (Jacob et al., CVPR 2018, section 2.1).

A real r is represented by an integer code q:

    r = S (q - Z),   q = clamp(round(r / S) + Z, qmin, qmax)

* activations: int8 [-128, 127], one (S, Z) per tensor. The range [lo, hi]
  chosen by calibration is widened to contain 0, S = (hi - lo) / 255 and
  Z = round(-128 - lo / S), so the real 0 (zero padding, ReLU) is a code;
* weights: int8 [-127, 127], symmetric (Z = 0), S_w = max|W| / 127 per output
  channel or for the whole tensor;
* biases: int32 with S_b = S_in S_w and Z_b = 0, so that they add directly to
  the int32 sums of products of input and weight codes.
"""

import numba
import numpy as np
from numba import prange

from minicnn.parallel import twin

from .fixedpoint import INT32_MAX, INT32_MIN

QMIN, QMAX = -128, 127  # int8 activation codes
WMAX = 127  # weights are symmetric in [-127, 127], so -w is always a code too
SUPPORTED_BITS = (8,)


def check_bits(bits):
    """bits as an int; raises unless it is a supported width (8)."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: int8 quantization supports bits in {SUPPORTED_BITS}")
    return int(bits)


def check_scale(scale, name="scale"):
    """A scale must be finite and > 0 (every entry, for per-channel scales); returns it as float64."""
    s = np.asarray(scale, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
    return s


def check_zero_point(zero_point, name="zero point"):
    """zero_point unchanged if it is an int8 code, else ValueError."""
    if not QMIN <= zero_point <= QMAX:
        raise ValueError(f"{name} must lie in [{QMIN}, {QMAX}], got {zero_point}")
    return zero_point


def affine_quantize(r, scale, zero_point, qmin=QMIN, qmax=QMAX):
    """int8 codes q = clamp(round(r / S) + Z, qmin, qmax) (round half to even), shaped like r.

    r float array; scale (> 0) and zero_point broadcast against r.
    Inside [S (qmin - Z), S (qmax - Z)] the error |S (q - Z) - r| is <= S / 2;
    outside, q saturates at qmin or qmax.
    """
    s = check_scale(scale)
    q = np.rint(np.asarray(r, dtype=np.float64) / s) + zero_point
    return np.clip(q, qmin, qmax).astype(np.int8)


def affine_dequantize(q, scale, zero_point):
    """Reals S (q - Z), float64, of integer codes q (scale and zero_point broadcast against q)."""
    return check_scale(scale) * (np.asarray(q, dtype=np.float64) - zero_point)


def activation_qparams(lo, hi, name="activation"):
    """(S float, Z int) of an int8 tensor whose reals span [lo, hi], widened to contain 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name}: range [{lo}, {hi}] is not finite")
    if hi - lo <= 0:
        raise ValueError(
            f"{name}: every calibration value is 0 (zero range), so no scale can be chosen; "
            "calibrate on representative data"
        )
    scale = (hi - lo) / (QMAX - QMIN)
    zero_point = int(np.clip(np.rint(QMIN - lo / scale), QMIN, QMAX))
    return scale, zero_point


def quantize_weights(W, axis, per_channel=True):
    """(q int8 like W, scales float32 (F,)): symmetric, F = W.shape[axis] output channels.

    Per tensor, all F scales are equal. An all-zero channel (a pruned filter)
    has codes 0 whatever its scale; it gets the largest scale of the tensor.
    """
    F = W.shape[axis]
    absmax = np.abs(np.moveaxis(W, axis, 0).reshape(F, -1)).max(axis=1).astype(np.float64)
    if not per_channel:
        absmax[:] = absmax.max()
    fallback = absmax.max() if absmax.max() > 0 else 1.0
    scales = (np.where(absmax > 0, absmax, fallback) / WMAX).astype(np.float32)
    shape = [1] * W.ndim
    shape[axis] = F
    return affine_quantize(W, scales.reshape(shape), 0, -WMAX, WMAX), scales


def quantize_bias(b, scale):
    """int32 (F,) round(b / scale), saturating; b float (F,), scale = S_in * S_w per channel."""
    q = np.rint(np.asarray(b, dtype=np.float64) / check_scale(scale, "bias scale"))
    return np.clip(q, INT32_MIN, INT32_MAX).astype(np.int32)


# --------------------------------------------------------------------------
# The model's input: float (N, C, H, W) to int8 codes in NHWC, in one pass


def quantize_nhwc_ref(x, scale, zero_point):
    """int8 (N, H, W, C) = affine_quantize(x, scale, zero_point) of x float (N, C, H, W), transposed."""
    return np.ascontiguousarray(affine_quantize(x, scale, zero_point).transpose(0, 2, 3, 1))


@numba.njit(inline="always", cache=True)
def _code(v, scale, zero_point, offset):
    """affine_quantize's arithmetic on one value: float64, round half to even, clamp; plus offset."""
    return np.int64(min(max(np.rint(np.float64(v) / scale) + zero_point, QMIN), QMAX)) + offset


# The division is most of the pass's time (seed CNN, batch 256: 45 us with it, 28 without). A float32
# product y = v * fl32(1/S) is close to the float64 quotient d = fl64(v / S) that affine_quantize
# rounds: three float32 roundings (of 1/S, of a float64 v, of the product) err by 2^-24 each, so
# where |v / S| <= 512, |y - d| < 512 * 3.1 * 2^-24 < 2^-13. Hence rint(y) = rint(d) wherever y lies
# within 1/2 - 2^-12 of an integer (then |d - rint(y)| < 1/2), and past 511 both saturate (|Z| <= 128).
# A run of values (an image, or a row of one channel) with one near a half is redone by the division:
# never where the values are codes' reals (MNIST's k / 255 with S = 1 / 255), one value in 2,000
# of continuous ones (a third of 784-pixel images). The products err by 2^-150 at most in absolute
# terms (subnormals), far below 2^-13, if 1/S is a normal float32: other scales, and zero points
# outside int8, always divide. (x is finite: NaN has no code, and predict refuses it.)
NEAR_HALF = np.float32(0.5 - 2.0**-12)
FAST_SCALES = (2.0**-100, 2.0**100)


@numba.njit(inline="always", cache=True)
def _quantize_run(xf, of, src, dst, count, step, scale, zero_point, offset):
    """of[dst + j step] = _code(xf[src + j]) for j < count, by the float32 product where it is exact.
    xf float32 or float64 and of int8 or uint8 (the codes plus offset), both flat."""
    inv, z = np.float32(1.0 / scale), np.float32(zero_point + offset)
    lo, hi = np.float32(QMIN + offset), np.float32(QMAX + offset)  # all float32: 16 lanes to a vector
    fast = FAST_SCALES[0] <= scale <= FAST_SCALES[1] and QMIN <= zero_point <= QMAX
    near = np.float32(0)  # a count: summed in any order (the twin's fastmath "reassoc"), it is 0 or not
    if fast:
        for j in range(count):
            y = np.float32(xf[np.uint64(src + j)]) * inv
            r = np.rint(y)
            near += np.float32(abs(y - r) > NEAR_HALF)  # false for y = inf (nan): it saturates as d does
            of[np.uint64(dst + j * step)] = np.int32(min(max(r + z, lo), hi))
    if near or not fast:
        for j in range(count):
            of[np.uint64(dst + j * step)] = _code(xf[np.uint64(src + j)], scale, zero_point, offset)


def _quantize_nhwc_loops(x, scale, zero_point, offset, out):
    N, C, H, W = x.shape
    xf, of = x.reshape(-1), out.reshape(-1)
    if C == 1:  # the two layouts are one: an image is one flat run, 16 products to a vector
        for n in prange(N):
            _quantize_run(xf, of, n * H * W, n * H * W, H * W, 1, scale, zero_point, offset)
        return out
    for t in prange(N * H):
        n, i = t // H, t % H
        for c in range(C):
            _quantize_run(xf, of, ((n * C + c) * H + i) * W, t * W * C + c, W, C, scale, zero_point, offset)
    return out


_quantize_nhwc = twin(_quantize_nhwc_loops, fastmath={"reassoc"})  # no sum to reorder but near's
quantize_nhwc_serial = _quantize_nhwc.serial  # its serial build, for compiled callers (chain.py)


def quantize_nhwc(x, scale, zero_point, unsigned=False):
    """Fast quantize_nhwc_ref, bit for bit (x a 4-D float array; other than float32, read as float64,
    which is what affine_quantize computes in); unsigned=True: the codes plus 128, uint8 (the
    bytes the int8 kernels read, `kernels.unsigned`)."""
    x = np.ascontiguousarray(x, dtype=x.dtype if x.dtype == np.float32 else np.float64)
    N, C, H, W = x.shape
    out = np.empty((N, H, W, C), np.uint8 if unsigned else np.int8)
    return _quantize_nhwc(quantize_work(x.shape), x, float(scale), int(zero_point), 128 if unsigned else 0, out)


def quantize_work(x_shape):
    """quantize_nhwc's work on inputs of x_shape, in minicnn.parallel's unit for it: elements read and
    written (break-even MIN_OUTPUTS)."""
    return 2 * int(np.prod(x_shape))
