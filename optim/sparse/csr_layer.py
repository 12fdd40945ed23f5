"""Layers whose weight matrix M is held as its nonzeros in CSR, run by the sparse kernels.

A layer here is two independent choices, one class each:
  the geometry, how M is used: CSRDense (M = W.T, y = x @ W + b) or CSRConv2D
      (M = W.reshape(F, C*KH*KW), one row per filter), both in this module;
  the storage, what M's nonzeros are made of: trained values (optim.sparse's
      SparseLayer, for pruning) or codebook[labels] (optim.sharing's SharedLayer).
So SparseDense is SparseLayer + CSRDense, and a weight-shared layer runs the very
same forward and backward as a pruned one.

Forward picks the kernel per call: the sparse kernels (kernels.py, vector.py)
below the density where they beat the dense product (`SPARSE_BELOW`, which
depends on the batch size), the dense product of the rebuilt M above it.
Backward always goes through the dense M: its gradient is dL/dM = dout^T x.

predict runs the layers in minicnn.inference's fused stages (`fused`,
`fused_conv`, `fused_dense`): predict's float kernels on the dense M, or the
sparse kernel where it still wins (FUSED_*), measured against those fused
kernels, which are several times faster than the dense forward. The file
stays sparse or shared.
"""

import numpy as np

from minicnn import direct, kernels, narrow
from minicnn.checks import check_kernel_array, check_positive_int
from minicnn.layers import Conv2D, Dense, Layer
from minicnn.simd import HAS_PERMUTE

from .format import csr_to_dense
from .kernels import conv_taps, csr_matmul, csr_matvec, sparse_conv2d
from .vector import blocked_matmul, column_blocks, lane_layout, lane_values, lanes_matmul

# Densities below which the sparse kernel beats the dense one, per layer type
# and batch size {smallest batch: density}: a batch of N uses the entry of the
# largest listed batch <= N. From bench/bench_pruning.py's density sweep on the
# 2-core machine, 2 threads (the default), fastest repeats (dense / sparse):
# - Dense, fc1 800x500, with the 16-lane kernels: 1.18x at 40% and 1.06x at
#   50% density at batch 1; 1.13x at 30% at batch 2 (0.88x at 40%); 1.28x at
#   40% at 4; 1.36x at 20% at 16 (0.98x at 30%: blocked_matmul's one-vector
#   tiles below 64 inputs); 1.36x at 30% and 1.07x at 40% at 64. The entries
#   keep a margin below each break-even. Batch 1 is lanes_matmul's figure:
#   without AVX-512 the CSR loops run there, and they won up to 20%.
# - Conv2D, the direct conv (16 lanes at stride 1): on conv2 (20->50, 8x8
#   outputs) 1.23x at 50% density at batch 1 (0.89x at 70%) and 1.14x at 50% at
#   batch 64 (0.82x at 70%); on conv1 (1 -> 20) 1.09x at 70% at batch 1, 1.05x at
#   40% and 0.90x at 50% at batch 64. Batches 2-63 were not swept: the entry
#   from batch 2 on is the batch-64 figure.
SPARSE_BELOW = {"dense": {1: 0.4 if HAS_PERMUTE else 0.2, 2: 0.3, 4: 0.35, 16: 0.2, 64: 0.3},
                "conv2d": {1: 0.45, 2: 0.3}}

# The same against predict's fused stages (minicnn.inference: the direct conv with ReLU and pool in
# its epilogue, the register-tiled dense kernels), which are several times faster than the dense
# forward above. Session 8, 2 threads, alternating rounds, sparse time / fused time at 5/10/20/30%:
# - Conv2D: with one input channel (LeNet-5's conv1, the seed CNN's conv) the sparse conv lost at
#   every density (0.33-0.60x at batch 1, 0.15-0.42x at 64); on LeNet-5's conv2 (20 channels) it
#   won at 5-10% (1.5-2.0x), tied at 20% and lost at 30% (0.82-0.93x). A conv stage is chosen once
#   for every batch size, so a sparse conv runs in a stage from one input channel or from 20%.
# - Dense: on fc1 (800 -> 500) the sparse kernels won to 20% at every batch (1.7-5.5x; 0.87x once,
#   at 16 rows), on the seed CNN's classifier (5408 -> 10) to 20% below 64 rows (1.05-1.9x) and
#   never from 64 (0.40-0.56x). A dense stage picks its kernel per batch size.
FUSED_CONV_SPARSE_BELOW = 0.2
FUSED_DENSE_SPARSE_BELOW = 0.15  # at 16 rows on fc1, 20% was a loss
NARROW_SPARSE_UP_TO = 63  # rows: a classifier's sparse kernel loses to narrow.narrow_dense from 64

