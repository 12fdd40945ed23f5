"""Int8 quantization with integer-only inference (Jacob et al., "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018), with the TFLite / gemmlowp arithmetic.

Affine quantization maps a real r to an integer code q:

    r = S (q - Z),   q = clamp(round(r / S) + Z, qmin, qmax)

* activations: int8 [-128, 127], one (S, Z) per tensor. The range [lo, hi]
  chosen by calibration is widened to contain 0, S = (hi - lo) / 255 and
  Z = round(-128 - lo / S), so the real 0 (zero padding, ReLU) is a code;
* weights: int8 [-127, 127], symmetric (Z = 0), S_w = max|W| / 127 per output
  channel or for the whole tensor;
* biases: int32 with S_b = S_in S_w and Z_b = 0.

One output of a conv or dense layer is then (the paper's eq. 7 with Z_w = 0)

    r_out = S_in S_w (sum_k (q_k - Z_in) w_k + q_b)
    q_out = Z_out + M (sum_k q_k w_k  +  q_b - Z_in sum_k w_k),   M = S_in S_w / S_out

The column sums sum_k w_k are constants, so q_b - Z_in sum_k w_k is folded
into one int32 bias when the layer is built and the inner loop is a plain
int8 dot product accumulated in int32. M, a real number, is applied as a
fixed-point multiplier M0 2^(shift - 31) with TFLite's rounding
(optim.intkernels). A following ReLU is the clamp q_out >= Z_out, and max-
pooling works on the codes directly (requantization is monotone). Floats
appear only at the model's input (quantized once) and output: the last
layer's int32 accumulators, dequantized once with S_in S_w.

Calibration picks each activation range on a representative batch: the
min/max over all of it, an exponential moving average of per-batch min/max
(the paper's choice during training), or per-batch percentiles averaged
(clipping rare outliers to spend the 256 codes on the bulk).

Quantization-aware training (the paper's section 3) fine-tunes the float
model with weights and activations rounded to their int8 grids in the
forward pass ("fake quantization") and the straight-through estimator in
the backward pass: d round(x) / dx := 1 inside the range, 0 outside.
"""

from dataclasses import dataclass

import numpy as np

from minicnn.checks import check_array, check_positive_int
from minicnn.layers import Layer
from minicnn.model import Sequential
from minicnn.optimizers import Adam
from minicnn.serialization import write_npz
from minicnn.summary import format_summary
from minicnn.training import fit

from . import intkernels as K

QMIN, QMAX = -128, 127  # int8 activation codes
WMAX = 127  # weights are symmetric in [-127, 127], so -w is always a code too
SUPPORTED_BITS = (8,)
METHODS = ("minmax", "ema", "percentile")
MODEL_KIND = "quantized_int8"


# --------------------------------------------------------------------------
# Affine quantization of tensors


def check_bits(bits):
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: int8 quantization supports bits in {SUPPORTED_BITS}")
    return int(bits)


def check_scale(scale, name="scale"):
    """A scale must be finite and > 0 (every entry, for per-channel scales)."""
    s = np.asarray(scale, dtype=np.float64)
    if s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"{name} must be finite and > 0, got {scale!r}")
    return s


def check_zero_point(zero_point, name="zero point"):
    if not QMIN <= zero_point <= QMAX:
        raise ValueError(f"{name} must lie in [{QMIN}, {QMAX}], got {zero_point}")
    return zero_point


def affine_quantize(r, scale, zero_point, qmin=QMIN, qmax=QMAX):
    """int8 codes q = clamp(round(r / S) + Z, qmin, qmax) (round half to even).

    r float array; scale (> 0) and zero_point broadcast against r.
    Inside [S (qmin - Z), S (qmax - Z)] the error |S (q - Z) - r| is <= S / 2;
    outside, q saturates at qmin or qmax.
    """
    s = check_scale(scale)
    q = np.rint(np.asarray(r, dtype=np.float64) / s) + zero_point
    return np.clip(q, qmin, qmax).astype(np.int8)


