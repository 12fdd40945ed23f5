"""Weight-shared layers: a codebook of k floats and one small index per weight.

Han, Mao & Dally, "Deep Compression" (ICLR 2016), section 3. The nonzero
weights of a layer are clustered by k-means (clustering.py); the layer keeps the
k centroids, its codebook, and for each weight the index a_i of its cluster,
ceil(log2 k) bits. Pruned zeros are not clustered and stay zero. The
effective weights are W_i = c_(a_i), so

    dL/dc_j = sum_(i: a_i = j) dL/dW_i        (one np.bincount)

and the optimizer trains the codebook itself (params "codebook" and "b"):
every weight stays equal to its centroid by construction. The geometry and
the kernels are those of the pruned layers (optim.sparse's CSRDense and
CSRConv2D), run on values() = codebook[labels].

Storage, one uint8 array per layer (`state()["data"]`):

    codebook   k float32
    bias       out float32
    positions  (pruned layers) the relative-index stream of optim.sparse:
               codes of index_bits bits, fillers included
    indices    one symbol per stream entry: the cluster 0..k-1, or k for a filler zero

each stream either Huffman coded (`coding="huffman"`, huffman.py) or
bit-packed at fixed width (`coding="packed"`, optim.bitpack), both
self-describing (a count and an alphabet size in a small header).
"""

import copy
import math

import numpy as np

from minicnn.checks import check_int
from minicnn.layers import Conv2D, Dense
from minicnn.model import Sequential, check_sequential
from minicnn.serialization import stored_array

from ..bitpack import pack_bits, packed_size, unpack_bits
from ..pruning import layer_names
from ..sparse import CSRConv2D, CSRDense, CSRLayer, to_dense
from ..sparse.format import (MAX_INDEX_BITS, check_index_bits, csr_from_positions, decode_relative, encode_relative,
                             filler_count)
from . import huffman
from .clustering import MAX_ROUNDS, TOL, kmeans

CODINGS = ("huffman", "packed")
MAX_BITS = 16  # codebook index bits: k = 2**bits <= 65,536 clusters


def check_bits(bits, name="bits"):
    """bits as an int, checked to be a codebook index width (1..MAX_BITS)."""
    return check_int(bits, name, 1, MAX_BITS)


def index_width(alphabet):
    """Bits of a fixed-width code for symbols 0..alphabet-1: ceil(log2 alphabet), at least 1."""
    return max(1, int(alphabet - 1).bit_length())


# Streams: Huffman coded or bit-packed, each self-describing

_PACKED_HEADER = np.dtype([("count", "<u4"), ("alphabet", "<u4")])


def write_stream(symbols, alphabet, coding):
    """symbols (n,) ints in 0..alphabet-1 -> uint8 bytes, Huffman coded or packed at index_width(alphabet)."""
    if coding == "huffman":
        return huffman.to_bytes(symbols, alphabet)
    if coding != "packed":
        raise ValueError(f"unknown coding {coding!r}; choose one of {', '.join(CODINGS)}")
    header = np.array([(symbols.size, alphabet)], _PACKED_HEADER).view(np.uint8)
    return np.concatenate([header, pack_bits(symbols, index_width(alphabet))])


def read_stream(data, offset, coding):
    """Read one stream written by write_stream -> (symbols int64, alphabet, end offset)."""
    if coding == "huffman":
        symbols, end = huffman.from_bytes(data, offset)  # it checked that the header is there
        return symbols, int(data[offset : offset + huffman.HEADER.itemsize].view(huffman.HEADER)[0]["alphabet"]), end
    end = offset + _PACKED_HEADER.itemsize
    if end > data.size:
        raise ValueError(f"truncated stream: header at offset {offset}, {data.size - offset} bytes left")
    count, alphabet = (int(v) for v in data[offset:end].view(_PACKED_HEADER)[0])
    nbytes = packed_size(count, index_width(alphabet))
    if end + nbytes > data.size:
        raise ValueError(f"truncated stream: {count} codes need {nbytes} bytes, {data.size - end} left")
    return unpack_bits(data[end : end + nbytes], index_width(alphabet), count).astype(np.int64), alphabet, end + nbytes


# --------------------------------------------------------------------------
# Shared-weight layers


