"""Packed inference layers for binary networks: one bit per weight.

`pack` turns each trained BinaryDense / BinaryConv2D (layers.py) into an
inference-only layer. Output channel j keeps the signs bits(W_j) of its n
latent weights (xnor.py's bit layout), 32x smaller than float32, plus
alpha_j = mean_i |W_ji| and the bias b_j in float32. With real inputs
(binary weights only, BinaryConnect, Courbariaux et al., NeurIPS 2015) no
multiplication is needed inside the sum:

    y_j = alpha_j * (sum_{bit_i=1} x_i - sum_{bit_i=0} x_i) + b_j

With binary inputs (BNN, Hubara et al., NeurIPS 2016; XNOR-Net, Rastegari
et al., ECCV 2016) the input x's signs are packed too, beta = mean_i |x_i|,
and the dot product is an XNOR-popcount:

    y_j = alpha_j * beta * (n - 2 popcount(bits(x) XOR bits(W_j))) + b_j

Both equal the training layers' forward up to float32 rounding.
"""

import copy
import math

import numpy as np

from minicnn import direct, kernels, narrow
from minicnn.checks import check_array, check_bool
from minicnn.layers import Conv2D, Dense, Layer
from minicnn.model import Sequential
from minicnn.serialization import stored_array

from . import addsub, chain, windows, xnor
from .layers import BinaryConv2D, BinaryDense