def affine_dequantize(q, scale, zero_point):
    """Reals S (q - Z), float64."""
    return check_scale(scale) * (np.asarray(q, dtype=np.float64) - zero_point)


def activation_qparams(lo, hi, name="activation"):
    """(S, Z) of an int8 tensor whose reals span [lo, hi], widened to contain 0."""
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
    """int32 round(b / scale), saturating; scale = S_in * S_w per channel."""
    q = np.rint(np.asarray(b, dtype=np.float64) / check_scale(scale, "bias scale"))
    return np.clip(q, K.INT32_MIN, K.INT32_MAX).astype(np.int32)


# --------------------------------------------------------------------------
# Which layers become which integer ops


def plan(model):
    """The integer graph of a Sequential: a list of (op, first layer index, fused ReLU).

    op is "compute" (Conv2D or Dense, with the ReLU right after it fused as a
    clamp), "maxpool2d", "flatten" or "relu". Raises for any other layer.
    """
    steps, layers, i = [], model.layers, 0
    while i < len(layers):
        kind = getattr(layers[i], "kind", None)
        if kind in ("conv2d", "dense"):
            relu = i + 1 < len(layers) and getattr(layers[i + 1], "kind", None) == "relu"
            steps.append(("compute", i, relu))
            i += 1 + relu
        elif kind in ("maxpool2d", "flatten", "relu"):
            steps.append((kind, i, False))
            i += 1
        else:
            raise ValueError(
                f"layer {i} ({type(layers[i]).__name__}, kind {kind!r}) cannot be quantized to int8: "
                "supported are conv2d, dense, relu, maxpool2d, flatten"
            )
    if not any(op == "compute" for op, _, _ in steps):
        raise ValueError("the model has no Conv2D or Dense layer to quantize")
    return steps


def _observed_points(steps):
    """Layer index after which each activation is quantized: every compute step's
    output (after its fused ReLU) except the last step's, which stays int32."""
    return [i + relu for n, (op, i, relu) in enumerate(steps) if op == "compute" and n < len(steps) - 1]


# --------------------------------------------------------------------------
# Calibration


@dataclass
class ActivationRange:
    """The range chosen for one quantized activation, and what calibration saw."""

    name: str
    lo: float
    hi: float
    seen_lo: float
    seen_hi: float
    method: str


def check_calibration_data(model, x):
    check_array(x, "calibration data", ndim=1 + len(model.input_shape))
    if x.shape[1:] != model.input_shape:
        raise ValueError(f"calibration data has per-sample shape {x.shape[1:]}, the model expects {model.input_shape}")
    if len(x) == 0:
        raise ValueError("calibration data is empty: give at least one sample")
    return x


def _reduce(batch_stats, method, momentum):
    """(lo, hi) from per-batch rows (min, max, low percentile, high percentile)."""
    s = np.asarray(batch_stats)
    if method == "minmax":
        return s[:, 0].min(), s[:, 1].max()
    if method == "percentile":
        return s[:, 2].mean(), s[:, 3].mean()
    lo, hi = s[0, 0], s[0, 1]
    for mn, mx in s[1:, :2]:
        lo, hi = momentum * lo + (1 - momentum) * mn, momentum * hi + (1 - momentum) * mx
    return lo, hi


