"""Kernels that skip the zeros: a CSR matrix times dense inputs, and the direct sparse convolution.

CSR x dense (M in CSR, format.py):

    y[n, r] = bias[r] + sum_{k in row r} values[k] * x[n, indices[k]]

for Dense (M = W.T, so y = x @ W + b).

Direct sparse convolution (Park et al., "Faster CNNs with Direct Sparse
Convolutions", ICLR 2017): no im2col at all, each nonzero W[f, c, kh, kw]
adds a shifted input plane,

    out[n, f] += W[f, c, kh, kw] * xp[n, c, kh : kh + S Ho : S, kw : kw + S Wo : S]

so the work is nnz * Ho * Wo per image instead of F*C*KH*KW*Ho*Wo.

Each kernel comes as a plain NumPy reference (`*_ref`) and Numba loops with
the same contract; in float32, the 16-lane kernels of vector.py take over
where they apply. These kernels stream over the nonzeros only, while dense
BLAS is faster per multiply-add: a sparse kernel pays off only below a
density that depends on the batch size (`SPARSE_BELOW` in csr_layer.py).
"""

import numba
import numpy as np
from numba import prange

from minicnn.parallel import twin

from .vector import MIN_CONV_MACS, wide_conv2d


def csr_matmul_ref(values, indices, indptr, x, bias):
    """y (N, R) = x @ M.T + bias for M in CSR (R, K) and x (N, K): Dense's forward with M = W.T.

    The fast versions: `csr_matmul` (same signature) and `csr_matvec` for a
    single vector x (K,) -> y (R,), the batch-1 case.
    """
    R = indptr.size - 1
    rows = np.repeat(np.arange(R), np.diff(indptr))
    Y = np.zeros((R, x.shape[0]), dtype=x.dtype)
    np.add.at(Y, rows, values[:, None] * x.T[indices])
    return Y.T + bias


# Why these loops look the way they do (best-of-300 timings of fc1 at 10%
# density, batch 1: 36 us with int32 indices, 23 with uint32, 14 with row
# slices): unsigned column indices and row slices walked from 0 leave Numba no
# negative-index wraparound test to emit in the loop, and four nonzeros per
# pass let four multiply-adds proceed at once.


def _csr_matmul_loops(values, indices, indptr, x, bias):
    N = x.shape[0]
    R = indptr.size - 1
    # Y[r] = sum_k values[k] * X[indices[k]] + bias[r] over the rows of X = x.T (K, N):
    # each nonzero then scales one contiguous run of N inputs, which LLVM vectorises.
    # The two transposes live in here, not in numpy around the call: fc1 at batch
    # 64 took 167 us of CPU instead of 199 (they are 51,200 and 32,000 copies).
    # Within 5% of this loop (so not kept): eight nonzeros a pass, fastmath,
    # uint16 columns, and blocks of 64-128 columns of M so that X's rows stay in L1.
    X = np.ascontiguousarray(x.T)
    Y = np.empty((R, N), dtype=x.dtype)
    for r in prange(R):  # rows are independent: no races
        v, c = values[indptr[r] : indptr[r + 1]], indices[indptr[r] : indptr[r + 1]]
        y = Y[r]  # 1-D row views: LLVM vectorises these loops, not the 2-D indexing (5x)
        y[:] = bias[r]
        m = v.size - v.size % 4
        for k in range(0, m, 4):
            x0, x1, x2, x3 = X[c[k]], X[c[k + 1]], X[c[k + 2]], X[c[k + 3]]
            v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
            for n in range(N):
                y[n] += (v0 * x0[n] + v1 * x1[n]) + (v2 * x2[n] + v3 * x3[n])
        for k in range(m, v.size):
            xk, vk = X[c[k]], v[k]
            for n in range(N):
                y[n] += vk * xk[n]
    return np.ascontiguousarray(Y.T)


def _csr_matvec_loops(values, indices, indptr, x, bias):
    R = indptr.size - 1
    y = np.empty(R, dtype=x.dtype)
    for r in range(R):
        v, c = values[indptr[r] : indptr[r + 1]], indices[indptr[r] : indptr[r + 1]]
        a0 = a1 = a2 = a3 = x.dtype.type(0)  # four sums: no waiting on the previous addition
        m = v.size - v.size % 4
        for k in range(0, m, 4):
            a0 += v[k] * x[c[k]]
            a1 += v[k + 1] * x[c[k + 1]]
            a2 += v[k + 2] * x[c[k + 2]]
            a3 += v[k + 3] * x[c[k + 3]]
        for k in range(m, v.size):
            a0 += v[k] * x[c[k]]
        y[r] = bias[r] + ((a0 + a1) + (a2 + a3))
    return y