# SparseDense runs lanes_matmul (one input at a time) up to this batch size, blocked_matmul (16
# inputs a vector) above. fc1 at 10% density, two runs: lanes_matmul won at batch 8 (33-41 us
# against 58-70), they tied at 12 (49-61 against 61-71), blocked_matmul won at 16 (62 against 65-81).
LANES_MATMUL_UP_TO = 8


def sparse_below(family, batch):
    """The density under which the sparse kernel of `family` ("dense", "conv2d") wins at this batch size."""
    table = SPARSE_BELOW[family]
    return table[max((b for b in table if b <= batch), default=min(table))]  # an empty batch: the smallest


class CSRLayer(Layer):
    """The machinery of a weight matrix M (rows, cols) held as its nonzeros in CSR, plus a bias.

    CSR structure: `indices` (nnz,) uint32 and `indptr` (rows+1,) int64; params are
    {weight_param: what the nonzeros are made of, "b": (rows,) bias}. A storage class provides
        weight_param      the name of that param ("values", "codebook")
        values()          (nnz,) float, M's nonzeros in CSR order
        weight_grad(dM)  dL/d(params[weight_param]) from dL/dM (rows, cols)
        storage_config()  its constructor arguments, added to the geometry's in config()
    and a geometry class (CSRDense, CSRConv2D) provides sparse_family, forward and backward.
    """

    def set_structure(self, shape, indices, indptr, params):
        self.shape = tuple(shape)
        self.indices, self.indptr = np.ascontiguousarray(indices, np.uint32), indptr
        self.params = params
        self.grads = {name: np.zeros_like(p) for name, p in params.items()}
        self._dense = None  # M, built on demand when the dense kernel is faster
        # What the kernels derive from the layer, built on first use: what follows from the pattern
        # alone (_pattern) lasts as long as the pattern; the weights laid out for a kernel (the sparse
        # kernels' values, predict's dense weights: _laid_out_as), until training changes them.
        self._patterns, self._laid_out = {}, {}

    @property
    def density(self):
        return self.indices.size / (self.shape[0] * self.shape[1])

    def matrix(self):
        """The dense M (rows, cols), with the current values."""
        return csr_to_dense(self.values(), self.indices, self.indptr, self.shape)

    def _dense_matrix(self):
        # Cached for inference; rebuilt when training (or a cast) changed the weights M is made of.
        # The comparison costs O(nnz) at most, far below the dense product that follows.
        w = self.params[self.weight_param]
        if self._dense is None or self._dense[0].dtype != w.dtype or not np.array_equal(self._dense[0], w):
            self._dense = (w.copy(), self.matrix())
        return self._dense[1]

    def _pattern(self, name, build):
        """build(), something derived from the sparsity pattern alone: computed once per pattern."""
        if name not in self._patterns:
            self._patterns[name] = build()
        return self._patterns[name]

    def _laid_out_as(self, layout, build):
        """build(): the weights laid out for a kernel (`layout` names it), kept until backward.

        Laid out again after backward (training is about to change them) or when the array
        they come from is a new one (a cast; `layer.params["values"] = edited`). Values changed
        in place by hand, outside training, are not noticed: comparing them at every call
        would cost as much as the batch-1 kernel itself. (`_dense_matrix` does compare them:
        next to a dense product the comparison is cheap.)"""
        source = self.params[self.weight_param]
        kept = self._laid_out.get(layout)
        if kept is None or kept[0] is not source:
            kept = self._laid_out[layout] = (source, build())
        return kept[1]  # not read back from the dict: backward on another thread may empty it

    def _bias(self):
        """params["b"], checked for predict's kernels: a user may replace it, as a Dense's."""
        return check_kernel_array(self.params["b"], "bias", (self.shape[0],))

    def uses_sparse_kernel(self, batch=1):
        """Whether forward runs the sparse kernel for a batch of this many inputs (SPARSE_BELOW)."""
        return self.density < sparse_below(self.sparse_family, batch)

    def macs(self, in_shape):
        return self.indices.size


