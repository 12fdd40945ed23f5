"""Binary networks: weights (and optionally activations) reduced to their signs.

Training (BinaryConnect, Courbariaux et al., NeurIPS 2015; BNN, Hubara et
al., NeurIPS 2016; XNOR-Net, Rastegari et al., ECCV 2016). Each binarized
layer keeps latent float weights W, clipped to [-1, 1] after every step
(`clip_latent`), and computes with, per output channel j over its n weights,

    W~_j = alpha_j * sign(W_j),      alpha_j = mean_i |W_ji|      (XNOR-Net's best L2 fit)

with sign(v) = +1 for v >= 0, else -1. sign has zero gradient almost
everywhere, so backward uses the straight-through estimator: d sign(v)/dv
is replaced by 1 where |v| <= 1 and 0 elsewhere (the derivative of the
clipped identity, "hard tanh"). alpha's own dependence on W is exact:

    dL/dW_ji = alpha_j [|W_ji| <= 1] dL/dW~_ji + sign(W_ji) / n * sum_k sign(W_jk) dL/dW~_jk.

With binary activations (BNN, XNOR-Net) a layer also replaces each input
row x (a Dense input, or a conv's receptive field) by beta * sign(x),
beta = mean |x| (XNOR-Net's activation scale K), with the same estimator.
sign is blind to scale, but the estimator's window |x| <= 1 is not, and
beta keeps each output of the order of the float layer's, x . w ~ beta
alpha (sign(x) . sign(w)), without a BatchNorm layer (minicnn has none).

Inference (`pack`). The signs are stored one bit each (optim/xnor.py),
32x smaller than float32, plus alpha and the bias in float32:

    real inputs:    y_j = alpha_j * (sum_{bit=1} x_i - sum_{bit=0} x_i) + b_j
    binary inputs:  y_j = alpha_j * beta * (n - 2 popcount(bits(x) XOR bits(W_j))) + b_j

The first and last weight layers stay float32 by default, as in all three
papers: they hold few weights and cost the most accuracy when binarized.
"""

import copy

import numpy as np

from minicnn import kernels
from minicnn.checks import check_array
from minicnn.layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, weight_layers
from minicnn.model import Sequential

from . import xnor

# --------------------------------------------------------------------------
# The binarization and its straight-through gradients, on rows


def sign(v):
    """+1 where v >= 0, -1 elsewhere (0 maps to +1, as a set bit does), in v's dtype."""
    return np.where(v >= 0, 1, -1).astype(v.dtype)


def ste_window(v):
    """The straight-through estimator's d sign(v)/dv: 1 where |v| <= 1, else 0."""
    return (np.abs(v) <= 1).astype(v.dtype)


def binarize_rows(v):
    """v (R, n) -> (sign(v), scale (R,) = mean |v| per row)."""
    return sign(v), np.abs(v).mean(axis=1)


def binarized_gradient(v, scale, d_binary):
    """dL/dv for b = scale[:, None] * sign(v) given dL/db (R, n): the formula of the module docstring."""
    s = sign(v)
    through_sign = scale[:, None] * ste_window(v) * d_binary
    through_scale = s * (s * d_binary).sum(axis=1, keepdims=True) / v.shape[1]
    return through_sign + through_scale


def rows_forward(rows, Wm, b, binary_input):
    """out (R, F) = binarized(rows) @ binarized(Wm).T + b, and the cache for rows_backward.

    rows (R, n) inputs (a Dense batch, or a conv's im2row rows); Wm (F, n)
    latent weights, one row per output channel; b (F,).
    """
    signs_w, alpha = binarize_rows(Wm)
    Wb = alpha[:, None] * signs_w
    if binary_input:
        signs_x, beta = binarize_rows(rows)
        xb = beta[:, None] * signs_x
    else:
        xb, beta = rows, None
    out = xb @ Wb.T
    out += b
    return out, (rows, xb, beta, Wm, Wb, alpha)


def rows_backward(dout, cache):
    """(drows (R, n), dWm (F, n), db (F,)) from dout (R, F)."""
    rows, xb, beta, Wm, Wb, alpha = cache
    dWm = binarized_gradient(Wm, alpha, dout.T @ xb)
    dxb = dout @ Wb
    drows = dxb if beta is None else binarized_gradient(rows, beta, dxb)
    return drows, dWm, dout.sum(axis=0)


# --------------------------------------------------------------------------
# Training layers: latent float weights, binarized forward, STE backward