_csr_matmul = twin(_csr_matmul_loops)


def csr_matmul(values, indices, indptr, x, bias):
    """Fast y = x @ M.T + bias, same contract as csr_matmul_ref; serial below
    minicnn's MIN_OUTPUTS outputs (N * R: fc1 at batch 64 makes 32,000), counted
    in outputs as minicnn's kernels do (docs/techniques.md has the measurements)."""
    return _csr_matmul(x.shape[0] * (indptr.size - 1), values, indices, indptr, x, bias)


# Serial, and about one nonzero per cycle (fc1 at 10% density: 14 us of CPU for
# its 40,000): each nonzero takes three loads (value, column, x[column]) and the
# core issues three a cycle. Measured no faster: uint16 columns (14 us: the
# number of loads counts, not their width); fastmath, which lets LLVM emit
# AVX-512 gathers (18 us: this Zen 4 gathers about one element a cycle); the
# layout by input, y[cols] += x[i] * W[i, cols], which can skip zero inputs
# (19 us; 10 us with half of x zero, but fc1's inputs, max-pooled convolutions
# with no ReLU in LeNet-5, have none); two threads (54 us: waking them).
csr_matvec = numba.njit(cache=True)(_csr_matvec_loops)


# --------------------------------------------------------------------------
# Direct sparse convolution


def sparse_conv2d_ref(values, indices, indptr, xp, bias, KH, KW, stride):
    """out (N, F, Ho, Wo) from padded xp (N, C, Hp, Wp) and CSR filters (F, C*KH*KW)."""
    N, C, Hp, Wp = xp.shape
    F, S = indptr.size - 1, stride
    Ho, Wo = (Hp - KH) // S + 1, (Wp - KW) // S + 1
    out = np.zeros((N, F, Ho, Wo), dtype=xp.dtype) + bias[None, :, None, None]
    for f in range(F):
        for k in range(indptr[f], indptr[f + 1]):
            c, rest = divmod(int(indices[k]), KH * KW)
            kh, kw = divmod(rest, KW)
            out[:, f] += values[k] * xp[:, c, kh : kh + S * Ho : S, kw : kw + S * Wo : S]
    return out


def _sparse_conv2d_loops(values, taps, indptr, xp, bias, KH, KW, stride):
    N, C, Hp, Wp = xp.shape
    F = indptr.size - 1
    Ho = (Hp - KH) // stride + 1
    Wo = (Wp - KW) // stride + 1
    out = np.empty((N, F, Ho, Wo), dtype=xp.dtype)
    for t in prange(N * F):  # one output plane per task
        n, f = t // F, t % F
        plane = out[n, f]
        plane[:] = bias[f]
        for k in range(indptr[f], indptr[f + 1]):
            v, c, kh, kw = values[k], taps[k, 0], taps[k, 1], taps[k, 2]
            shifted = xp[n, c, kh:, kw:]  # the input plane moved by the tap (kh, kw)
            for i in range(Ho):
                for j in range(Wo):
                    plane[i, j] += v * shifted[i * stride, j * stride]
    return out


_sparse_conv2d = twin(_sparse_conv2d_loops, MIN_CONV_MACS)


def conv_taps(indices, KH, KW):
    """(nnz, 3) int64: the (c, kh, kw) of each column index c*KH*KW + kh*KW + kw of a conv's M."""
    # Computed once per pattern: three integer divisions per nonzero at every call took most of
    # the direct conv's time at batch 1 (a division costs ~15 cycles, the nonzero's work a handful).
    c, rest = np.divmod(indices.astype(np.int64), KH * KW)
    return np.stack([c, *np.divmod(rest, KW)], axis=1)


def sparse_conv2d(values, taps, indptr, xp, bias, KH, KW, stride):
    """Fast direct sparse conv: sparse_conv2d_ref's result, with the column indices as
    `conv_taps(indices, KH, KW)`; 16 lanes at a time in float32 at stride 1 (`vector.wide_conv2d`),
    the plain loops otherwise; serial below MIN_CONV_MACS multiply-adds."""
    if stride == 1 and xp.dtype == values.dtype == bias.dtype == np.float32:
        return wide_conv2d(values, taps, indptr, xp, bias, KH, KW)
    N, C, Hp, Wp = xp.shape
    work = N * values.size * ((Hp - KH) // stride + 1) * ((Wp - KW) // stride + 1)
    return _sparse_conv2d(work, values, taps, indptr, xp, bias, KH, KW, stride)