def calibrate(model, x, method="minmax", percentile=99.99, momentum=0.9, batch_size=256):
    """Ranges of the model's input and of every activation the integer model quantizes.

    model: a float Sequential; x (N, *input_shape) float, representative data.
    method: "minmax", "ema" (momentum per batch) or "percentile" (the
    [100 - p, p] percentiles of each batch, averaged). Returns a list of
    ActivationRange: the input first, then each quantized layer output.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if not 50 < percentile <= 100:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    check_calibration_data(model, x)
    batch_size = check_positive_int(batch_size, "batch_size")
    points = _observed_points(plan(model))
    names = ["input"] + [f"{i}: {type(model.layers[i]).__name__} output" for i in points]
    stats = [[] for _ in names]

    def observe(slot, a):
        tails = np.percentile(a, [100 - percentile, percentile]) if method == "percentile" else (0, 0)
        stats[slot].append((a.min(), a.max(), *tails))

    for start in range(0, len(x), batch_size):
        a = x[start : start + batch_size]
        observe(0, a)
        for i, layer in enumerate(model.layers[: points[-1] + 1] if points else []):
            a = layer.forward(a)
            if i in points:
                observe(1 + points.index(i), a)
    for layer in model.layers:
        layer.cache = None
    ranges = []
    for name, s in zip(names, stats):
        lo, hi = _reduce(s, method, momentum)
        seen = np.asarray(s)
        ranges.append(ActivationRange(name, float(lo), float(hi), float(seen[:, 0].min()),
                                      float(seen[:, 1].max()), method))
    return ranges


def format_ranges(ranges):
    """The calibration report: one line per quantized activation."""
    lines = [f"{'activation':<24}{'method':>11}{'seen min':>11}{'seen max':>11}{'lo':>10}{'hi':>10}"
             f"{'scale':>12}{'zero pt':>8}"]
    for r in ranges:
        scale, zp = activation_qparams(r.lo, r.hi, r.name)
        lines.append(f"{r.name:<24}{r.method:>11}{r.seen_lo:>11.4f}{r.seen_hi:>11.4f}{r.lo:>10.4f}"
                     f"{r.hi:>10.4f}{scale:>12.6f}{zp:>8d}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Integer ops. Activations between them are int8 NHWC (N, H, W, C) or (N, F).


class _IntLinear:
    """Shared part of IntConv2D and IntDense: int8 rows times int8 weights, int32
    accumulators, then either requantized to int8 or (last layer) kept int32.

    W int8 in the float layer's layout; w_scale float32 (F,); b int32 (F,);
    multiplier int32 and shift int8 (F,) (absent for int32 output).
    in_q = (S_in, Z_in); out_q = (S_out, Z_out), or None for int32 output.
    """

    def __init__(self, W, w_scale, b, in_q, out_q, relu, multiplier=None, shift=None):
        self.W, self.w_scale, self.b = W, w_scale, b
        self.in_q, self.relu = (float(in_q[0]), int(in_q[1])), bool(relu)
        self.out_q = None if out_q is None else (float(out_q[0]), int(out_q[1]))
        check_scale(self.in_q[0], "input scale")
        check_scale(w_scale, "weight scales")
        check_zero_point(self.in_q[1], "input zero point")
        if W.size and W.min() < -WMAX:
            raise ValueError(f"{type(self).__name__}: weight codes must lie in [-{WMAX}, {WMAX}], got {W.min()}")
        if self.out_q is not None:
            check_scale(self.out_q[0], "output scale")
            check_zero_point(self.out_q[1], "output zero point")
            expected = [K.quantize_multiplier(m) for m in self.real_multipliers()]
            if multiplier is None:
                multiplier = np.array([m for m, _ in expected], dtype=np.int32)
                shift = np.array([s for _, s in expected], dtype=np.int8)  # in [-31, 30]
            elif not (np.array_equal(multiplier, [m for m, _ in expected])
                      and np.array_equal(shift, [s for _, s in expected])):
                raise ValueError(f"{type(self).__name__}: multipliers do not match S_in * S_w / S_out")
        self.multiplier, self.shift = multiplier, shift
        wt = self.kernel_weights()
        colsum = wt.astype(np.int64).sum(axis=1)
        folded = b.astype(np.int64) - self.in_q[1] * colsum  # the paper's Z_in * a2 term, once
        worst = wt.shape[1] * 128 * WMAX + np.abs(folded).max(initial=0)
        if worst > K.INT32_MAX or wt.shape[1] > K.MAX_K:
            raise ValueError(f"{type(self).__name__}: int32 accumulators could overflow "
                             f"({wt.shape[1]} products per output, bias up to {np.abs(folded).max()})")
        self.wt = K.pad_columns(wt, K.padded_width(wt.shape[1]))
        self.packed = K.pack_weights(self.wt)
        self.folded_bias = folded.astype(np.int32)

    def real_multipliers(self):
        """M = S_in S_w / S_out per output channel, computed from the stored float32 scales."""
        return self.in_q[0] * self.w_scale.astype(np.float64) / self.out_q[0]

    @property
    def output_scale(self):
        """(scale per channel, zero point) of this op's output codes."""
        if self.out_q is None:
            return self.in_q[0] * self.w_scale.astype(np.float64), 0
        return self.out_q

    def matmul(self, rows, reference=False):
        """rows int8 (M, K) -> int8 (M, F) requantized, or int32 (M, F) for the last layer."""
        if self.out_q is None:
            lo = 0 if self.relu else K.INT32_MIN
            fn = K.qgemm_int32_ref if reference else K.qgemm_int32
            return fn(rows, self.wt if reference else self.packed, self.folded_bias, lo)
        z = self.out_q[1]
        lo = z if self.relu else QMIN  # ReLU: the real 0 is the code Z_out
        fn = K.qgemm_ref if reference else K.qgemm
        return fn(rows, self.wt if reference else self.packed, self.folded_bias, self.multiplier, self.shift,
                  z, lo, QMAX)

    def stats(self):
        arrays = self.state().values()
        params = self.W.size + self.b.size
        nbytes = sum(a.nbytes for a in arrays)
        return {"params": params, "nonzero": int(np.count_nonzero(self.W) + np.count_nonzero(self.b)),
                "bits_per_weight": 8.0 * nbytes / params, "bytes": nbytes}

    def state(self):
        arrays = {"W": self.W, "w_scale": self.w_scale, "b": self.b}
        if self.out_q is not None:
            arrays.update(multiplier=self.multiplier, shift=self.shift)
        return arrays

    def _base_config(self):
        return {"relu": self.relu, "out_scale": None if self.out_q is None else self.out_q[0],
                "out_zero_point": None if self.out_q is None else self.out_q[1]}

    @classmethod
    def _arrays(cls, config, arrays, in_q):
        """Check the stored arrays against each other and the config; return the
        constructor's keyword arguments."""
        W = arrays.get("W")
        if W is None or W.dtype != np.int8 or W.ndim != cls.weight_ndim:
            got = "nothing" if W is None else f"{W.dtype} {W.shape}"
            raise ValueError(f"{cls.kind} op 'W': expected int8 weights of rank {cls.weight_ndim}, got {got}")
        F = W.shape[cls.out_axis]
        spec = {"w_scale": (np.float32, (F,)), "b": (np.int32, (F,))}
        int32_out = config["out_scale"] is None
        if not int32_out:
            spec.update(multiplier=(np.int32, (F,)), shift=(np.int8, (F,)))
        for name, (dtype, shape) in spec.items():
            a = arrays.get(name)
            if a is None:
                raise ValueError(f"{cls.kind} op is missing its {name!r} array")
            if a.dtype != dtype or a.shape != shape:
                raise ValueError(f"{cls.kind} op {name!r}: expected {np.dtype(dtype)} {shape} "
                                 f"for {F} output channels, got {a.dtype} {a.shape}")
        out_q = None if int32_out else (config["out_scale"], config["out_zero_point"])
        return dict(W=arrays["W"], w_scale=arrays["w_scale"], b=arrays["b"],
                    in_q=in_q, out_q=out_q, relu=config["relu"],
                    multiplier=arrays.get("multiplier"), shift=arrays.get("shift"))


