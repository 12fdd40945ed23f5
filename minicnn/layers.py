"""Layers: forward/backward pairs with the cache backward needs (CS231n style).

Every layer follows one convention that the rest of the project relies on:

* `params` and `grads` are dicts of arrays with the same keys;
* `forward(x)` returns the output and keeps in `self.cache` what backward needs;
* `backward(dout)` fills `grads` and returns d(loss)/d(input), unless the
  layer's `needs_input_grad` is False: then it may skip that work and return
  None (Sequential sets it on its first layer while it backpropagates, since
  nobody wants the gradient of the images);
* `output_shape(in_shape)` maps a per-sample shape (no batch axis) forward;
* `config()` is the JSON-able constructor arguments, so a saved file can
  rebuild the layer (`kind` names it there).

Shapes are NCHW; parameters are float32 unless converted with `astype`
(the gradient checks run in float64).
"""

import numpy as np

from . import direct, kernels, relu
from .checks import check_array, check_positive_int


def _product(a, b, bias=None):
    """a @ b (+ bias): float32 through direct.dense_block, not BLAS, whose spinning threads take the
    cores from the Numba kernels around it (a BLAS call in LeNet-5's training step left the conv
    kernels after it at half speed; a Conv2D without a pool after it still runs its backward's
    products on BLAS); other dtypes through numpy."""
    if a.dtype != np.float32 or b.dtype != np.float32:
        return a @ b if bias is None else a @ b + bias
    bias = np.zeros(b.shape[1], np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    return direct.dense_block(np.ascontiguousarray(a), np.ascontiguousarray(b), bias, False)


def _init_uniform(rng, shape, fan_in, dtype=np.float32):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for conv and linear
    layers, so results compare with the same recipe there."""
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Layer:
    """Base class: a parameter-free identity with the shared bookkeeping."""

    kind = None
    needs_input_grad = True

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.cache = None

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dout):
        raise NotImplementedError

    def output_shape(self, in_shape):
        return tuple(in_shape)

    def config(self):
        return {}

    @staticmethod
    def param_shapes(**config):
        """{name: shape} of the params a layer built with `config` holds, the config checked
        and nothing allocated: a file's arrays are compared with it before the layer is built."""
        return {}

    def macs(self, in_shape):
        """Multiply-accumulates per sample."""
        return 0

    def stats(self):
        """Storage figures shown by `Sequential.summary` (optim layers override)."""
        n = sum(p.size for p in self.params.values())
        nonzero = sum(int(np.count_nonzero(p)) for p in self.params.values())
        nbytes = sum(p.nbytes for p in self.params.values())
        return {"params": n, "nonzero": nonzero, "bits_per_weight": 32.0 if n else 0.0, "bytes": nbytes}

    def astype(self, dtype):
        """Convert parameters (and gradients) in place, e.g. to float64 for gradient checks."""
        for name in self.params:
            self.params[name] = self.params[name].astype(dtype)
            self.grads[name] = np.zeros_like(self.params[name])
        return self

    @property
    def dtype(self):
        p = next(iter(self.params.values()), None)
        return np.float32 if p is None else p.dtype

    def _input(self, x, ndim, channels=None):
        """Check x's rank (and channel count) and cast it to the parameter dtype."""
        check_array(x, f"{type(self).__name__} input", ndim=ndim, finite=False)
        if channels is not None and x.shape[1] != channels:
            raise ValueError(
                f"{type(self).__name__} expects {channels} input channels/features, "
                f"got shape {x.shape}"
            )
        return x.astype(self.dtype, copy=False)

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Conv2D(Layer):
    """2-D convolution. x (N, C_in, H, W) -> (N, C_out, Ho, Wo).

    W (C_out, C_in, KH, KW), b (C_out,); Ho = 1 + (H + 2P - KH) // S.
    """

    kind = "conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, rng=None):
        super().__init__()
        shapes = self.param_shapes(in_channels, out_channels, kernel_size, stride, padding)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        rng = np.random.default_rng(rng)
        fan_in = self.in_channels * self.kernel_size**2
        self.params = {name: _init_uniform(rng, shape, fan_in) for name, shape in shapes.items()}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    @staticmethod
    def param_shapes(in_channels, out_channels, kernel_size, stride=1, padding=0, **_):
        C, F = check_positive_int(in_channels, "in_channels"), check_positive_int(out_channels, "out_channels")
        k = check_positive_int(kernel_size, "kernel_size")
        check_positive_int(stride, "stride")
        check_positive_int(padding, "padding", minimum=0)
        return {"W": (F, C, k, k), "b": (F,)}

    def output_shape(self, in_shape):
        C, H, W = in_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        if C != self.in_channels:
            raise ValueError(f"Conv2D expects {self.in_channels} input channels, got {C}")
        if H + 2 * p < k or W + 2 * p < k:
            raise ValueError(f"Conv2D kernel {k} is larger than the padded input {H}x{W} (padding {p})")
        return (
            self.out_channels,
            kernels.conv_output_size(H, k, s, p),
            kernels.conv_output_size(W, k, s, p),
        )

    def forward(self, x):
        """float32 through direct.conv_block (the conv of predict and of minicnn.convpool's steps:
        the same bits whether a pool follows or not), other dtypes through im2row and a GEMM."""
        x = self._input(x, 4, self.in_channels)
        self.output_shape(x.shape[1:])
        W, b, K, S = self.params["W"], self.params["b"], self.kernel_size, self.stride
        xp = kernels.pad_nhwc(x, self.padding)
        self.cache = (xp, x.shape)
        if x.dtype != np.float32:
            return kernels.conv2d_forward(x, W, b, S, self.padding)[0]
        y = direct.conv_block(xp, direct.pack_filters(W, S, False), b, self.out_channels, K, S, False, False)
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2))

    def backward(self, dout):
        xp, x_shape = self.cache
        K = self.kernel_size
        dx, self.grads["W"], self.grads["b"] = kernels.conv2d_backward(
            dout.astype(self.dtype, copy=False), kernels.im2row_hwc(xp, K, K, self.stride), x_shape,
            self.params["W"], self.stride, self.padding, input_grad=self.needs_input_grad,
        )
        return dx

    def macs(self, in_shape):
        _, Ho, Wo = self.output_shape(in_shape)
        return self.params["W"].size * Ho * Wo

    def config(self):
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": self.kernel_size,
            "stride": self.stride,
            "padding": self.padding,
        }