class SharedLayer(CSRLayer):
    """The storage of a shared layer: M (rows, cols) as in optim.sparse, its nonzeros at flat
    `positions` (nnz,) int64, each equal to codebook[labels] (labels (nnz,) int64).

    params: {"codebook": (k,) float, "b": (rows,) float}. Forward and backward are those of
    the pruned layers (CSRDense, CSRConv2D), on values() = codebook[labels]. kmeans_rounds:
    the rounds k-means took to find the codebook (None for a layer read from a file).
    """

    weight_param = "codebook"

    def _set(self, shape, positions, labels, codebook, b, index_bits, coding):
        self.positions = np.asarray(positions, np.int64)
        self.labels = np.asarray(labels, np.int64)
        _, indices, indptr = csr_from_positions(self.positions, None, shape)
        self.index_bits = index_bits
        self.coding = coding
        self.set_structure(shape, indices, indptr, {"codebook": codebook, "b": b})

    @property
    def clusters(self):
        return self.params["codebook"].size

    def values(self):
        """The nonzero weights (nnz,), each its centroid."""
        return self.params["codebook"][self.labels]

    def weight_grad(self, dM):
        """dL/dc_j = sum of dL/dM over the positions in cluster j, from dL/dM (rows, cols)."""
        g = np.bincount(self.labels, weights=dM.reshape(-1)[self.positions], minlength=self.clusters)
        return g.astype(self.dtype)

    # ---- storage

    def _streams(self, index_bits, coding):
        """(positions stream or None, indices stream): the two coded streams of the layer."""
        k = self.clusters
        if index_bits is None:  # nothing pruned: one index per weight, in order
            return None, write_stream(self.labels, k, coding)
        codes, slots = encode_relative(self.positions, index_bits)
        symbols = np.full(slots.size, k, np.int64)  # k marks a filler zero
        symbols[np.searchsorted(slots, self.positions)] = self.labels
        alphabet = k + 1 if slots.size > self.positions.size else k
        return write_stream(codes, 2**index_bits, coding), write_stream(symbols, alphabet, coding)

    def _encode(self, index_bits, coding):
        positions, indices = self._streams(index_bits, coding)
        parts = [self.params["codebook"].astype("<f4").view(np.uint8), self.params["b"].astype("<f4").view(np.uint8)]
        return np.concatenate(parts + ([positions] if positions is not None else []) + [indices])

    def state(self):
        return {"data": self._encode(self.index_bits, self.coding)}

    @classmethod
    def from_state(cls, config, arrays):
        """Rebuild the layer from its config and the `data` array `state()` wrote, the sizes the
        config implies checked against the data before the layer is built."""
        data = stored_array(arrays, "data", dtypes=(np.dtype(np.uint8),))
        W_shape = cls.float_class.param_shapes(**config)["W"]
        rows = W_shape[0] if cls.float_class is Conv2D else W_shape[1]
        weights = math.prod(W_shape)
        if data.ndim != 1 or data.size < 4 * rows or (config.get("index_bits") is None and weights > 8 * data.size):
            raise ValueError(f"array 'data' ({data.dtype} {data.shape}) cannot hold {rows} biases and "
                             f"an index for each of {weights} weights")
        new = cls(**config)
        k = new.clusters
        if data.size < 4 * (k + rows):
            raise ValueError(f"{data.size} bytes cannot hold a codebook of {k} and {rows} biases")
        parts = {"codebook": data[: 4 * k].view("<f4").astype(np.float32),
                 "bias": data[4 * k : 4 * (k + rows)].view("<f4").astype(np.float32)}
        codebook, b = (stored_array(parts, name) for name in ("codebook", "bias"))
        offset, n = 4 * (k + rows), rows * new.shape[1]
        if new.index_bits is None:
            slots = np.arange(n)
        else:
            codes, _, offset = read_stream(data, offset, new.coding)
            if codes.size and codes.max() >= 2**new.index_bits:
                raise ValueError(f"{cls.kind} layer: relative index {codes.max()} does not fit {new.index_bits} bits")
            slots = decode_relative(codes)
            if slots.size and slots[-1] >= n:
                raise ValueError(f"{cls.kind} layer: index stream points past the end of its {new.shape} matrix")
        symbols, alphabet, offset = read_stream(data, offset, new.coding)
        if offset != data.size:
            raise ValueError(f"{cls.kind} layer: {data.size - offset} unexpected bytes after the streams")
        if symbols.size != slots.size:
            raise ValueError(f"{cls.kind} layer: {symbols.size} weight indices for {slots.size} positions")
        most = k + 1 if new.index_bits is not None else k  # symbol k: a filler zero of the position stream
        if alphabet > most or (symbols.size and symbols.max() >= most):
            raise ValueError(f"{cls.kind} layer: codebook/index mismatch: weight indices up to "
                             f"{max(alphabet, int(symbols.max(initial=0)) + 1) - 1} but the codebook has {k} entries")
        keep = symbols < k
        new._set(new.shape, slots[keep], symbols[keep], codebook, b, new.index_bits, new.coding)
        return new

    def storage(self):
        """Bytes and bits of the stored layer, packed (P+Q) and Huffman coded (P+Q+H), for the tables."""
        m = self.positions.size
        if self.index_bits is not None:
            m += filler_count(self.positions, self.index_bits)
        out = {"weights": self.shape[0] * self.shape[1], "nonzero": self.positions.size, "entries": m,
               "clusters": self.clusters, "index_bits": self.index_bits, "coding": self.coding,
               "overhead_bytes": 4 * (self.clusters + self.shape[0])}
        for coding in CODINGS:
            positions, indices = self._streams(self.index_bits, coding)
            out[f"bytes_{coding}"] = out["overhead_bytes"] + indices.size + (0 if positions is None else positions.size)
            out[f"weight_bits_{coding}"] = 8 * indices.size / max(m, 1)
            out[f"index_bits_{coding}"] = 0.0 if positions is None else 8 * positions.size / max(m, 1)
        return out

    def stats(self):
        nbytes = self.state()["data"].nbytes
        total = self.shape[0] * self.shape[1] + self.params["b"].size
        return {"params": total, "nonzero": self.positions.size + int(np.count_nonzero(self.params["b"])),
                "bits_per_weight": 8 * nbytes / total, "bytes": nbytes, "density": self.density,
                "clusters": self.clusters}

    def storage_config(self):
        return {"clusters": self.clusters, "index_bits": self.index_bits, "coding": self.coding}

    def _init_common(self, shape, clusters, index_bits, coding):
        clusters = check_int(clusters, "clusters", 2, 2**MAX_BITS)
        if index_bits is not None:
            index_bits = check_index_bits(index_bits)
        if coding not in CODINGS:
            raise ValueError(f"unknown coding {coding!r}; choose one of {', '.join(CODINGS)}")
        self.kmeans_rounds = None  # _share sets it; a layer read from a file has none
        codebook = np.zeros(clusters, np.float32)
        positions = np.arange(shape[0] * shape[1]) if index_bits is None else np.zeros(0, np.int64)
        self._set(shape, positions, np.zeros(positions.size, np.int64), codebook,
                  np.zeros(shape[0], np.float32), index_bits, coding)

    def _share(self, M, b, bits, init, iterations, seed, index_bits, tol):
        """Cluster the nonzeros of M (rows, cols) into 2**bits centroids and take them as this layer's."""
        positions = np.flatnonzero(M)
        result = kmeans(M.reshape(-1)[positions], 2 ** check_bits(bits), init, iterations, seed, tol)
        self._set(M.shape, positions, result.labels, result.centroids.astype(np.float32), b.copy(), None, self.coding)
        self.kmeans_rounds = result.rounds
        if positions.size < M.size:
            self.index_bits = self.best_index_bits() if index_bits is None else check_index_bits(index_bits)

    def best_index_bits(self):
        """The relative-index width in 1..16 that makes the stored layer smallest (the narrowest on ties)."""
        sizes = [self._encode(bits, self.coding).size for bits in range(1, MAX_INDEX_BITS + 1)]
        return 1 + int(np.argmin(sizes))