class IntConv2D(_IntLinear):
    """Integer convolution: int8 (N, H, W, C) -> int8 (N, Ho, Wo, F) or int32 accumulators."""

    kind = "conv2d"
    weight_ndim, out_axis = 4, 0

    def __init__(self, W, w_scale, b, in_q, out_q, relu, stride, padding, multiplier=None, shift=None):
        self.stride, self.padding = check_positive_int(stride, "stride"), check_positive_int(padding, "padding", 0)
        super().__init__(W, w_scale, b, in_q, out_q, relu, multiplier, shift)

    def kernel_weights(self):
        """wt (F, KH*KW*C): the columns in im2row_nhwc's (kh, kw, c) order (before padding)."""
        F = self.W.shape[0]
        return np.ascontiguousarray(self.W.transpose(0, 2, 3, 1).reshape(F, -1))

    def forward(self, x, reference=False):
        N, H, W, _ = x.shape
        F, _, KH, KW = self.W.shape
        im2row = K.im2row_nhwc_ref if reference else K.im2row_nhwc
        rows = im2row(x, KH, KW, self.stride, self.padding, self.in_q[1], self.wt.shape[1])  # pad with the code of 0
        Ho = K.conv_output_size(H, KH, self.stride, self.padding)
        Wo = K.conv_output_size(W, KW, self.stride, self.padding)
        return self.matmul(rows, reference).reshape(N, Ho, Wo, F)

    def output_shape(self, in_shape):
        F, C, KH, KW = self.W.shape
        if in_shape[0] != C:
            raise ValueError(f"IntConv2D expects {C} input channels, got {in_shape[0]}")
        return (F, K.conv_output_size(in_shape[1], KH, self.stride, self.padding),
                K.conv_output_size(in_shape[2], KW, self.stride, self.padding))

    def macs(self, in_shape):
        _, Ho, Wo = self.output_shape(in_shape)
        return self.W.size * Ho * Wo

    def config(self):
        return {**self._base_config(), "stride": self.stride, "padding": self.padding}

    @classmethod
    def from_state(cls, config, arrays, in_q):
        return cls(**cls._arrays(config, arrays, in_q), stride=config["stride"], padding=config["padding"])


