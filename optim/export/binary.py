"""Binary layers to ONNX (optim.binary): Conv / Gemm with +-alpha weights, sign(x) where they binarize inputs.

Output channel j of a binary layer has n weight signs s_ji and the scale alpha_j, so its
weights are A_ji = alpha_j s_ji (XNOR-Net's W~). ONNX has no 1-bit tensor type, and ONNX
Runtime no XNOR-popcount kernel: the graph runs a float32 Conv or Gemm with A, and the file
keeps one bit per weight by decoding A in the graph from the packed signs (np.packbits
order, most significant bit first), as the .npz stores them:

    bits = Mod(BitShift(bytes (B, 1), [7, 6, ..., 0], RIGHT), 2)       (B, 8) uint8 in {0, 1}
    A    = (2 Cast(bits[:F n], float) - 1).reshape(F, n) * alpha[:, None]

Every input of that is a constant, so ONNX Runtime computes A once, when it loads the model.

Real inputs (BinaryConnect):   y = x A^T + b                   Gemm(x, A, b, transB 1), or Conv
Binary inputs (XNOR-Net):      y = beta(x) (sign(x) A^T) + b   beta = mean_i |x_i| over the row

    sign(x) = Where(x >= 0, 1, -1)    minicnn's sign maps 0 to +1 (a set bit); ONNX's Sign maps
                                      it to 0, and exact zeros occur (zero padding, an image's background)
    beta    = MatMul(|x|, 1/n)        (N, 1), the mean as a product with a constant column: one
                                      node at every opset (ReduceMean's axes became an input in 18)
    conv:     the input is padded with zeros first (Pad), which count as sign(0) = +1 as in
              minicnn; the receptive fields' beta is Conv(|x_padded|, 1/n) with one (1, C, K, K)
              filter of 1/n, (N, 1, Ho, Wo); then Conv(sign(x_padded), A) * beta + b.

The training layers (BinaryDense, BinaryConv2D) are exported as the packed layers they
`pack` into (PackedBinary*.from_layer): the same signs and alpha, the same outputs.

Operators: https://onnx.ai/onnx/operators/onnx__Gemm.html, onnx__Conv.html, onnx__Where.html,
onnx__GreaterOrEqual.html, onnx__Abs.html, onnx__MatMul.html, onnx__Pad.html,
onnx__BitShift.html, onnx__Mod.html, onnx__Slice.html.
"""

import numpy as np

from ..binary import BinaryConv2D, BinaryDense, PackedBinaryConv2D, PackedBinaryDense
from .layers import conv


def signed_weights(g, layer, shape, name):
    """The name of A = alpha_j s_ji in `shape` ((F, n) or (F, C, K, K)), unpacked in the graph from bits."""
    F, n = layer.alpha.size, layer.n
    packed = layer.state()["signs"][:, None]  # the file's bytes (np.packbits of s > 0): (ceil(F n / 8), 1) uint8
    shifts = g.constant(f"{name}_shifts", np.arange(7, -1, -1, dtype=np.uint8)[None])
    shifted = g.node("BitShift", [g.constant(f"{name}_signs", packed), shifts], f"{name}_shifted", direction="RIGHT")
    bits = g.node("Mod", [shifted, g.scalar(f"{name}_two", 2, np.uint8)], f"{name}_bits")
    flat = g.node("Reshape", [bits, g.constant(f"{name}_flat", np.array([-1], np.int64))], f"{name}_bits_flat")
    start = g.constant(f"{name}_start", np.array([0], np.int64))
    end = g.constant(f"{name}_end", np.array([F * n], np.int64))
    used = g.node("Slice", [flat, start, end], f"{name}_bits_used")  # the last byte's padding bits dropped
    ones = g.node("Cast", [used], f"{name}_bits_float", to=g.onnx.TensorProto.FLOAT)
    doubled = g.node("Mul", [ones, g.scalar(f"{name}_2", 2.0)], f"{name}_twice")
    signs = g.node("Sub", [doubled, g.scalar(f"{name}_1", 1.0)], f"{name}_signs_float")
    target = g.constant(f"{name}_shape", np.array(shape, np.int64))
    shaped = g.node("Reshape", [signs, target], f"{name}_signs_shaped")
    alpha = layer.alpha.astype(np.float32).reshape(F, *[1] * (len(shape) - 1))
    return g.node("Mul", [shaped, g.constant(f"{name}_alpha", alpha)], f"{name}_A")


def signs_of(g, x, name):
    """sign(x) with sign(0) = +1, as minicnn's: Where(x >= 0, 1, -1)."""
    nonnegative = g.node("GreaterOrEqual", [x, g.scalar(f"{name}_0", 0.0)], f"{name}_nonnegative")
    return g.node("Where", [nonnegative, g.scalar(f"{name}_plus_one", 1.0), g.scalar(f"{name}_minus_one", -1.0)],
                  f"{name}_sign")


def packed_dense(g, layer, x, name):
    A = signed_weights(g, layer, (layer.out_features, layer.in_features), name)
    b = g.constant(f"{name}_b", layer.b.astype(np.float32))
    if not layer.binary_input:
        return g.node("Gemm", [x, A, b], name, transB=1)
    # beta = |x| (1/n column): a MatMul rather than ReduceMean, whose axes moved from an attribute
    # to an input in opset 18, so the same node is valid at every opset the export writes.
    mean_column = g.constant(f"{name}_mean", np.full((layer.n, 1), 1 / layer.n, np.float32))
    beta = g.node("MatMul", [g.node("Abs", [x], f"{name}_abs"), mean_column], f"{name}_beta")
    dots = g.node("Gemm", [signs_of(g, x, name), A], f"{name}_dots", transB=1)
    return g.node("Add", [g.node("Mul", [dots, beta], f"{name}_scaled"), b], name)


def packed_conv2d(g, layer, x, name):
    k, C, F, p = layer.kernel_size, layer.in_channels, layer.out_channels, layer.padding
    A = signed_weights(g, layer, (F, C, k, k), name)
    if not layer.binary_input:
        b = g.constant(f"{name}_b", layer.b.astype(np.float32))
        return conv(g, x, A, b, k, layer.stride, p, name)
    if p:
        pads = g.constant(f"{name}_pads", np.array([0, 0, p, p, 0, 0, p, p], np.int64))
        x = g.node("Pad", [x, pads], f"{name}_padded")
    # beta per receptive field, the mean of |x| over each C x K x K window: a Conv with one 1/n filter
    # (AveragePool would average each channel apart).
    mean_filter = g.constant(f"{name}_mean", np.full((1, C, k, k), 1 / layer.n, np.float32))
    beta = conv(g, g.node("Abs", [x], f"{name}_abs"), mean_filter, None, k, layer.stride, 0, f"{name}_beta")
    dots = conv(g, signs_of(g, x, name), A, None, k, layer.stride, 0, f"{name}_dots")
    b = g.constant(f"{name}_b", layer.b.astype(np.float32).reshape(F, 1, 1))
    return g.node("Add", [g.node("Mul", [dots, beta], f"{name}_scaled"), b], name)


def binary_dense(g, layer, x, name):
    return packed_dense(g, PackedBinaryDense.from_layer(layer), x, name)


def binary_conv2d(g, layer, x, name):
    return packed_conv2d(g, PackedBinaryConv2D.from_layer(layer), x, name)


# Layer class -> converter(g, layer, x, name), as layers.CONVERTERS.
CONVERTERS = {PackedBinaryDense: packed_dense, PackedBinaryConv2D: packed_conv2d,
              BinaryDense: binary_dense, BinaryConv2D: binary_conv2d}