class SharedDense(SharedLayer, CSRDense):
    """Dense (y = x @ W + b) with W's nonzeros shared: M = W.T (out, in), as in optim.sparse.

    x (N, in_features) -> (N, out_features). Build one with `from_layer(dense, bits)`.
    """

    kind = "shared_dense"

    def __init__(self, in_features, out_features, clusters=32, index_bits=None, coding="huffman"):
        super().__init__()
        self._init_common(self._set_geometry(in_features, out_features), clusters, index_bits, coding)

    @classmethod
    def from_layer(cls, layer, bits, init="linear", iterations=MAX_ROUNDS, seed=0, index_bits=None, coding="huffman",
                   tol=TOL):
        """Share the nonzero weights of a Dense layer among 2**bits centroids (k-means from `init`, at most
        `iterations` rounds, see clustering.kmeans). index_bits: the relative-index width of a pruned layer
        (None: the smallest file)."""
        if not isinstance(layer, Dense):
            raise TypeError(f"expected a Dense layer, got {type(layer).__name__}")
        new = cls(layer.in_features, layer.out_features, coding=coding)
        new._share(np.ascontiguousarray(layer.params["W"].T), layer.params["b"], bits, init, iterations, seed,
                   index_bits, tol)
        return new


class SharedConv2D(SharedLayer, CSRConv2D):
    """Conv2D with W's nonzeros shared: M = W.reshape(F, C*KH*KW), as in optim.sparse.

    x (N, C, H, W) -> (N, F, Ho, Wo). Build one with `from_layer(conv, bits)`.
    """

    kind = "shared_conv2d"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, clusters=256,
                 index_bits=None, coding="huffman"):
        super().__init__()
        self._init_common(self._set_geometry(in_channels, out_channels, kernel_size, stride, padding),
                          clusters, index_bits, coding)

    @classmethod
    def from_layer(cls, layer, bits, init="linear", iterations=MAX_ROUNDS, seed=0, index_bits=None, coding="huffman",
                   tol=TOL):
        """Share the nonzero weights of a Conv2D layer among 2**bits centroids (see SharedDense.from_layer)."""
        if not isinstance(layer, Conv2D):
            raise TypeError(f"expected a Conv2D layer, got {type(layer).__name__}")
        new = cls(**layer.config(), coding=coding)
        new._share(layer.params["W"].reshape(layer.out_channels, -1), layer.params["b"], bits, init, iterations,
                   seed, index_bits, tol)
        return new