class IntDense(_IntLinear):
    """Integer dense layer: int8 (N, in) -> int8 (N, out) or int32 accumulators."""

    kind = "dense"
    weight_ndim, out_axis = 2, 1

    def kernel_weights(self):
        return np.ascontiguousarray(self.W.T)  # (out, in): each output one contiguous dot product

    def forward(self, x, reference=False):
        return self.matmul(K.pad_columns(x, self.wt.shape[1]), reference)

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.W.shape[0],):
            raise ValueError(f"IntDense expects inputs of shape ({self.W.shape[0]},), got {tuple(in_shape)}")
        return (self.W.shape[1],)

    def macs(self, in_shape):
        return self.W.size

    def config(self):
        return self._base_config()

    @classmethod
    def from_state(cls, config, arrays, in_q):
        return cls(**cls._arrays(config, arrays, in_q))


class _IntPassThrough:
    """Ops without weights; their output codes keep the input's (S, Z)."""

    def __init__(self, in_q):
        self.in_q = (float(in_q[0]), int(in_q[1]))

    @property
    def output_scale(self):
        return self.in_q

    def macs(self, in_shape):
        return 0

    def stats(self):
        return {"params": 0, "nonzero": 0, "bits_per_weight": 0.0, "bytes": 0}

    def state(self):
        return {}

    def config(self):
        return {}

    @classmethod
    def from_state(cls, config, arrays, in_q):
        return cls(in_q, **config)