class Dense(Layer):
    """Fully connected: y = x @ W + b. x (N, in_features) -> (N, out_features).

    W (in_features, out_features), b (out_features,).
    """

    kind = "dense"

    def __init__(self, in_features, out_features, rng=None):
        super().__init__()
        shapes = self.param_shapes(in_features, out_features)
        self.in_features, self.out_features = int(in_features), int(out_features)
        rng = np.random.default_rng(rng)
        self.params = {name: _init_uniform(rng, shape, self.in_features) for name, shape in shapes.items()}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    @staticmethod
    def param_shapes(in_features, out_features, **_):
        n_in, n_out = check_positive_int(in_features, "in_features"), check_positive_int(out_features, "out_features")
        return {"W": (n_in, n_out), "b": (n_out,)}

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Dense expects inputs of shape ({self.in_features},), got {tuple(in_shape)}")
        return (self.out_features,)

    def forward(self, x):
        x = self._input(x, 2, self.in_features)
        self.cache = x
        return _product(x, self.params["W"], self.params["b"])

    def backward(self, dout):
        x = self.cache
        dout = dout.astype(self.dtype, copy=False)
        self.grads["W"] = _product(x.T, dout)
        self.grads["b"] = dout.sum(axis=0)
        return _product(dout, self.params["W"].T) if self.needs_input_grad else None

    def macs(self, in_shape):
        return self.params["W"].size

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features}


class ReLU(Layer):
    """max(x, 0), elementwise, any shape."""

    kind = "relu"

    def forward(self, x):
        check_array(x, "ReLU input", finite=False)
        out, self.cache = relu.relu_forward(x)
        return out

    def backward(self, dout):
        return relu.relu_backward(dout, self.cache)


class MaxPool2D(Layer):
    """Max over k x k windows moved by `stride` (default k). (N, C, H, W) -> (N, C, Ho, Wo)."""

    kind = "maxpool2d"

    def __init__(self, kernel_size, stride=None):
        super().__init__()
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else check_positive_int(stride, "stride")

    def output_shape(self, in_shape):
        C, H, W = in_shape
        k, s = self.kernel_size, self.stride
        if H < k or W < k:
            raise ValueError(f"MaxPool2D window {k} is larger than the input {H}x{W}")
        return (C, kernels.conv_output_size(H, k, s, 0), kernels.conv_output_size(W, k, s, 0))

    def forward(self, x):
        check_array(x, "MaxPool2D input", ndim=4, finite=False)
        self.output_shape(x.shape[1:])
        if x.dtype not in (np.float32, np.float64):  # the kernels are compiled for these two
            x = x.astype(np.float32)
        out, argmax = kernels.maxpool_forward(x, self.kernel_size, self.stride)
        self.cache = (argmax, x.shape)
        return out

    def backward(self, dout):
        argmax, x_shape = self.cache
        return kernels.maxpool_backward(np.ascontiguousarray(dout), argmax, x_shape)

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride}


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W), in C, H, W order."""

    kind = "flatten"

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)

    def forward(self, x):
        check_array(x, "Flatten input", finite=False)
        if x.ndim < 2:
            raise ValueError(f"Flatten needs a batch axis and at least one more, got shape {x.shape}")
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dout):
        return dout.reshape(self.cache)


LAYER_KINDS = {cls.kind: cls for cls in (Conv2D, Dense, ReLU, MaxPool2D, Flatten)}

WEIGHTED = (Conv2D, Dense)


def weight_layers(layers):
    """Indices of the plain Conv2D and Dense layers in the list `layers` (a model's `.layers`)."""
    return [i for i, layer in enumerate(layers) if type(layer) in WEIGHTED]