class BinaryDense(Dense):
    """Dense with binarized weights (and inputs if binary_input). W (in, out) latent, in [-1, 1]."""

    kind = "binary_dense"

    def __init__(self, in_features, out_features, binary_input=False, rng=None):
        super().__init__(in_features, out_features, rng=rng)
        self.binary_input = bool(binary_input)

    def forward(self, x):
        x = self._input(x, 2, self.in_features)
        out, self.cache = rows_forward(x, self.params["W"].T, self.params["b"], self.binary_input)
        return out

    def backward(self, dout):
        dx, dWm, self.grads["b"] = rows_backward(dout.astype(self.dtype, copy=False), self.cache)
        self.grads["W"] = dWm.T
        return dx

    def config(self):
        return {**super().config(), "binary_input": self.binary_input}


class BinaryConv2D(Conv2D):
    """Conv2D with binarized filters (and receptive fields if binary_input). W (F, C, K, K) latent.

    Padding adds zeros before binarization, so with binary inputs a padded
    position counts as sign(0) = +1, at training and inference alike.
    """

    kind = "binary_conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 binary_input=False, rng=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, rng=rng)
        self.binary_input = bool(binary_input)

    def forward(self, x):
        x = self._input(x, 4, self.in_channels)
        N = x.shape[0]
        _, Ho, Wo = self.output_shape(x.shape[1:])
        k, F = self.kernel_size, self.out_channels
        rows = kernels.im2row(kernels.pad(x, self.padding), k, k, self.stride)
        out, cache = rows_forward(rows, self.params["W"].reshape(F, -1), self.params["b"], self.binary_input)
        self.cache = (cache, x.shape, Ho, Wo)
        return np.ascontiguousarray(out.reshape(N, Ho, Wo, F).transpose(0, 3, 1, 2))

    def backward(self, dout):
        cache, (N, C, H, W), Ho, Wo = self.cache
        F, k, p = self.out_channels, self.kernel_size, self.padding
        dout_rows = dout.astype(self.dtype, copy=False).transpose(0, 2, 3, 1).reshape(-1, F)
        drows, dWm, self.grads["b"] = rows_backward(dout_rows, cache)
        self.grads["W"] = dWm.reshape(self.params["W"].shape)
        dxp = kernels.row2im(np.ascontiguousarray(drows), (N, C, H + 2 * p, W + 2 * p), k, k, self.stride)
        return np.ascontiguousarray(dxp[:, :, p : p + H, p : p + W])

    def config(self):
        return {**super().config(), "binary_input": self.binary_input}


def clip_latent(model):
    """The `constraint` for minicnn.fit: latent weights back into [-1, 1] after every step."""
    for layer in model.layers:
        if isinstance(layer, (BinaryDense, BinaryConv2D)):
            np.clip(layer.params["W"], -1, 1, out=layer.params["W"])


def binarize(model, layers=None, binary_activations=False):
    """A copy of `model` whose chosen Conv2D / Dense layers train with binary weights.

    layers: indices into model.layers; default every weight layer but the
    first and the last. The latent weights start from the float ones,
    clipped to [-1, 1]. binary_activations: those layers also binarize their
    inputs; a ReLU feeding one (through Flatten / MaxPool2D) is removed,
    since sign(relu(x)) would be +1 everywhere: sign is the activation.
    Train the result with minicnn.fit(..., constraint=clip_latent), then `pack` it.
    """
    if not isinstance(model, Sequential):
        raise TypeError(f"binarize needs a Sequential model, got {type(model).__name__}")
    candidates = weight_layers(model.layers)
    if layers is None:
        layers = candidates[1:-1]
        if not layers:
            raise ValueError(
                f"the model has {len(candidates)} weight layers: none between the first and the last "
                "to binarize; pass layers=[...] explicitly"
            )
    layers = sorted(set(layers))
    for i in layers:
        if i not in candidates:
            raise ValueError(f"layer {i} is not a float Conv2D or Dense layer; binarizable layers: {candidates}")
    new = []
    for i, layer in enumerate(model.layers):
        if i not in layers:
            new.append(copy.deepcopy(layer))
            continue
        if isinstance(layer, Dense):
            binary = BinaryDense(layer.in_features, layer.out_features, binary_input=binary_activations)
        else:
            binary = BinaryConv2D(**layer.config(), binary_input=binary_activations)
        binary.params = {"W": np.clip(layer.params["W"], -1, 1).astype(np.float32), "b": layer.params["b"].copy()}
        binary.grads = {name: np.zeros_like(p) for name, p in binary.params.items()}
        if binary_activations:
            _drop_feeding_relu(new)
        new.append(binary)
    return Sequential(new, input_shape=model.input_shape)