class CSRDense(CSRLayer):
    """Geometry of Dense (y = x @ W + b) with M = W.T (out, in): x (N, in_features) -> (N, out_features)."""

    sparse_family = "dense"
    float_class = Dense  # the layer whose weights M holds

    def _set_geometry(self, in_features, out_features):
        """Check and keep the arguments; returns the shape of M."""
        self.in_features = check_positive_int(in_features, "in_features")
        self.out_features = check_positive_int(out_features, "out_features")
        return (self.out_features, self.in_features)

    def to_dense(self):
        layer = Dense(self.in_features, self.out_features)
        layer.params = {"W": np.ascontiguousarray(self.matrix().T), "b": self.params["b"].copy()}
        layer.grads = {name: np.zeros_like(p) for name, p in layer.params.items()}
        return layer

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"{type(self).__name__} expects inputs of shape ({self.in_features},), "
                             f"got {tuple(in_shape)}")
        return (self.out_features,)

    def forward(self, x):
        x = self._input(x, 2, self.in_features)
        self.cache = x
        if self.uses_sparse_kernel(len(x)):
            return self.sparse_forward(np.ascontiguousarray(x))
        out = x @ self._dense_matrix().T
        out += self.params["b"]
        return out

    def sparse_forward(self, x):
        """y (N, out) from x (N, in) with the fastest sparse kernel that applies: in float32 the
        16-lane ones (lanes_matmul up to LANES_MATMUL_UP_TO inputs where the CPU has vpermi2ps,
        blocked_matmul for more), otherwise the CSR loops (float64; one input without AVX-512)."""
        b = self.params["b"]
        vector = x.dtype == b.dtype == self.params[self.weight_param].dtype == np.float32
        if vector and 0 < len(x) <= LANES_MATMUL_UP_TO and HAS_PERMUTE:
            _, lane_columns, layer_ptr = self._lanes()
            return lanes_matmul(self._values_in("lanes"), lane_columns, layer_ptr, x, b)
        if vector and len(x) > 1:
            _, block_columns, block_ptr = self._blocks()
            return blocked_matmul(self._values_in("blocks"), block_columns, block_ptr, x, b)
        if len(x) == 1:
            return csr_matvec(self.values(), self.indices, self.indptr, x[0], b)[None]
        return csr_matmul(self.values(), self.indices, self.indptr, x, b)

    @property
    def fused(self):
        """Whether predict runs the layer in a fused stage (minicnn.inference): in float32 it does."""
        return self.dtype == np.float32

    def fused_dense(self, shape, relu):
        """For minicnn.inference: run(x, out) on x of `shape` (its protocol), the kernel picked for
        its N rows.

        Below FUSED_DENSE_SPARSE_BELOW (a classifier of at most 16 outputs: and below 64 rows)
        sparse_forward, on rows in Flatten's order; else predict's float kernel for the layer's
        width on the dense weights, their rows put in x's order once. Like the sparse kernels'
        layouts (_laid_out_as), the dense weights follow training, not values edited by hand.
        """
        N, O = shape[0], self.out_features
        order = narrow.input_order(shape)
        if self.density < FUSED_DENSE_SPARSE_BELOW and (N <= NARROW_SPARSE_UP_TO or O > narrow.MAX_OUTPUTS):
            def run(x, out):
                rows = x.transpose(0, 3, 1, 2) if len(shape) == 4 else x
                out[...] = self.sparse_forward(np.ascontiguousarray(rows.reshape(N, -1)))
                return np.maximum(out, 0, out=out) if relu else out

            return run

        def weights():  # W (in, out), its rows in x's order
            return self._laid_out_as(("W", shape[1:]), lambda: np.ascontiguousarray(self.matrix().T[order]))

        if O <= narrow.MAX_OUTPUTS:
            kernel, identity = narrow.narrow_dense_runner((N, order.size), O, relu), np.arange(order.size)
            return lambda x, out: kernel(x.reshape(N, -1), identity, weights(), self._bias(), out)
        kernel = direct.dense_block_runner((N, order.size), O, relu)
        return lambda x, out: kernel(x.reshape(N, -1), weights(), self._bias(), out)

    def chain_params(self):
        """For minicnn.chain: (W (in, out), b) dense float32, kept as fused_dense keeps its weights,
        where predict runs the layer on them at a chain's batch sizes (from FUSED_DENSE_SPARSE_BELOW);
        else None, and the layer runs in a stage of its own kernel."""
        if not self.fused or self.density < FUSED_DENSE_SPARSE_BELOW:
            return None
        return self._laid_out_as("chain", lambda: np.ascontiguousarray(self.matrix().T)), self.params["b"]

    def _blocks(self):
        return self._pattern("blocks", lambda: column_blocks(self.indices, self.indptr, self.shape[1]))

    def _lanes(self):
        return self._pattern("lanes", lambda: lane_layout(self.indices, self.indptr, self.shape[1]))

    def _values_in(self, layout):
        """The values laid out for `layout`'s kernel ("blocks", "lanes")."""
        if layout == "blocks":
            return self._laid_out_as(layout, lambda: self.values()[self._blocks()[0]])
        slots, lane_columns, _ = self._lanes()
        return self._laid_out_as(layout, lambda: lane_values(self.values(), slots, lane_columns.size))

    def backward(self, dout):
        self._laid_out = {}
        x, dout = self.cache, dout.astype(self.dtype, copy=False)
        self.grads[self.weight_param] = self.weight_grad(dout.T @ x)  # dL/dM = dout^T x, (out, in)
        self.grads["b"] = dout.sum(axis=0)
        return dout @ self._dense_matrix()

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features, **self.storage_config()}


