"""Float layers to ONNX: minicnn's own, the pruned ones (optim.sparse), the weight-shared ones (optim.sharing).

Tensors are NCHW float32, as in minicnn; each layer maps to the operator computing the same thing:

    Conv2D     y = Conv(x, W, b), strides S, pads P          W (F, C, K, K) as stored
    Dense      y = Gemm(x, W, b) = x W + b                    W (in, out) as stored
    MaxPool2D  y = MaxPool(x), kernel K, strides S            floor mode (ceil_mode 0), as minicnn
    ReLU       y = Relu(x) = max(x, 0)
    Flatten    y = Flatten(x, axis 1)                         (N, C*H*W) in C, H, W order, as minicnn

Pruned layers (SparseConv2D, SparseDense) keep M, the weight matrix of optim.sparse: (F, C*K*K)
for a conv, (out, in) = W^T for a dense layer. The graph holds the whole M, zeros included,
as an initializer that `Graph.weight` stores sparse where that is smaller (graph.py: below
1/3 density for float32), and runs Conv on M reshaped to (F, C, K, K), or Gemm(x, M, b) with
transB = 1: y = x M^T + b. ONNX Runtime densifies the initializer when it loads the file.

Weight-shared layers (SharedConv2D, SharedDense: a codebook c of k floats and one cluster
index a_i per nonzero weight, W_i = c[a_i]) are decoded inside the graph, so the file keeps
one small integer per weight instead of a float:

    W = Gather(c', Cast(A, int32))      A: M's shape, uint8 (uint16 if k' > 256, uint32 if k' > 65,536)

With nothing pruned, c' = c and A holds the a_i. A pruned shared layer (Deep Compression)
uses c' = [0, c_0, ..., c_(k-1)] and A = a_i + 1 at the nonzeros, 0 at the pruned weights
(k' = k + 1 entries: with k = 2**16 clusters, the most optim.sharing allows, A is uint32),
so A is mostly zeros and `Graph.weight` stores it sparse where that is smaller (for uint8
indices below 1/9 density: one byte of index, eight of position). The Huffman coding of the
.npz has no ONNX operator, so the ONNX file is larger than the .npz. Every input of the
decoding is a constant, so ONNX Runtime computes W once, when it loads the model (constant
folding).

Operators: https://onnx.ai/onnx/operators/onnx__Conv.html, onnx__Gemm.html,
onnx__MaxPool.html, onnx__Relu.html, onnx__Flatten.html, onnx__Gather.html, onnx__Cast.html.
"""

import numpy as np

from minicnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU

from ..sharing import SharedConv2D, SharedDense
from ..sparse import SparseConv2D, SparseDense


def conv(g, x, W, b, kernel_size, stride, padding, name):
    """Conv of x with the tensors named W (F, C, K, K) and b (F,), or no bias if b is None."""
    k, s, p = kernel_size, stride, padding
    inputs = [x, W] if b is None else [x, W, b]
    return g.node("Conv", inputs, name, kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])


def float32(array):
    return np.ascontiguousarray(array, dtype=np.float32)


# The three kinds of conv and dense layer differ only in how their weights enter the graph (as
# stored, from the pruned matrix M, decoded from a codebook): each converter builds the tensor
# named W and hands it to conv_layer or gemm_layer, which add the bias and the operator.


def conv_layer(g, layer, x, W, name):
    """Conv(x, W, b) with the geometry and bias of the conv layer `layer`; W: (F, C, K, K)."""
    b = g.constant(f"{name}_b", float32(layer.params["b"]))
    return conv(g, x, W, b, layer.kernel_size, layer.stride, layer.padding, name)


def gemm_layer(g, layer, x, W, name, **attributes):
    """Gemm(x, W, b) = x W + b with the bias of the dense layer `layer`; x W^T + b with transB=1."""
    return g.node("Gemm", [x, W, g.constant(f"{name}_b", float32(layer.params["b"]))], name, **attributes)


def conv_shape(layer):
    """(F, C, K, K) of a conv layer whose weights are held as M (F, C*K*K)."""
    k = layer.kernel_size
    return (layer.out_channels, layer.in_channels, k, k)


def conv2d(g, layer, x, name):
    return conv_layer(g, layer, x, g.weight(f"{name}_W", float32(layer.params["W"])), name)


def dense(g, layer, x, name):
    return gemm_layer(g, layer, x, g.weight(f"{name}_W", float32(layer.params["W"])), name)


def sparse_conv2d(g, layer, x, name):
    W = g.weight(f"{name}_W", float32(layer.matrix()).reshape(conv_shape(layer)))
    return conv_layer(g, layer, x, W, name)


def sparse_dense(g, layer, x, name):
    return gemm_layer(g, layer, x, g.weight(f"{name}_M", float32(layer.matrix())), name, transB=1)


def shared_weights(g, layer, shape, name):
    """The name of W decoded in the graph, Gather(codebook', indices), in `shape` (M's size)."""
    rows, cols = layer.shape
    pruned = layer.positions.size < rows * cols
    indices = np.zeros(rows * cols, np.int64)
    indices[layer.positions] = layer.labels + pruned  # pruned: index 0 is a pruned weight, 1 + a is cluster a
    codebook = float32(layer.params["codebook"])
    table = np.concatenate([np.zeros(1, np.float32), codebook]) if pruned else codebook
    dtype = np.min_scalar_type(table.size - 1)  # uint8, uint16 or uint32: the largest index must fit
    stored = g.weight(f"{name}_indices", indices.astype(dtype).reshape(shape))
    wide = g.node("Cast", [stored], f"{name}_indices_int32", to=g.onnx.TensorProto.INT32)
    return g.node("Gather", [g.constant(f"{name}_codebook", table), wide], f"{name}_W")


def shared_conv2d(g, layer, x, name):
    return conv_layer(g, layer, x, shared_weights(g, layer, conv_shape(layer), name), name)


def shared_dense(g, layer, x, name):
    return gemm_layer(g, layer, x, shared_weights(g, layer, layer.shape, name), name, transB=1)


def maxpool2d(g, layer, x, name):
    """MaxPool(x); also the int8 model's IntMaxPool2D, on the codes (int8.py)."""
    k, s = layer.kernel_size, layer.stride
    return g.node("MaxPool", [x], name, kernel_shape=[k, k], strides=[s, s])


def relu(g, layer, x, name):
    return g.node("Relu", [x], name)


def flatten(g, layer, x, name):
    """Flatten(x, axis 1); also the int8 model's IntFlatten, on the codes (int8.py)."""
    return g.node("Flatten", [x], name, axis=1)


# Each layer class (exactly: a subclass may compute something else) -> converter(g, layer, x, name),
# which adds the layer's nodes reading the tensor named x and returns its output's name (`name`).
CONVERTERS = {
    Conv2D: conv2d, Dense: dense, MaxPool2D: maxpool2d, ReLU: relu, Flatten: flatten,
    SparseConv2D: sparse_conv2d, SparseDense: sparse_dense,
    SharedConv2D: shared_conv2d, SharedDense: shared_dense,
}