def _drop_feeding_relu(layers_so_far):
    for j in range(len(layers_so_far) - 1, -1, -1):
        if isinstance(layers_so_far[j], ReLU):
            del layers_so_far[j]
            return
        if not isinstance(layers_so_far[j], (Flatten, MaxPool2D)):
            return


# --------------------------------------------------------------------------
# Inference layers: one bit per weight


def packed_rows_forward(rows, bits, alpha, b, binary_input):
    """out (R, F) float32 from rows (R, n) float32 and packed signs bits (F, words), alpha (F,), b (F,)."""
    if binary_input:
        return xnor_forward(xnor.pack_signs(rows), np.abs(rows).mean(axis=1, dtype=np.float32), bits, alpha, b,
                            rows.shape[1])
    out = xnor.addsub_matmul(rows, bits) * alpha
    out += b
    return out


def xnor_forward(signs, beta, bits, alpha, b, n):
    """out (R, F) float32 = beta alpha (n - 2 popcount(signs XOR bits)) + b; signs (R, words), beta (R,)."""
    dots = xnor.xnor_matmul(signs, bits, n)
    out = dots.astype(np.float32) * (beta[:, None] * alpha)  # exact below 2**24
    out += b
    return out


class PackedBinaryLayer(Layer):
    """Shared storage of the inference layers: F rows of n signs, packed, with alpha and b.

    In memory each row is padded to whole uint64 words (xnor.py's layout);
    the file stores the F * n signs back to back, ceil(F n / 8) bytes, and
    `stats()` reports those stored bytes plus alpha and b in float32.
    """

    def __init__(self, bits, alpha, b, n, binary_input):
        super().__init__()
        F = alpha.shape[0]
        if bits.dtype != np.uint64 or bits.shape != (F, xnor.words_for(n)):
            raise ValueError(f"packed signs must be uint64 ({F}, {xnor.words_for(n)}), got {bits.dtype} {bits.shape}")
        if b.shape != (F,):
            raise ValueError(f"bias must have shape ({F},), got {b.shape}")
        if not np.all(alpha >= 0):
            raise ValueError(f"alpha scales must be >= 0 (means of |W|), got min {alpha.min()}")
        self.bits, self.alpha, self.b = bits, alpha.astype(np.float32), b.astype(np.float32)
        self.n, self.binary_input = int(n), bool(binary_input)

    @classmethod
    def _from_latent(cls, Wm, b, binary_input, **geometry):
        """From latent weights Wm (F, n): their signs, packed, and alpha = mean |Wm| per row."""
        Wm = np.asarray(Wm, np.float32)
        alpha = np.abs(Wm).mean(axis=1)
        return cls(xnor.pack_signs(Wm), alpha, np.asarray(b, np.float32), binary_input=binary_input, **geometry)

    def signs(self):
        """The weights' signs (F, n) float32 in {-1, +1}."""
        return xnor.unpack_signs(self.bits, self.n)

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} is inference-only: train the Binary layer it was packed from")

    def state(self):
        stream = np.packbits(self.signs().reshape(-1) > 0)
        return {"signs": stream, "alpha": self.alpha, "b": self.b}

    @staticmethod
    def _arrays(arrays, F, n):
        """(bits, alpha, b) from stored arrays, checked against the shape the config gives."""
        for name in ("signs", "alpha", "b"):
            if name not in arrays:
                raise ValueError(f"packed binary layer is missing its {name!r} array")
        stream, alpha, b = arrays["signs"], arrays["alpha"], arrays["b"]
        need = (F * n + 7) // 8
        if stream.dtype != np.uint8 or stream.ndim != 1 or stream.size != need:
            raise ValueError(
                f"packed signs have {stream.dtype} {stream.shape}; {F} x {n} signs need {need} uint8 bytes"
            )
        if alpha.shape != (F,) or alpha.dtype.kind != "f":
            raise ValueError(f"alpha must be float ({F},), got {alpha.dtype} {alpha.shape}")
        if b.shape != (F,) or b.dtype.kind != "f":
            raise ValueError(f"bias must be float ({F},), got {b.dtype} {b.shape}")
        signs = np.unpackbits(stream)[: F * n].reshape(F, n).astype(np.float32) * 2 - 1
        return xnor.pack_signs(signs), alpha, b

    def stats(self):
        F = self.alpha.shape[0]
        params = F * self.n + F  # weights and biases, as the float layer counts them
        nbytes = (F * self.n + 7) // 8 + self.alpha.nbytes + self.b.nbytes
        return {"params": params, "nonzero": params, "bits_per_weight": 8 * nbytes / params, "bytes": nbytes}