class PackedBinaryLayer(Layer):
    """Shared storage of the inference layers: F rows of n signs, packed, with alpha and b.

    bits (F, ceil(n / 64)) uint64, alpha (F,) >= 0 and b (F,), kept as float32.
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
        self.n, self.binary_input = int(n), check_bool(binary_input, "binary_input")
        # Real inputs meet the signs 16 outputs at a time (addsub.py): the same bits, laid out by input.
        self.lanes = None if self.binary_input else addsub.pack_lanes(self.signs())
        self.fused = True  # minicnn.inference runs it in a stage (fused_conv, fused_dense)
        self._laid_out = {}  # what predict's kernels read, by layout: built on first use

    @classmethod
    def _from_latent(cls, Wm, b, binary_input, **geometry):
        """From latent weights Wm (F, n) and b (F,): their signs, packed, and alpha = mean |Wm| per row."""
        Wm = np.asarray(Wm, np.float32)
        alpha = np.abs(Wm).mean(axis=1)
        return cls(xnor.pack_signs(Wm), alpha, np.asarray(b, np.float32), binary_input=binary_input, **geometry)

    # minicnn.inference's offer: a small batch of a network of these layers in one compiled call
    network_chain = staticmethod(chain.network_chain)

    def signs(self):
        """The weights' signs (F, n) float32 in {-1, +1}."""
        return xnor.unpack_signs(self.bits, self.n)

    def decoded(self):
        """alpha_j * s_ji (F, n) float32: the weights the float kernels read (their layouts are kept,
        not this)."""
        return self.signs() * self.alpha[:, None]

    def rows_forward(self, rows):
        """out (R, F) float32 from rows (R, n) float32 of real inputs: the layer's product with each
        row, alpha, b added (addsub.py)."""
        return addsub.addsub_dense(rows, self.lanes, self.alpha, self.b)

    def _blocked(self, key, signs):
        """xnor.blocked(windows.window_filters(signs())), signs() the filters' signs (F, KH, KW, C) in
        the order windows.window_rows reads an input (a dense layer's (F, 1, 1, n)): made once under
        `key`. The XNOR kernel then runs as windows.conv_runner: the signs of the input's window lines packed
        and beta, the K x K windows' means of |x|, in one pass, each window's lines read in place
        against them, the ReLU and the 2x2 pool in the kernel's registers."""
        if key not in self._laid_out:
            self._laid_out[key] = xnor.blocked(windows.window_filters(signs()))
        return self._laid_out[key]

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} is inference-only: train the Binary layer it was packed from")

    def state(self):
        stream = np.packbits(self.signs().reshape(-1) > 0)
        return {"signs": stream, "alpha": self.alpha, "b": self.b}

    @staticmethod
    def _arrays(arrays, float_shapes):
        """(bits (F, words) uint64, alpha (F,), b (F,)) from stored arrays, checked against the shapes
        of the float layer's params (`param_shapes`, which checked the config) before anything is built."""
        F, n = float_shapes["b"][0], math.prod(float_shapes["W"]) // float_shapes["b"][0]
        stream = stored_array(arrays, "signs", ((F * n + 7) // 8,), dtypes=(np.dtype(np.uint8),))
        alpha, b = stored_array(arrays, "alpha", (F,)), stored_array(arrays, "b", (F,))
        signs = np.unpackbits(stream)[: F * n].reshape(F, n).astype(np.float32) * 2 - 1
        return xnor.pack_signs(signs), alpha, b

    def stats(self):
        F = self.alpha.shape[0]
        params = F * self.n + F  # weights and biases, as the float layer counts them
        nbytes = (F * self.n + 7) // 8 + self.alpha.nbytes + self.b.nbytes
        return {"params": params, "nonzero": params, "bits_per_weight": 8 * nbytes / params, "bytes": nbytes}


class PackedBinaryDense(PackedBinaryLayer):
    """Inference-only BinaryDense: x (N, in_features) -> (N, out_features) float32."""

    kind = "packed_binary_dense"

    def __init__(self, bits, alpha, b, in_features, binary_input=False):
        Dense.param_shapes(in_features, alpha.shape[0])  # checks the geometry
        super().__init__(bits, alpha, b, in_features, binary_input)
        self.in_features, self.out_features = self.n, self.alpha.shape[0]

    @classmethod
    def from_layer(cls, layer):
        return cls._from_latent(layer.params["W"].T, layer.params["b"], layer.binary_input,
                                in_features=layer.in_features)

    @classmethod
    def from_state(cls, config, arrays):
        bits, alpha, b = cls._arrays(arrays, Dense.param_shapes(**config))
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
        if self.binary_input:  # predict's stage, on a batch of x's shape
            return self.fused_dense(x.shape, False)(x, np.empty((x.shape[0], self.out_features), np.float32))
        return self.rows_forward(x)

    def fused_dense(self, shape, relu):
        """For minicnn.inference: run(x, out) on x of `shape` (minicnn.inference's protocol), its
        inputs met in x's order: the lanes' columns, the weights' rows or their signs put in it once.

        Binary inputs: each row of x a 1 x 1 image of K channels for the XNOR kernel (see
        _blocked), against the weights' signs in x's order; beta = mean |x| per row.

        Below addsub.ADDSUB_BELOW rows, the masked adds of addsub.py, which read a bit per weight where
        the float kernel reads 4 bytes: LeNet-5's fc1 at batch 1 took 16 us against 36. From 8
        rows on, a tile of 8 rows reads each weight once for all 8 and the two ran level or the
        float kernel ahead (0.87-1.16x on fc1 and on a 336 -> 319 layer), so the kernel a float32
        Dense of the same shape runs (minicnn.inference: minicnn.narrow's for at most 16 outputs,
        else direct.dense_block's) runs on the decoded weights alpha_j * s_ji.
        """
        N, K, F = shape[0], self.in_features, self.out_features
        if self.binary_input:
            xnor_run = windows.conv_runner((N, 1, 1, K), 1, 1, self.window_bits(shape), self.n, self.alpha, self.b,
                                           relu, False)

            def run(x, out):  # each row a 1 x 1 image of K channels
                xnor_run(x.reshape(N, 1, 1, K), out.reshape(N, 1, 1, F))
                return out

            return run
        if N < addsub.ADDSUB_BELOW:
            kernel, lanes = addsub.addsub_dense_runner((N, K), F, relu), self.in_order("lanes", shape)
            return lambda x, out: kernel(x.reshape(N, K), lanes, self.alpha, self.b, out)
        if F <= narrow.MAX_OUTPUTS:
            kernel, order = narrow.narrow_dense_runner((N, K), F, relu), narrow.input_order(shape)
            W = self.in_order("W")
            return lambda x, out: kernel(x.reshape(N, K), order, W, self.b, out)
        kernel, W = direct.dense_block_runner((N, K), F, relu), self.in_order("W", shape)
        return lambda x, out: kernel(x.reshape(N, K), W, self.b, out)

    def window_bits(self, shape):
        """The XNOR kernel's weights (_blocked) for a stage's binary inputs of `shape`, each row a 1 x 1
        image of its K values in the order narrow.input_order gives them; kept."""
        order, F = narrow.input_order(shape), self.out_features
        return self._blocked(("window bits", shape[1:]), lambda: self.signs()[:, order].reshape(F, 1, 1, self.n))

    def in_order(self, what, shape=None):
        """The lanes' columns ("lanes") or the decoded W (in, out)'s rows ("W") in the order of a stage's
        inputs of `shape` (narrow.input_order), or in their own order without one; kept."""
        key = (what, None if shape is None else shape[1:])
        if key not in self._laid_out:
            order = slice(None) if shape is None else narrow.input_order(shape)
            kept = self.lanes[:, order] if what == "lanes" else self.decoded().T[order]
            self._laid_out[key] = np.ascontiguousarray(kept)
        return self._laid_out[key]

    def macs(self, in_shape):
        return self.in_features * self.out_features

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "binary_input": self.binary_input}


class PackedBinaryConv2D(PackedBinaryLayer):
    """Inference-only BinaryConv2D: x (N, C, H, W) -> (N, F, Ho, Wo) float32 (real inputs through im2row rows,
    binary ones through the XNOR kernel's windows read in place)."""

    kind = "packed_binary_conv2d"

    def __init__(self, bits, alpha, b, in_channels, kernel_size, stride=1, padding=0, binary_input=False):
        Conv2D.param_shapes(in_channels, alpha.shape[0], kernel_size, stride, padding)  # checks the geometry
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
        bits, alpha, b = cls._arrays(arrays, Conv2D.param_shapes(**config))
        return cls(bits, alpha, b, config["in_channels"], config["kernel_size"], config["stride"], config["padding"],
                   config["binary_input"])

    def output_shape(self, in_shape):
        return Conv2D.output_shape(self, in_shape)  # the same geometry and checks as the float layer

    def forward(self, x):
        check_array(x, f"{type(self).__name__} input", ndim=4, finite=False)
        _, Ho, Wo = self.output_shape(x.shape[1:])
        x = np.ascontiguousarray(x, dtype=np.float32)
        k, xp = self.kernel_size, kernels.pad(x, self.padding)
        if self.binary_input:
            xp = np.ascontiguousarray(xp.transpose(0, 2, 3, 1))
            out = self.fused_conv(xp.shape, False, False)(xp, np.empty((x.shape[0], Ho, Wo, self.out_channels),
                                                                       np.float32))
        else:
            out = self.rows_forward(kernels.im2row(xp, k, k, self.stride))
        return np.ascontiguousarray(out.reshape(x.shape[0], Ho, Wo, -1).transpose(0, 3, 1, 2))

    def fused_conv(self, padded_shape, relu, pool):
        """For minicnn.inference: run(xp, out) on channels-last padded inputs.

        Real inputs: the float conv kernel (minicnn.direct) on the decoded weights alpha_j * s_ji.
        A conv is arithmetic-bound (its weights stay in cache while many pixels use them), and a
        masked add issues at a multiply-add's rate: read as bits, the weights would buy no speed.
        Binary inputs: the XNOR kernel on the windows read in place (see _blocked), against the
        filters' signs in (kh, kw, c) order.
        """
        F, K = self.out_channels, self.kernel_size
        if self.binary_input:
            return windows.conv_runner(padded_shape, K, self.stride, self.window_bits(), self.n, self.alpha, self.b,
                                       relu, pool)
        kernel, w = direct.conv_block_runner(padded_shape, F, K, self.stride, relu, pool), self.filters(pool)
        return lambda xp, out: kernel(xp, w, self.b, out)

    def window_bits(self, shape=None):
        """The XNOR kernel's weights (_blocked): the filters' signs in (kh, kw, c) order; kept. (`shape`,
        a dense layer's argument, does not matter to a conv.)"""
        F, K = self.out_channels, self.kernel_size
        return self._blocked("window bits",
                             lambda: self.signs().reshape(F, self.in_channels, K, K).transpose(0, 2, 3, 1))

    def filters(self, pool):
        """The decoded weights alpha_j * s_ji in direct.pack_filters' layout for a stage with or without
        its 2x2 pool (the layout depends on it); kept."""
        key, F, K = ("filters", pool), self.out_channels, self.kernel_size
        if key not in self._laid_out:
            self._laid_out[key] = direct.pack_filters(self.decoded().reshape(F, self.in_channels, K, K), self.stride,
                                                      pool)
        return self._laid_out[key]

    def macs(self, in_shape):
        _, Ho, Wo = self.output_shape(in_shape)
        return self.n * self.out_channels * Ho * Wo

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "binary_input": self.binary_input}


PACKED = {BinaryDense: PackedBinaryDense, BinaryConv2D: PackedBinaryConv2D}


def pack(model):
    """A copy of a trained binarized Sequential for inference: every Binary layer packed to bits, the rest copied."""
    if not any(type(layer) in PACKED for layer in model.layers):
        raise ValueError("the model has no BinaryDense / BinaryConv2D layer to pack; binarize and train it first")
    layers = [PACKED[type(layer)].from_layer(layer) if type(layer) in PACKED else copy.deepcopy(layer)
              for layer in model.layers]
    for layer in layers:
        layer.cache = None  # deepcopy copied the last training activations: an inference model keeps none alive
    return Sequential(layers, input_shape=model.input_shape)
