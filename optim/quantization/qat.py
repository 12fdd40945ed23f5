"""Quantization-aware training: fine-tune the float model through int8 rounding.

Jacob et al., CVPR 2018, section 3. The forward pass rounds weights and
activations to the int8 grids the integer model will use ("fake
quantization"): W -> S_w round(W / S_w) per output channel or per tensor,
and each quantized activation r -> S (clamp(round(r / S) + Z) - Z) with
(S, Z) from a range that follows the batches' min and max by an exponential
moving average. Rounding has zero gradient almost everywhere, so the
backward pass uses the straight-through estimator: d round(x) / dx := 1
inside the range, 0 where the code saturated. The optimizer updates float
(latent) weights; `convert` then turns the fine-tuned model and the final
ranges into the integer model.
"""

from minicnn.layers import Layer
from minicnn.model import Sequential
from minicnn.optimizers import Adam
from minicnn.training import fit

from .affine import QMAX, QMIN, activation_qparams, affine_dequantize, affine_quantize, quantize_weights
from .calibration import ActivationRange, calibrate, observed_points, plan
from .model import convert


class FakeQuantActivation(Layer):
    """Rounds activations to the int8 grid of a running range; STE backward.

    While `observing`, the range follows each batch's min/max by an
    exponential moving average (the paper's section 3). forward: x float, any
    shape -> the rounded reals, same shape and dtype.
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

    x (N, *input_shape) float, y: training data as `minicnn.fit` takes it; the
    first `calibration_size` samples give the initial activation ranges
    (min/max), which then follow an EMA during training. optimizer defaults to
    Adam(1e-4): fine-tuning, not training from scratch. Returns a QuantizedModel
    whose ranges have method "qat-ema"; `model` is not changed.
    """
    float_model = model.copy()
    steps = plan(float_model)
    ranges = calibrate(float_model, x[:calibration_size], "minmax")
    observers = [FakeQuantActivation(r.lo, r.hi, momentum, r.name) for r in ranges]
    points = observed_points(steps)
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