class PackedBinaryDense(PackedBinaryLayer):
    """Inference-only BinaryDense: x (N, in_features) -> (N, out_features)."""

    kind = "packed_binary_dense"

    def __init__(self, bits, alpha, b, in_features, binary_input=False):
        super().__init__(bits, alpha, b, in_features, binary_input)
        self.in_features, self.out_features = self.n, self.alpha.shape[0]

    @classmethod
    def from_layer(cls, layer):
        return cls._from_latent(layer.params["W"].T, layer.params["b"], layer.binary_input,
                                in_features=layer.in_features)

    @classmethod
    def from_state(cls, config, arrays):
        bits, alpha, b = cls._arrays(arrays, config["out_features"], config["in_features"])
        return cls(bits, alpha, b, config["in_features"], config["binary_input"])

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape ({self.in_features},), got {tuple(in_shape)}"
            )
        return (self.out_features,)

    def forward(self, x):
        check_array(x, f"{type(self).__name__} input", ndim=2, finite=False)
        self.output_shape(x.shape[1:])
        x = np.ascontiguousarray(x, dtype=np.float32)
        return packed_rows_forward(x, self.bits, self.alpha, self.b, self.binary_input)

    def macs(self, in_shape):
        return self.in_features * self.out_features

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "binary_input": self.binary_input}


class PackedBinaryConv2D(PackedBinaryLayer):
    """Inference-only BinaryConv2D: x (N, C, H, W) -> (N, F, Ho, Wo) through im2row rows."""

    kind = "packed_binary_conv2d"

    def __init__(self, bits, alpha, b, in_channels, kernel_size, stride=1, padding=0, binary_input=False):
        super().__init__(bits, alpha, b, in_channels * kernel_size * kernel_size, binary_input)
        self.in_channels, self.out_channels = in_channels, self.alpha.shape[0]
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    @classmethod
    def from_layer(cls, layer):
        return cls._from_latent(layer.params["W"].reshape(layer.out_channels, -1), layer.params["b"],
                                layer.binary_input, in_channels=layer.in_channels,
                                kernel_size=layer.kernel_size, stride=layer.stride, padding=layer.padding)

    @classmethod
    def from_state(cls, config, arrays):
        C, F, k = config["in_channels"], config["out_channels"], config["kernel_size"]
        bits, alpha, b = cls._arrays(arrays, F, C * k * k)
        return cls(bits, alpha, b, C, k, config["stride"], config["padding"], config["binary_input"])

    def output_shape(self, in_shape):
        return Conv2D.output_shape(self, in_shape)  # the same geometry and checks as the float layer

    def forward(self, x):
        check_array(x, f"{type(self).__name__} input", ndim=4, finite=False)
        _, Ho, Wo = self.output_shape(x.shape[1:])
        x = np.ascontiguousarray(x, dtype=np.float32)
        k, xp = self.kernel_size, kernels.pad(x, self.padding)
        if self.binary_input:
            signs, beta = xnor.im2row_signs(xp, k, k, self.stride)
            out = xnor_forward(signs, beta, self.bits, self.alpha, self.b, self.n)
        else:
            out = packed_rows_forward(kernels.im2row(xp, k, k, self.stride), self.bits, self.alpha, self.b, False)
        return np.ascontiguousarray(out.reshape(x.shape[0], Ho, Wo, -1).transpose(0, 3, 1, 2))

    def macs(self, in_shape):
        _, Ho, Wo = self.output_shape(in_shape)
        return self.n * self.out_channels * Ho * Wo

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "binary_input": self.binary_input}


PACKED = {BinaryDense: PackedBinaryDense, BinaryConv2D: PackedBinaryConv2D}


def pack(model):
    """A copy of a trained binarized model for inference: every Binary layer packed to bits."""
    if not any(type(layer) in PACKED for layer in model.layers):
        raise ValueError("the model has no BinaryDense / BinaryConv2D layer to pack; binarize and train it first")
    layers = [PACKED[type(layer)].from_layer(layer) if type(layer) in PACKED else copy.deepcopy(layer)
              for layer in model.layers]
    for layer in layers:
        layer.cache = None
    return Sequential(layers, input_shape=model.input_shape)


LAYER_KINDS = {cls.kind: cls for cls in (BinaryDense, BinaryConv2D, PackedBinaryDense, PackedBinaryConv2D)}
