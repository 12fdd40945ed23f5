"""Training binary layers: latent float weights, binarized forward, straight-through backward.

BinaryConnect (Courbariaux et al., NeurIPS 2015) binarizes the weights, BNN
(Hubara et al., NeurIPS 2016) the activations too, and XNOR-Net (Rastegari
et al., ECCV 2016) scales both. Each binarized layer keeps latent float
weights W, clipped to [-1, 1] after every step (`clip_latent`), and
computes with, per output channel j over its n weights,

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

The first and last weight layers stay float32 by default (`binarize`), as
in all three papers: they hold few weights and cost the most accuracy when
binarized. packed.py turns the trained layers into one bit per weight.
"""

import copy

import numpy as np

from minicnn import kernels
from minicnn.checks import check_bool
from minicnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, weight_layers
from minicnn.model import Sequential, check_sequential

# --------------------------------------------------------------------------
# The binarization and its straight-through gradients, on rows


def sign(v):
    """+1 where v >= 0, -1 elsewhere (0 maps to +1, as a set bit does): v float, any shape -> same shape and dtype."""
    return np.where(v >= 0, 1, -1).astype(v.dtype)


def ste_window(v):
    """The straight-through estimator's d sign(v)/dv: 1 where |v| <= 1, else 0, in v's shape and dtype."""
    return (np.abs(v) <= 1).astype(v.dtype)


def binarize_rows(v):
    """v (R, n) float -> (sign(v) (R, n), scale (R,) = mean |v| per row), both in v's dtype."""
    return sign(v), np.abs(v).mean(axis=1)


def binarized_gradient(v, scale, d_binary):
    """dL/dv (R, n) for b = scale[:, None] * sign(v), given v (R, n), scale (R,), dL/db (R, n).

    The formula of the module docstring; the result has the inputs' float dtype.
    """
    s = sign(v)
    through_sign = scale[:, None] * ste_window(v) * d_binary
    through_scale = s * (s * d_binary).sum(axis=1, keepdims=True) / v.shape[1]
    return through_sign + through_scale


def rows_forward(rows, Wm, b, binary_input):
    """out (R, F) = binarized(rows) @ binarized(Wm).T + b, and the cache for rows_backward.

    rows (R, n) inputs (a Dense batch, or a conv's im2row rows); Wm (F, n)
    latent weights, one row per output channel; b (F,); all in the layer's
    float dtype, which out keeps.
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
    """(drows (R, n), dWm (F, n), db (F,)) from dout (R, F) in the dtype of rows_forward's inputs."""
    rows, xb, beta, Wm, Wb, alpha = cache
    dWm = binarized_gradient(Wm, alpha, dout.T @ xb)
    dxb = dout @ Wb
    drows = dxb if beta is None else binarized_gradient(rows, beta, dxb)
    return drows, dWm, dout.sum(axis=0)


# --------------------------------------------------------------------------
# Training layers


class BinaryDense(Dense):
    """Dense with binarized weights (and inputs if binary_input). W (in, out) latent, in [-1, 1].

    forward: x (N, in_features) -> (N, out_features), in the parameters' dtype.
    """

    kind = "binary_dense"

    def __init__(self, in_features, out_features, binary_input=False, rng=None):
        super().__init__(in_features, out_features, rng=rng)
        self.binary_input = check_bool(binary_input, "binary_input")

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

    forward: x (N, C, H, W) -> (N, F, Ho, Wo), in the parameters' dtype.
    Padding adds zeros before binarization, so with binary inputs a padded
    position counts as sign(0) = +1, at training and inference alike.
    """

    kind = "binary_conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 binary_input=False, rng=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, rng=rng)
        self.binary_input = check_bool(binary_input, "binary_input")

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


# --------------------------------------------------------------------------
# From a float model, and the constraint that keeps training on [-1, 1]


def clip_latent(model):
    """The `constraint` for minicnn.fit: latent weights of `model` back into [-1, 1], in place, after every step."""
    for layer in model.layers:
        if isinstance(layer, (BinaryDense, BinaryConv2D)):
            np.clip(layer.params["W"], -1, 1, out=layer.params["W"])


def binarize(model, layers=None, binary_activations=False):
    """A copy of the Sequential `model` whose chosen Conv2D / Dense layers train with binary weights.

    layers: indices into model.layers; default every weight layer but the
    first and the last. The latent weights start from the float ones,
    clipped to [-1, 1], in float32. binary_activations: those layers also
    binarize their inputs; a ReLU feeding one (through Flatten / MaxPool2D)
    is removed, since sign(relu(x)) would be +1 everywhere: sign is the
    activation. Train the result with minicnn.fit(..., constraint=clip_latent),
    then `pack` it (packed.py).
    """
    check_sequential(model, "binarize")
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
    """Remove, in place, the ReLU that feeds the next layer through shape-only layers, if there is one."""
    for j in range(len(layers_so_far) - 1, -1, -1):
        if isinstance(layers_so_far[j], ReLU):
            del layers_so_far[j]
            return
        # Flatten and MaxPool2D keep non-negative values non-negative: a ReLU behind them
        # would still make every sign +1.
        if not isinstance(layers_so_far[j], (Flatten, MaxPool2D)):
            return
