"""Pruned layers: the nonzeros of a pruned weight matrix, stored and trained as they are.

A pruned Dense or Conv2D keeps only its nonzero weights, params
{"values": (nnz,), "b": bias}, in CSR order (format.py); training updates
only them, so a pruned weight can never grow back. On disk a layer is its
relative-index stream (format.py): values and index codes of `index_bits`
bits, fillers included, so a file's size follows the nonzeros.

`to_sparse` turns the Dense / Conv2D layers of a model into these where that
makes them smaller; `to_dense` turns them back (to prune further or train).
"""

import copy

import numpy as np

from minicnn.layers import Conv2D, Dense
from minicnn.model import Sequential, check_sequential
from minicnn.serialization import stored_array

from ..bitpack import pack_bits, unpack_bits
from .csr_layer import CSRConv2D, CSRDense, CSRLayer
from .format import (best_index_bits, check_index_bits, csr_from_dense, csr_from_positions, csr_positions,
                     decode_relative, encode_relative, stream_bytes)


class SparseLayer(CSRLayer):
    """The storage of a pruned layer: its nonzeros themselves, params {"values": (nnz,), "b": bias}.

    Training a sparse layer updates only its nonzeros, so a pruned weight can never grow back.
    """

    weight_param = "values"

    def _set_csr(self, values, indices, indptr, shape, b, index_bits):
        keep = values != 0  # a model file's fillers, or weights that trained to exactly 0
        if not keep.all():
            positions = csr_positions(indices, indptr, shape[1])[keep]
            values, indices, indptr = csr_from_positions(positions, values[keep], shape)
        self.index_bits = index_bits
        self.set_structure(shape, indices, indptr, {"values": np.ascontiguousarray(values), "b": b})

    def _empty(self, shape, index_bits):
        """No nonzeros yet (from_dense or from_state fill the layer)."""
        empty = (np.zeros(0, np.float32), np.zeros(0, np.uint32), np.zeros(shape[0] + 1, np.int64))
        self._set_csr(*empty, shape, np.zeros(shape[0], np.float32), check_index_bits(index_bits))

    def values(self):
        """The nonzero weights (nnz,), in CSR order."""
        return self.params["values"]

    def _positions(self):
        return csr_positions(self.indices, self.indptr, self.shape[1])

    def weight_grad(self, dM):
        """dL/dvalues from dL/dM (rows, cols): the gradient at the stored positions only."""
        return dM.reshape(-1)[self._positions()].astype(self.dtype, copy=False)

    def state(self):
        positions = self._positions()
        codes, slots = encode_relative(positions, self.index_bits)
        values = np.zeros(slots.size, dtype=self.params["values"].dtype)  # fillers hold 0
        values[np.searchsorted(slots, positions)] = self.params["values"]
        return {"values": values, "codes": pack_bits(codes, self.index_bits), "b": self.params["b"]}

    @classmethod
    def from_state(cls, config, arrays):
        """Rebuild the layer from its config and the arrays `state()` saved (fillers dropped),
        the arrays checked against the config before the layer is built."""
        b = stored_array(arrays, "b", cls.float_class.param_shapes(**config)["b"])
        values = stored_array(arrays, "values")
        if values.ndim != 1:
            raise ValueError(f"array 'values' must be 1-D, got shape {values.shape}")
        codes = stored_array(arrays, "codes", dtypes=(np.dtype(np.uint8),))
        new = cls(**config)
        slots = decode_relative(unpack_bits(codes, new.index_bits, values.size))
        if slots.size and slots[-1] >= new.shape[0] * new.shape[1]:
            raise ValueError(f"{cls.kind} layer: index stream points past the end of its {new.shape} matrix")
        new._set_csr(*csr_from_positions(slots, values, new.shape), new.shape, b, new.index_bits)
        return new

    @classmethod
    def _from_matrix(cls, M, b, config, index_bits):
        """The layer holding the nonzeros of M (rows, cols); index_bits None picks the smallest file."""
        positions = np.flatnonzero(M)
        index_bits = best_index_bits(positions) if index_bits is None else check_index_bits(index_bits)
        new = cls(**config, index_bits=index_bits)
        new._set_csr(*csr_from_dense(M), M.shape, b.copy(), new.index_bits)
        return new

    def stats(self):
        n = self.shape[0] * self.shape[1]
        nnz = int(np.count_nonzero(self.params["values"]))
        nbytes = stream_bytes(self._positions(), self.index_bits) + self.params["b"].nbytes
        total = n + self.params["b"].size
        return {"params": total, "nonzero": nnz + int(np.count_nonzero(self.params["b"])),
                "bits_per_weight": 8 * nbytes / total, "bytes": nbytes, "density": nnz / n}

    def storage_config(self):
        return {"index_bits": self.index_bits}


class SparseDense(SparseLayer, CSRDense):
    """Dense (y = x @ W + b) with W stored sparse as M = W.T (out, in) in CSR.

    x (N, in_features) -> (N, out_features). Build one with `from_dense(layer)`.
    """

    kind = "sparse_dense"

    def __init__(self, in_features, out_features, index_bits=5):
        super().__init__()
        self._empty(self._set_geometry(in_features, out_features), index_bits)

    @classmethod
    def from_dense(cls, layer, index_bits=None):
        """The sparse twin of a Dense layer (its zeros dropped); index_bits None picks the smallest file."""
        config = {"in_features": layer.in_features, "out_features": layer.out_features}
        return cls._from_matrix(np.ascontiguousarray(layer.params["W"].T), layer.params["b"], config, index_bits)


class SparseConv2D(SparseLayer, CSRConv2D):
    """Conv2D with W (F, C, KH, KW) stored sparse as M = W.reshape(F, C*KH*KW) in CSR.

    x (N, C, H, W) -> (N, F, Ho, Wo). Build one with `from_dense(layer)`.
    """

    kind = "sparse_conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, index_bits=8):
        super().__init__()
        self._empty(self._set_geometry(in_channels, out_channels, kernel_size, stride, padding), index_bits)

    @classmethod
    def from_dense(cls, layer, index_bits=None):
        """The sparse twin of a Conv2D layer (its zeros dropped); index_bits None picks the smallest file."""
        M = layer.params["W"].reshape(layer.out_channels, -1)
        return cls._from_matrix(M, layer.params["b"], layer.config(), index_bits)


SPARSE_LAYERS = {Dense: SparseDense, Conv2D: SparseConv2D}


def to_sparse(model, index_bits=None):
    """A copy of `model` (Sequential) whose Dense/Conv2D layers are sparse where that makes them smaller.

    index_bits: None picks, per layer, the width that minimises its bytes.
    Layers with few zeros stay dense: 4 bytes a weight beats 4 + b/8.
    """
    check_sequential(model, "to_sparse")
    layers = []
    for layer in model.layers:
        sparse_cls = SPARSE_LAYERS.get(type(layer))
        if sparse_cls is not None:
            candidate = sparse_cls.from_dense(layer, index_bits)
            if candidate.stats()["bytes"] < layer.stats()["bytes"]:
                layers.append(candidate)
                continue
        layers.append(copy.deepcopy(layer))
    return Sequential(layers, input_shape=model.input_shape)


def to_dense(model, layer_type=SparseLayer):
    """A copy of `model` with its `layer_type` layers (default: the sparse ones; optim.sharing.unshare
    passes its shared ones) turned back into Dense/Conv2D, to prune further or train."""
    check_sequential(model, "to_dense")
    layers = [layer.to_dense() if isinstance(layer, layer_type) else copy.deepcopy(layer) for layer in model.layers]
    return Sequential(layers, input_shape=model.input_shape)