class IntMaxPool2D(_IntPassThrough):
    """Max over k x k windows of int8 codes, NHWC."""

    kind = "maxpool2d"

    def __init__(self, in_q, kernel_size, stride):
        super().__init__(in_q)
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = check_positive_int(stride, "stride")

    def forward(self, x, reference=False):
        fn = K.maxpool_nhwc_ref if reference else K.maxpool_nhwc
        return fn(x, self.kernel_size, self.stride)

    def output_shape(self, in_shape):
        C, H, W = in_shape
        k, s = self.kernel_size, self.stride
        return (C, K.conv_output_size(H, k, s, 0), K.conv_output_size(W, k, s, 0))

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride}


class IntFlatten(_IntPassThrough):
    """NHWC codes -> (N, C*H*W) in the float model's C, H, W order."""

    kind = "flatten"

    def forward(self, x, reference=False):
        if x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x).reshape(len(x), -1)

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)


class IntReLU(_IntPassThrough):
    """A ReLU not fused into a layer: max(q, Z), the code of the real 0."""

    kind = "relu"

    def forward(self, x, reference=False):
        return np.maximum(x, np.int8(self.in_q[1]))

    def output_shape(self, in_shape):
        return tuple(in_shape)


OP_KINDS = {cls.kind: cls for cls in (IntConv2D, IntDense, IntMaxPool2D, IntFlatten, IntReLU)}


# --------------------------------------------------------------------------
# The whole model


class QuantizedModel:
    """An int8 network: quantize the input once, integer ops, dequantize the output once.

    ops: the integer ops in order; input_q = (S, Z) of the input codes;
    ranges: the calibration report (list of ActivationRange) of a freshly converted
    model, for display; not saved (the scales and zero points are).
    """

    kind = MODEL_KIND

    def __init__(self, ops, input_shape, input_q, per_channel, ranges=()):
        self.layers = list(ops)  # `layers`, so minicnn's summary table reads the ops
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_q = (float(input_q[0]), int(input_q[1]))
        check_scale(self.input_q[0], "input scale")
        check_zero_point(self.input_q[1], "input zero point")
        self.per_channel = bool(per_channel)
        self.ranges = list(ranges)
        shape = self.input_shape
        for i, op in enumerate(self.layers):
            try:
                shape = op.output_shape(shape)
            except ValueError as e:
                raise ValueError(f"op {i} ({type(op).__name__}) does not fit its input: {e}") from None
        self.output_shape = shape

    def quantize_input(self, x):
        """float (N, C, H, W) -> int8 (N, H, W, C) codes (or (N, F) for flat inputs)."""
        check_array(x, "model input", ndim=1 + len(self.input_shape))
        if x.shape[1:] != self.input_shape:
            expected = ", ".join(map(str, self.input_shape))
            raise ValueError(f"model expects inputs of shape (N, {expected}), got {x.shape}")
        q = affine_quantize(x, *self.input_q)
        return np.ascontiguousarray(q.transpose(0, 2, 3, 1)) if q.ndim == 4 else q

    def forward_int(self, q, reference=False):
        """Integer codes in, integer codes out: int8 or the last layer's int32 accumulators.

        reference=True runs the plain NumPy references instead of the Numba kernels.
        """
        for op in self.layers:
            q = op.forward(q, reference)
        return q

    def dequantize_output(self, out):
        scale, zero_point = self.layers[-1].output_scale
        r = (out.astype(np.float64) - zero_point) * scale
        if r.ndim == 4:
            r = r.transpose(0, 3, 1, 2)
        return r.astype(np.float32)

    def predict(self, x, batch_size=256, reference=False):
        """Logits float32 (N, ...) computed in integers between the input and the output."""
        batch_size = check_positive_int(batch_size, "batch_size")
        check_array(x, "model input", ndim=1 + len(self.input_shape))
        outs = [self.dequantize_output(self.forward_int(self.quantize_input(x[i : i + batch_size]), reference))
                for i in range(0, len(x), batch_size)]
        if not outs:
            return np.zeros((0, *self.output_shape), np.float32)
        return np.concatenate(outs)

    def summary(self):
        head = (f"int8 model ({'per-channel' if self.per_channel else 'per-tensor'} weights, int32 biases, "
                f"fixed-point requantization); input scale {self.input_q[0]:.6g}, zero point {self.input_q[1]}")
        return head + "\n" + format_summary(self)

    def save(self, path):
        """Write the int8 model to `path` (.npz) atomically; `minicnn.load` reads it back."""
        meta = {
            "model": MODEL_KIND,
            "input_shape": list(self.input_shape),
            "input_scale": self.input_q[0], "input_zero_point": self.input_q[1],
            "per_channel": self.per_channel,
            "ops": [{"kind": op.kind, "config": op.config()} for op in self.layers],
        }
        arrays = {}
        for i, op in enumerate(self.layers):
            for name, value in op.state().items():
                arrays[f"ops.{i}.{name}"] = value
        write_npz(path, meta, arrays)


