"""Sparse weights: a storage format whose size follows the nonzeros, and kernels that skip the zeros.

What lives where:
    format.py     CSR in memory; the relative-index stream on disk (Han, Mao & Dally 2016)
    kernels.py    CSR x dense and the direct sparse convolution (Park et al. 2017):
                  NumPy references and Numba loops
    vector.py     the same on 16-lane float32 vectors (minicnn.simd), the layouts they read
    csr_layer.py  CSRLayer, CSRDense, CSRConv2D: layers whose weight matrix is held in CSR,
                  picking the sparse or the dense kernel by density and batch (SPARSE_BELOW);
                  weight sharing (optim.sharing) builds its layers on them too
    layers.py     SparseDense, SparseConv2D: pruned layers that store and train their nonzeros;
                  to_sparse / to_dense for whole models
"""

from .csr_layer import CSRConv2D, CSRDense, CSRLayer, sparse_below
from .layers import SparseConv2D, SparseDense, SparseLayer, to_dense, to_sparse

__all__ = [
    "LAYER_KINDS", "CSRConv2D", "CSRDense", "CSRLayer", "SparseConv2D", "SparseDense", "SparseLayer",
    "sparse_below", "to_dense", "to_sparse",
]

LAYER_KINDS = {cls.kind: cls for cls in (SparseDense, SparseConv2D)}  # what this package saves