SHARED_LAYERS = {Dense: SharedDense, Conv2D: SharedConv2D}


def bits_for(name, bits):
    """bits: an int for every layer, or a dict by layer name (conv1, fc2) or family (conv, fc)."""
    if not isinstance(bits, dict):
        return bits
    family = name.rstrip("0123456789")
    if name not in bits and family not in bits:
        raise ValueError(f"no bits given for layer {name} (nor for '{family}'): got {bits}")
    return bits.get(name, bits.get(family))


def share_weights(model, bits, init="linear", iterations=MAX_ROUNDS, seed=0, coding="huffman", index_bits=None,
                  tol=TOL):
    """A copy of `model` (Sequential) whose Dense/Conv2D layers share their weights.

    bits: index bits per layer (k = 2**bits clusters): an int, or a dict such as
    {"conv": 8, "fc": 5} (by family) or {"fc1": 4, ...} (by name). Sparse layers
    from optim.sparse are shared too (their zeros stay zero). index_bits: a fixed
    relative-index width for pruned layers, or None to pick the smallest per layer.
    k-means runs per layer from `init` until it converges (clustering.kmeans: `tol`, at
    most `iterations` rounds); each shared layer's `kmeans_rounds` says how many it took.
    """
    dense = to_dense(check_sequential(model, "share_weights"))
    names = {index: name for name, index in layer_names(dense).items()}
    layers = []
    for i, layer in enumerate(dense.layers):
        shared_cls = SHARED_LAYERS.get(type(layer))
        if shared_cls is None:
            layers.append(copy.deepcopy(layer))
            continue
        nonzero = int(np.count_nonzero(layer.params["W"]))
        b = check_bits(bits_for(names[i], bits))
        if 2**b > nonzero:
            raise ValueError(f"{names[i]}: 2**{b} = {2**b} clusters for only {nonzero} nonzero weights")
        layers.append(shared_cls.from_layer(layer, b, init, iterations, seed, index_bits, coding, tol))
    return Sequential(layers, input_shape=model.input_shape)


def unshare(model):
    """A copy of `model` with its shared layers turned back into Dense/Conv2D."""
    return to_dense(model, SharedLayer)