def load_quantized(meta, arrays):
    """The `optim.MODEL_KINDS` loader: a QuantizedModel from a file's meta and arrays.

    Each op's input (S, Z) is its predecessor's output, so the file stores it once.
    """
    try:
        ops, in_q = [], (meta["input_scale"], meta["input_zero_point"])
        for i, spec in enumerate(meta["ops"]):
            prefix = f"ops.{i}."
            own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if spec["kind"] not in OP_KINDS:
                raise ValueError(f"unknown int8 op kind {spec['kind']!r}")
            ops.append(OP_KINDS[spec["kind"]].from_state(spec["config"], own, in_q))
            in_q = ops[-1].output_scale
        known = {f"ops.{i}.{name}" for i, op in enumerate(ops) for name in op.state()}
        if set(arrays) - known:
            raise ValueError(f"unexpected arrays {sorted(set(arrays) - known)}")
        return QuantizedModel(ops, meta["input_shape"], (meta["input_scale"], meta["input_zero_point"]),
                              meta["per_channel"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"invalid int8 model file: {type(e).__name__}: {e}") from None
    except ValueError as e:
        raise ValueError(f"invalid int8 model file: {e}") from None


# --------------------------------------------------------------------------
# Conversion


def convert(model, ranges, per_channel=True):
    """The QuantizedModel of a float Sequential, given the ranges `calibrate` returns."""
    steps = plan(model)
    points = _observed_points(steps)
    if len(ranges) != 1 + len(points):
        raise ValueError(f"expected {1 + len(points)} activation ranges (input + {len(points)} layers), "
                         f"got {len(ranges)}")
    qparams = [activation_qparams(r.lo, r.hi, r.name) for r in ranges]
    current, ops, point = qparams[0], [], 1
    for n, (op, i, relu) in enumerate(steps):
        layer = model.layers[i]
        if op == "compute":
            last = n == len(steps) - 1
            out_q = None if last else qparams[point]
            point += not last
            conv = layer.kind == "conv2d"
            W = layer.params["W"]
            q, w_scale = quantize_weights(W, axis=0 if conv else 1, per_channel=per_channel)
            b = quantize_bias(layer.params["b"], current[0] * w_scale.astype(np.float64))
            if conv:
                ops.append(IntConv2D(q, w_scale, b, current, out_q, relu, layer.stride, layer.padding))
            else:
                ops.append(IntDense(q, w_scale, b, current, out_q, relu))
            current = ops[-1].output_scale
        elif op == "maxpool2d":
            ops.append(IntMaxPool2D(current, layer.kernel_size, layer.stride))
        elif op == "flatten":
            ops.append(IntFlatten(current))
        else:
            ops.append(IntReLU(current))
    return QuantizedModel(ops, model.input_shape, qparams[0], per_channel, ranges)


def quantize_model(model, x, per_channel=True, method="minmax", percentile=99.99, momentum=0.9, bits=8):
    """Post-training int8 quantization: calibrate on x, then convert. The model is not changed."""
    check_bits(bits)
    return convert(model, calibrate(model, x, method, percentile, momentum), per_channel)


# --------------------------------------------------------------------------
# Quantization-aware training


class FakeQuantActivation(Layer):
    """Rounds activations to the int8 grid of a running range; STE backward.

    While `observing`, the range follows each batch's min/max by an
    exponential moving average (the paper's section 3).
    """

    kind = "fake_quant_activation"

    def __init__(self, lo, hi, momentum=0.99, name="activation"):
        super().__init__()
        self.lo, self.hi, self.momentum, self.name = float(lo), float(hi), momentum, name
        self.observing = True

    def forward(self, x):
        if self.observing:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * float(x.min())
            self.hi = m * self.hi + (1 - m) * float(x.max())
        scale, zero_point = activation_qparams(self.lo, self.hi, self.name)
        self.cache = (x >= scale * (QMIN - zero_point)) & (x <= scale * (QMAX - zero_point))
        return affine_dequantize(affine_quantize(x, scale, zero_point), scale, zero_point).astype(x.dtype)

    def backward(self, dout):
        return dout * self.cache  # straight through inside the range, 0 where it saturated


class FakeQuantWeights(Layer):
    """A Conv2D or Dense computing with its weights rounded to int8; STE backward.

    `params` are the float (latent) weights the optimizer updates; the inner
    layer sees their rounded copy in forward and backward, and its gradients
    go to the float weights unchanged.
    """

    def __init__(self, inner, per_channel):
        super().__init__()
        self.inner, self.per_channel = inner, per_channel
        self.params, self.grads = inner.params, inner.grads
        self.kind = inner.kind

    def forward(self, x):
        W = self.params["W"]
        axis = 0 if self.kind == "conv2d" else 1
        q, scales = quantize_weights(W, axis, self.per_channel)
        shape = [1] * W.ndim
        shape[axis] = len(scales)
        rounded = q * scales.astype(W.dtype).reshape(shape)
        self.inner.params = {"W": rounded, "b": self.params["b"]}
        return self.inner.forward(x)

    def backward(self, dout):
        return self.inner.backward(dout)

    def output_shape(self, in_shape):
        return self.inner.output_shape(in_shape)

    def release(self):
        """Give the inner layer its float weights back."""
        self.inner.params = self.params
        return self.inner


def quantization_aware_training(model, x, y, epochs=1, per_channel=True, batch_size=64, optimizer=None,
                                seed=0, calibration_size=1000, momentum=0.99, verbose=True):
    """Fine-tune a copy of `model` with fake quantization, then convert it to int8.

    x, y: training data; the first `calibration_size` samples give the initial
    activation ranges (min/max), which then follow an EMA during training.
    optimizer defaults to Adam(1e-4): fine-tuning, not training from scratch.
    """
    float_model = model.copy()
    steps = plan(float_model)
    ranges = calibrate(float_model, x[:calibration_size], "minmax")
    observers = [FakeQuantActivation(r.lo, r.hi, momentum, r.name) for r in ranges]
    points = _observed_points(steps)
    layers = [observers[0]]
    for i, layer in enumerate(float_model.layers):
        layers.append(FakeQuantWeights(layer, per_channel) if layer.kind in ("conv2d", "dense") else layer)
        if i in points:
            layers.append(observers[1 + points.index(i)])
    fit(Sequential(layers, float_model.input_shape), x, y, epochs=epochs, batch_size=batch_size,
        optimizer=optimizer or Adam(1e-4), seed=seed, verbose=verbose)
    for layer in layers:
        if isinstance(layer, FakeQuantWeights):
            layer.release()
    ranges = [ActivationRange(r.name, o.lo, o.hi, r.seen_lo, r.seen_hi, "qat-ema") for r, o in zip(ranges, observers)]
    return convert(float_model, ranges, per_channel)
