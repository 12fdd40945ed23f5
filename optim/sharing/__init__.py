"""Weight sharing (Han, Mao & Dally, "Deep Compression", ICLR 2016, section 3):
a codebook of k floats per layer, found by k-means, and a small index per weight.

What lives where:
    clustering.py  Lloyd's k-means in one dimension, run to convergence: initialisations, rounds
                   on the sorted weights, the nearest-centroid assignment (a Numba kernel), each
                   beside its NumPy reference
    huffman.py     canonical Huffman codes for the index streams (section 4 of the paper)
    layers.py      SharedDense, SharedConv2D (built on optim.sparse's CSR layers, so pruned
                   and dense layers both share); share_weights / unshare for whole models
"""

from .clustering import INITS, KMeans, kmeans
from .layers import CODINGS, SharedConv2D, SharedDense, SharedLayer, bits_for, check_bits, share_weights, unshare

__all__ = [
    "CODINGS", "INITS", "LAYER_KINDS", "KMeans", "SharedConv2D", "SharedDense", "SharedLayer", "bits_for",
    "check_bits", "kmeans", "share_weights", "unshare",
]

LAYER_KINDS = {cls.kind: cls for cls in (SharedDense, SharedConv2D)}  # what this package saves