class CSRConv2D(CSRLayer):
    """Geometry of Conv2D with M = W.reshape(F, C*KH*KW): x (N, C, H, W) -> (N, F, Ho, Wo)."""

    sparse_family = "conv2d"
    float_class = Conv2D

    def _set_geometry(self, in_channels, out_channels, kernel_size, stride, padding):
        """Check and keep the arguments; returns the shape of M."""
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = check_positive_int(stride, "stride")
        self.padding = check_positive_int(padding, "padding", minimum=0)
        return (self.out_channels, self.in_channels * self.kernel_size**2)

    def _weight(self):
        k = self.kernel_size
        return self._dense_matrix().reshape(self.out_channels, self.in_channels, k, k)

    def to_dense(self):
        layer = Conv2D(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding)
        layer.params = {"W": self._weight().copy(), "b": self.params["b"].copy()}
        layer.grads = {name: np.zeros_like(p) for name, p in layer.params.items()}
        return layer

    output_shape = Conv2D.output_shape

    @property
    def fused(self):
        """Whether predict runs the layer in a fused stage (minicnn.inference): in float32, where the
        sparse conv would not beat it (FUSED_CONV_SPARSE_BELOW)."""
        return self.dtype == np.float32 and (self.in_channels == 1 or self.density >= FUSED_CONV_SPARSE_BELOW)

    def fused_conv(self, padded_shape, relu, pool):
        """For minicnn.inference: run(xp, out), the direct conv on the dense weights, channels last
        (kept as fused_dense keeps its)."""
        kernel = direct.conv_block_runner(padded_shape, self.out_channels, self.kernel_size, self.stride, relu, pool)

        def run(xp, out):
            filters = self._laid_out_as(("filters", pool),
                                        lambda: direct.pack_filters(self._laid_out_weight(), self.stride, pool))
            return kernel(xp, filters, self._bias(), out)

        return run

    def _laid_out_weight(self):
        """The dense W (F, C, k, k) of the current values, kept as the kernels' layouts are."""
        k = self.kernel_size
        return self._laid_out_as("W", lambda: self.matrix().reshape(self.out_channels, self.in_channels, k, k))

    def chain_params(self):
        """For minicnn.chain: (W (F, C, k, k), b) dense float32 where predict runs the layer in a stage
        (`fused`: on its dense weights), kept as fused_conv keeps its; else None."""
        if not self.fused:
            return None
        return self._laid_out_weight(), self.params["b"]  # the chain checks arrays new to it

    def step_params(self):
        """(W (F, C, k, k), b): the dense weights a training step of minicnn.convpool convolves with
        when a 2x2 max-pool follows the layer (set_step_grads takes their gradients back)."""
        return self._weight(), self.params["b"]

    def set_step_grads(self, dW, db):
        """The layer's grads from the step's dL/dW (F, C, k, k) and dL/db, as backward makes them."""
        self._laid_out = {}
        self.grads[self.weight_param] = self.weight_grad(dW.reshape(self.shape))
        self.grads["b"] = db

    def forward(self, x):
        x = self._input(x, 4, self.in_channels)
        self.output_shape(x.shape[1:])
        self.cache = x
        if self.uses_sparse_kernel(len(x)):
            k = self.kernel_size
            taps = self._pattern("taps", lambda: conv_taps(self.indices, k, k))
            xp = np.ascontiguousarray(kernels.pad(x, self.padding))
            return sparse_conv2d(self.values(), taps, self.indptr, xp, self.params["b"], k, k, self.stride)
        out, _ = kernels.conv2d_forward(x, self._weight(), self.params["b"], self.stride, self.padding)
        return out

    def backward(self, dout):
        self._laid_out = {}
        # The sparse forward never built the im2row matrix backward needs: build it here.
        x, k = self.cache, self.kernel_size
        rows = kernels.conv_rows(x, k, k, self.stride, self.padding)
        dx, dW, self.grads["b"] = kernels.conv2d_backward(
            dout.astype(self.dtype, copy=False), rows, x.shape, self._weight(), self.stride, self.padding)
        self.grads[self.weight_param] = self.weight_grad(dW)
        return dx

    def macs(self, in_shape):
        _, Ho, Wo = self.output_shape(in_shape)
        return self.indices.size * Ho * Wo

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                **self.storage_config()}
