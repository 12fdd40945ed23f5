"""Calibration: which activations the integer model quantizes, and their ranges.

Jacob et al., CVPR 2018 (sections 2.1 and 3). A float Sequential becomes a
chain of integer ops (`plan`): each Conv2D or Dense with the ReLU right
after it fused as a clamp, max-pool, flatten and loose ReLUs. The input and
the output of every compute step but the last are int8 tensors, each
needing a range [lo, hi] from which `affine.activation_qparams` makes its
(S, Z). Calibration picks each range on a representative batch:

* "minmax": the min and max over all of it;
* "ema": an exponential moving average of per-batch min and max, the
  paper's choice during training;
* "percentile": per-batch [100 - p, p] percentiles averaged, clipping rare
  outliers to spend the 256 codes on the bulk.
"""

from dataclasses import dataclass

import numpy as np

from minicnn.checks import check_array, check_positive_int
from minicnn.model import check_sequential

from .affine import activation_qparams

METHODS = ("minmax", "ema", "percentile")


def plan(model):
    """The integer graph of a Sequential: a list of (op, first layer index, fused ReLU).

    op is "compute" (Conv2D or Dense, with the ReLU right after it fused as a
    clamp), "maxpool2d", "flatten" or "relu". Raises for any other layer.
    """
    steps, layers, i = [], check_sequential(model, "int8 quantization").layers, 0
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


def observed_points(steps):
    """Layer indices (list of int) after which each activation is quantized: every compute
    step's output (after its fused ReLU) except the last step's, which stays int32."""
    return [i + relu for n, (op, i, relu) in enumerate(steps) if op == "compute" and n < len(steps) - 1]


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
    """x (N, *model.input_shape) float, N >= 1, returned unchanged; raises otherwise."""
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
    points = observed_points(plan(model))
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
    """The calibration report (str): one line per quantized activation."""
    lines = [f"{'activation':<24}{'method':>11}{'seen min':>11}{'seen max':>11}{'lo':>10}{'hi':>10}"
             f"{'scale':>12}{'zero pt':>8}"]
    for r in ranges:
        scale, zp = activation_qparams(r.lo, r.hi, r.name)
        lines.append(f"{r.name:<24}{r.method:>11}{r.seen_lo:>11.4f}{r.seen_hi:>11.4f}{r.lo:>10.4f}"
                     f"{r.hi:>10.4f}{scale:>12.6f}{zp:>8d}")
    return "\n".join(lines)
