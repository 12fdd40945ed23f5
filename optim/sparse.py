"""Sparse weights: a storage format whose size follows the nonzeros, and kernels that skip the zeros.

A pruned layer is a matrix M (R rows, K columns) in which only nnz entries are
nonzero. Row r of M computes output r: for Dense, M = W.T (out, in); for
Conv2D, M = W.reshape(F, C*KH*KW), one row per filter.

In memory (CSR, Compressed Sparse Row):

    values  (nnz,) float32   the nonzeros, row by row, left to right
    indices (nnz,) uint32    their column numbers
    indptr  (R+1,) int64     row r owns values[indptr[r] : indptr[r+1]]

On disk (the relative-index stream of Han, Mao & Dally, "Deep Compression",
ICLR 2016, section 2): M is read row-major as one flat array of R*K entries
and each stored entry records only its distance from the previous one,

    code_i = slot_i - slot_(i-1) - 1,    slot_(-1) = -1,    0 <= code_i < 2**b

in b bits (`index_bits`), so a gap of up to 2**b positions fits. A wider gap
gets a *filler zero*: an entry with value 0 placed 2**b positions after the
previous one (code 2**b - 1), repeated until the gap fits. Fillers point at
positions that really are zero in M, so the values stream is simply M.flat at
the slots. Row pointers are not stored: slot // K gives each entry's row.

    stream entries m = nnz + fillers(b)
    bytes = 4 m (float32 values) + ceil(m b / 8) (codes, `optim.bitpack`)

Small b means short codes but many fillers; `best_index_bits` picks the b that
minimises the bytes (Deep Compression fixed 8 bits for conv, 5 for fc).

The index stream and the values stream are separable: `encode_relative`
turns positions into (codes, slots) and knows nothing about values;
`decode_relative` turns codes back into slots. A weight-sharing layer stores
codebook indices at the same slots and may entropy-code the codes.

Sparse inference:

    CSR x dense:  y[n, r] = sum_{k in row r} values[k] * x[n, indices[k]]

for Dense (M = W.T, so y = x @ W). In float32, SparseDense runs it with
16-lane vectors (`optim.simd`), the nonzeros regrouped once per pattern:
- `lanes_matmul`, for a few inputs (AVX-512): 16 rows of M at a time, one
  per lane; a chunk of 32 inputs sits in two registers and each layer of
  nonzeros picks its 16 inputs out of them with one table lookup
  (vpermi2ps), so only the values and one byte per column are read from
  memory. The layers pad each row of a 16-row slice to the fullest one.
- `blocked_matmul`, for a batch: x transposed, 16 inputs a vector, so a
  nonzero multiplies 64 inputs with four multiply-adds whose sums stay in
  registers; columns in blocks of 128 keep x's rows in the L1 cache.
Elsewhere (float64, a CPU without AVX-512 at batch 1) the CSR loops run.

For Conv2D the kernel is direct (Park et al.,
"Faster CNNs with Direct Sparse Convolutions", ICLR 2017): no im2col at
all, each nonzero W[f, c, kh, kw] adds a shifted input plane,

    out[n, f] += W[f, c, kh, kw] * xp[n, c, kh : kh + S Ho : S, kw : kw + S Wo : S]

so the work is nnz * Ho * Wo per image instead of F*C*KH*KW*Ho*Wo. In float32
at stride 1 it too keeps 64 outputs of a plane in four vector registers while
the filter's nonzeros go by. All these kernels stream over the nonzeros only;
dense BLAS is faster per multiply, so a sparse kernel pays off only below a
density that depends on the batch size (`SPARSE_BELOW`, measured by
bench/bench_pruning.py), and the layers switch automatically.
"""

import copy

import numba
import numpy as np
from numba import prange

from minicnn import kernels
from minicnn.checks import check_array, check_positive_int
from minicnn.parallel import twin
from minicnn.layers import Conv2D, Dense, Layer
from minicnn.model import Sequential

from .bitpack import pack_bits, unpack_bits
from minicnn.simd import HAS_PERMUTE, LANES, add, aligned_empty, fma, load, permute2, splat, store, transpose16

MAX_INDEX_BITS = 16
BLOCK_COLUMNS = 128  # columns of M per block of blocked_matmul: 128 rows of a 64-lane X, 32 KB

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

# SparseDense runs lanes_matmul (one input at a time) up to this batch size, blocked_matmul (16
# inputs a vector) above. fc1 at 10% density, two runs: lanes_matmul won at batch 8 (33-41 us
# against 58-70), they tied at 12 (49-61 against 61-71), blocked_matmul won at 16 (62 against 65-81).
LANES_MATMUL_UP_TO = 8


def sparse_below(family, batch):
    """The density under which the sparse kernel of `family` ("dense", "conv2d") wins at this batch size."""
    table = SPARSE_BELOW[family]
    return table[max((b for b in table if b <= batch), default=min(table))]  # an empty batch: the smallest


# --------------------------------------------------------------------------
# The relative-index stream


def _check_index_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_INDEX_BITS:
        raise ValueError(f"index_bits must be an integer in 1..{MAX_INDEX_BITS}, got {bits!r}")
    return int(bits)


def _check_positions(positions):
    positions = np.asarray(positions)
    if positions.ndim != 1 or positions.dtype.kind not in "iu":
        raise ValueError(f"positions must be a 1-D integer array, got {positions.dtype} {positions.shape}")
    positions = positions.astype(np.int64)
    if positions.size and (positions[0] < 0 or np.any(np.diff(positions) <= 0)):
        raise ValueError("positions must be non-negative and strictly increasing")
    return positions


def filler_count(positions, index_bits):
    """Fillers the stream of `positions` (sorted flat positions) needs at `index_bits` bits."""
    positions = _check_positions(positions)
    gaps = np.diff(positions, prepend=-1)
    return int(((gaps - 1) >> _check_index_bits(index_bits)).sum())


def encode_relative(positions, index_bits):
    """Flat positions of the nonzeros -> the relative-index stream.

    positions: (nnz,) strictly increasing ints (e.g. np.flatnonzero(M)).
    Returns (codes, slots), both (m,) with m = nnz + fillers:
      codes uint32: slot_i - slot_(i-1) - 1, each < 2**index_bits;
      slots int64: the flat position of every stream entry, fillers included
      (a filler's slot is a zero of M, so M.flat[slots] is the values stream).
    """
    positions = _check_positions(positions)
    bits = _check_index_bits(index_bits)
    span = 1 << bits
    gaps = np.diff(positions, prepend=-1)  # >= 1
    fillers = (gaps - 1) >> bits  # whole spans to jump before each nonzero
    where = np.arange(positions.size) + np.cumsum(fillers)  # stream index of each nonzero
    codes = np.full(positions.size + int(fillers.sum()), span - 1, dtype=np.uint32)
    codes[where] = gaps - fillers * span - 1
    return codes, decode_relative(codes)


def decode_relative(codes):
    """Inverse of encode_relative: codes (m,) -> slots (m,) int64, fillers included."""
    codes = np.asarray(codes)
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise ValueError(f"codes must be a 1-D integer array, got {codes.dtype} {codes.shape}")
    return np.cumsum(codes.astype(np.int64) + 1) - 1


def stream_bytes(positions, index_bits, value_bits=32):
    """Bytes of the stored stream: m values of value_bits plus m codes of index_bits."""
    m = len(positions) + filler_count(positions, index_bits)
    return (m * value_bits + 7) // 8 + (m * index_bits + 7) // 8


def best_index_bits(positions, value_bits=32):
    """The index width in 1..16 that makes the stream smallest (the narrowest on ties)."""
    sizes = [stream_bytes(positions, b, value_bits) for b in range(1, MAX_INDEX_BITS + 1)]
    return 1 + int(np.argmin(sizes))


# --------------------------------------------------------------------------
# CSR in memory


def csr_from_dense(M):
    """M (R, K) -> (values (nnz,) M.dtype, indices (nnz,) uint32, indptr (R+1,) int64): its nonzeros."""
    check_array(M, "matrix", ndim=2, finite=False)
    positions = np.flatnonzero(M)
    return csr_from_positions(positions, M.reshape(-1)[positions], M.shape)


def csr_from_positions(positions, values, shape):
    """CSR arrays from sorted flat positions in a (R, K) matrix and their values."""
    R, K = shape
    rows, cols = np.divmod(positions, K)
    indptr = np.searchsorted(rows, np.arange(R + 1)).astype(np.int64)
    return values, cols.astype(np.uint32), indptr


def csr_to_dense(values, indices, indptr, shape):
    """The (R, K) matrix the CSR arrays describe."""
    M = np.zeros(shape, dtype=values.dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
    M[rows, indices] = values
    return M


def csr_positions(indices, indptr, ncols):
    """Flat row-major positions (nnz,) int64 of the CSR entries."""
    rows = np.repeat(np.arange(indptr.size - 1, dtype=np.int64), np.diff(indptr))
    return rows * ncols + indices


# --------------------------------------------------------------------------
# Kernels: CSR x dense


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
    minicnn's MIN_OUTPUTS outputs (N * R: fc1 at batch 64 makes 32,000).

    Counted in outputs, as minicnn's kernels do, not in multiply-adds: on fc1 at
    10% density the threaded build lost to the serial one at batch 16, 64 and 256.
    """
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
# Kernels: CSR x dense with 16-lane vectors (float32, optim.simd)
#
# The loops above are bound by the loads of one nonzero at a time: its value, its
# column, x at that column. The two kernels below regroup the nonzeros once per
# sparsity pattern (the layouts are cached on the layer) so that every load
# brings 16 useful lanes, and keep their running sums in registers.


def column_blocks(indices, indptr, cols, block=BLOCK_COLUMNS):
    """The nonzeros of M (R, cols) regrouped by blocks of `block` columns, then by row.

    Returns order (nnz,) int64, block_columns (nnz,) uint32 and block_ptr (B*R + 1,) int64,
    B = ceil(cols / block): entry p of the regrouped list is CSR entry order[p], in column
    block_columns[p]; block b's part of row r is p in block_ptr[b*R + r] : block_ptr[b*R + r + 1].
    """
    R = indptr.size - 1
    rows = np.repeat(np.arange(R), np.diff(indptr))
    group = indices.astype(np.int64) // block * R + rows
    order = np.argsort(group, kind="stable")  # CSR order within a group: columns left to right
    B = -(-cols // block)
    block_ptr = np.zeros(B * R + 1, np.int64)
    np.cumsum(np.bincount(group, minlength=B * R), out=block_ptr[1:])
    return order, np.ascontiguousarray(indices[order]), block_ptr


@numba.njit(cache=True)
def _transpose_into(dst, ds, src, ss, rows, cols):
    """dst[c*ds + r] = src[r*ss + c] for r < rows, c < cols (flat float32 arrays, row strides ss, ds):
    16 x 16 blocks in registers (simd.transpose16), the ragged edges one number at a time."""
    R, C = rows - rows % LANES, cols - cols % LANES
    for r in range(0, R, LANES):
        for c in range(0, C, LANES):
            transpose16(src, r * ss + c, ss, dst, c * ds + r, ds)
    for r in range(rows):
        for c in range(C if r < R else 0, cols):
            dst[c * ds + r] = src[r * ss + c]


@numba.njit(inline="always")
def _sum_into64(dst, o, a0, a1, a2, a3, values, rows, scale, p0, p1, src, base):
    """dst[o : o + 64] = (a0, a1, a2, a3) + sum over p0 <= p < p1 of values[p] * src[b : b + 64],
    b = base + scale * rows[p]: 64 running sums in four vector registers while the nonzeros go by."""
    for p in range(p0, p1):
        v, b = splat(values[p]), base + scale * np.int64(rows[p])
        a0 = fma(v, load(src, b), a0)
        a1 = fma(v, load(src, b + LANES), a1)
        a2 = fma(v, load(src, b + 2 * LANES), a2)
        a3 = fma(v, load(src, b + 3 * LANES), a3)
    store(dst, o, a0)
    store(dst, o + LANES, a1)
    store(dst, o + 2 * LANES, a2)
    store(dst, o + 3 * LANES, a3)


@numba.njit(inline="always")
def _sum_into16(dst, o, a, values, rows, scale, p0, p1, src, base):
    """_sum_into64 for one vector of 16 lanes (a tile's last, narrower part)."""
    for p in range(p0, p1):
        a = fma(splat(values[p]), load(src, base + scale * np.int64(rows[p])), a)
    store(dst, o, a)


def _blocked_matmul_loops(block_values, block_columns, block_ptr, x, bias):
    N, K = x.shape
    R = bias.size
    B = (block_ptr.size - 1) // R
    Np = -(-N // LANES) * LANES
    # X = x.T, one row of Np lanes per input (the batch padded with zeros to whole vectors),
    # and Y = y.T the same way: each nonzero M[r, k] adds its value times X[k] to Y[r].
    Xf, Yf = aligned_empty(K * Np), aligned_empty(R * Np)
    X, Y = Xf.reshape((K, Np)), Yf.reshape((R, Np))
    X[:, N:] = 0
    _transpose_into(Xf, Np, x.ravel(), K, N, K)
    for r in range(R):
        Y[r, :] = bias[r]
    # Tiles of 64 lanes: four vector sums per row, in registers while the row's nonzeros in
    # one block of columns go by; the block's rows of X stay in L1 meanwhile.
    for n0 in range(0, Np, 4 * LANES):
        for b in range(B):
            for r in range(R):
                p0, p1 = block_ptr[b * R + r], block_ptr[b * R + r + 1]
                if p0 == p1:
                    continue
                o = r * Np + n0
                if n0 + 4 * LANES <= Np:
                    a0, a1, a2, a3 = load(Yf, o), load(Yf, o + LANES), load(Yf, o + 2 * LANES), load(Yf, o + 3 * LANES)
                    _sum_into64(Yf, o, a0, a1, a2, a3, block_values, block_columns, Np, p0, p1, Xf, n0)
                else:  # the last, narrower tile: a vector at a time
                    for t in range(n0, Np, LANES):
                        o = r * Np + t
                        _sum_into16(Yf, o, load(Yf, o), block_values, block_columns, Np, p0, p1, Xf, t)
    y = np.empty((N, R), dtype=np.float32)
    _transpose_into(y.ravel(), R, Yf, Np, R, N)
    return y


blocked_matmul = numba.njit(cache=True)(_blocked_matmul_loops)
blocked_matmul.__doc__ = """y (N, R) = x @ M.T + bias for float32 x (N, K), with M's nonzeros as
`column_blocks` regroups them: block_values = values[order], block_columns, block_ptr.
Same result as csr_matmul_ref up to rounding (one per multiply-add here)."""


def lane_layout(indices, indptr, cols):
    """Where each nonzero of M (R, cols) goes in the layout of `lanes_matmul`.

    Rows are taken 16 at a time, a slice (one vector lane per row), and columns 32 at a
    time, a chunk (the part of x that two vectors hold). The nonzeros of slice s in chunk
    q are stacked in layers: layer j holds the j-th nonzero of every row of the slice in
    that chunk (a zero where a row has fewer), so a slice takes max_rows nnz(row, chunk)
    layers per chunk. Each layer is 16 values and 16 bytes, the columns within the chunk.

    Returns slots (nnz,) int64, the place of each CSR entry in the flat (layers, 16) arrays,
    lane_columns (layers * 16,) uint8 and layer_ptr (S*Q + 1,) int64, S = ceil(R / 16),
    Q = ceil(cols / 32): slice s's layers in chunk q are layer_ptr[s*Q + q] : layer_ptr[s*Q + q + 1].
    Each row's columns must be increasing, as CSR keeps them. A padding slot holds 0 times
    the chunk's first input: an inf or NaN there makes NaN in rows that never read it.
    """
    R = indptr.size - 1
    S, Q = -(-R // LANES), -(-cols // (2 * LANES))
    rows = np.repeat(np.arange(R), np.diff(indptr))
    chunk = indices.astype(np.int64) // (2 * LANES)
    counts = np.bincount(rows * Q + chunk, minlength=S * LANES * Q).reshape(S * LANES, Q)  # per row, per chunk
    first = np.concatenate([[0], np.cumsum(counts)])[rows * Q + chunk]  # CSR keeps a row's chunk together
    depth = np.arange(indices.size) - first  # which layer of its (slice, chunk) the entry is in
    layers = counts.reshape(S, LANES, Q).max(axis=1)  # (S, Q)
    layer_ptr = np.concatenate([[0], np.cumsum(layers)])
    slots = (layer_ptr[rows // LANES * Q + chunk] + depth) * LANES + rows % LANES
    lane_columns = np.zeros(layer_ptr[-1] * LANES, np.uint8)
    lane_columns[slots] = indices % (2 * LANES)
    return slots, lane_columns, layer_ptr


def lane_values(values, slots, size):
    """The values in lane layout: (size,) float32, values[k] at slots[k] and zeros elsewhere."""
    lanes = aligned_empty(size)
    lanes[:] = 0
    lanes[slots] = values
    return lanes


def lanes_matmul_ref(lane_vals, lane_columns, layer_ptr, x, bias):
    """y (N, R) = x @ M.T + bias from M in lane layout (`lane_layout`) and x (N, K): what lanes_matmul computes."""
    (N, K), R = x.shape, bias.size
    S, Q = -(-R // LANES), -(-K // (2 * LANES))
    block = np.repeat(np.arange(S * Q), np.diff(layer_ptr))  # the (slice, chunk) of each layer
    xp = np.zeros((N, Q * 2 * LANES), x.dtype)
    xp[:, :K] = x
    taken = xp[:, (block % Q)[:, None] * 2 * LANES + lane_columns.reshape(-1, LANES)]  # (N, layers, 16)
    y = np.zeros((N, S, LANES), x.dtype)
    np.add.at(y, (slice(None), block // Q), lane_vals.reshape(-1, LANES) * taken)
    return y.reshape(N, S * LANES)[:, :R] + bias


def _lanes_matmul_loops(lane_vals, lane_columns, layer_ptr, x, bias):
    N, K = x.shape
    R = bias.size
    S, Q = -(-R // LANES), -(-K // (2 * LANES))
    xp, yp = aligned_empty(Q * 2 * LANES), aligned_empty(S * LANES)
    xp[K:] = 0
    y = np.empty((N, R), dtype=np.float32)
    for n in range(N):
        xp[:K] = x[n]
        for s in range(S):
            # Two sums, the even and the odd layers: the next multiply-add need not wait for the last.
            even, odd = splat(0.0), splat(0.0)
            for q in range(Q):
                lo, hi = load(xp, 2 * LANES * q), load(xp, 2 * LANES * q + LANES)  # x's chunk, in registers
                first, end = layer_ptr[s * Q + q], layer_ptr[s * Q + q + 1]
                pairs_end = first + (end - first) // 2 * 2
                for j in range(LANES * first, LANES * pairs_end, 2 * LANES):
                    even = fma(load(lane_vals, j), permute2(lo, lane_columns, j, hi), even)
                    odd = fma(load(lane_vals, j + LANES), permute2(lo, lane_columns, j + LANES, hi), odd)
                if pairs_end < end:
                    j = LANES * pairs_end
                    even = fma(load(lane_vals, j), permute2(lo, lane_columns, j, hi), even)
            store(yp, LANES * s, add(even, odd))
        for r in range(R):
            y[n, r] = yp[r] + bias[r]
    return y


def _no_permute(*args):
    raise RuntimeError("lanes_matmul needs AVX-512's vpermi2ps, which this CPU (or Numba's target) lacks: "
                       "see optim.simd.HAS_PERMUTE; blocked_matmul and the CSR loops run everywhere")


# Compiled only where vpermi2ps exists: compiling it elsewhere is a fatal LLVM error.
lanes_matmul = numba.njit(cache=True)(_lanes_matmul_loops) if HAS_PERMUTE else _no_permute


# --------------------------------------------------------------------------
# Kernels: direct sparse convolution


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


def _wide_conv2d_loops(values, taps, indptr, xflat, bias, N, C, Hp, Wp, KH, KW):
    F = indptr.size - 1
    Ho, Wo = Hp - KH + 1, Wp - KW + 1
    # At stride 1, output (i, j) is computed at p = i*Wp + j of a plane as wide as the
    # input: tap (c, kh, kw) then reads x[c].flat[p + kh*Wp + kw], one contiguous run of
    # L floats per nonzero, at the cost of Wp - Wo discarded columns per row. The run is
    # cut into tiles of 64 lanes whose sums stay in registers while the filter's nonzeros
    # go by, as in blocked_matmul; xflat has a vector of slack past its end for the last tile.
    L = (Ho - 1) * Wp + Wo
    Lp = -(-L // LANES) * LANES
    shift = np.empty(values.size, dtype=np.int64)  # where each tap starts in a sample's planes
    for k in range(values.size):
        shift[k] = taps[k, 0] * Hp * Wp + taps[k, 1] * Wp + taps[k, 2]
    wide = aligned_empty(N * F * Lp)
    for t in prange(N * F):  # one output plane per task
        n, f = t // F, t % F
        x0, w0 = n * C * Hp * Wp, t * Lp
        k0, k1, bf = indptr[f], indptr[f + 1], splat(bias[f])
        for l0 in range(0, Lp, 4 * LANES):
            if l0 + 4 * LANES <= Lp:
                _sum_into64(wide, w0 + l0, bf, bf, bf, bf, values, shift, 1, k0, k1, xflat, x0 + l0)
            else:  # the last, narrower tile: a vector at a time
                for v0 in range(l0, Lp, LANES):
                    _sum_into16(wide, w0 + v0, bf, values, shift, 1, k0, k1, xflat, x0 + v0)
    out = np.empty((N, F, Ho, Wo), dtype=np.float32)
    for t in range(N * F):
        for i in range(Ho):
            for j in range(Wo):
                out[t // F, t % F, i, j] = wide[t * Lp + i * Wp + j]
    return out


# Threads pay from this many multiply-adds on: on LeNet-5's conv2 the threaded build lost at
# 2.6M (batch 8 at 20% density) and won at 3.8M; a batch-1 conv2 at 26% density is 0.4M.
MIN_CONV_MACS = 1 << 22
_sparse_conv2d = twin(_sparse_conv2d_loops, MIN_CONV_MACS)
_wide_conv2d = twin(_wide_conv2d_loops, MIN_CONV_MACS)


def conv_taps(indices, KH, KW):
    """(nnz, 3) int64: the (c, kh, kw) of each column index c*KH*KW + kh*KW + kw of a conv's M.

    Computed once per pattern: three integer divisions per nonzero at every call took
    most of the direct conv's time at batch 1 (a division costs ~15 cycles, the nonzero's
    work a handful)."""
    c, rest = np.divmod(indices.astype(np.int64), KH * KW)
    return np.stack([c, *np.divmod(rest, KW)], axis=1)


def sparse_conv2d(values, taps, indptr, xp, bias, KH, KW, stride):
    """Fast direct sparse conv: sparse_conv2d_ref's result, with the column indices as
    `conv_taps(indices, KH, KW)`; 16 lanes at a time in float32 at stride 1 (_wide_conv2d_loops),
    the plain loops otherwise; serial below MIN_CONV_MACS multiply-adds."""
    N, C, Hp, Wp = xp.shape
    work = N * values.size * ((Hp - KH) // stride + 1) * ((Wp - KW) // stride + 1)
    if stride == 1 and xp.dtype == values.dtype == bias.dtype == np.float32:  # the 16-lane kernel
        xflat = aligned_empty(xp.size + LANES)
        xflat[: xp.size] = xp.ravel()
        xflat[xp.size :] = 0
        return _wide_conv2d(work, values, taps, indptr, xflat, bias, N, C, Hp, Wp, KH, KW)
    return _sparse_conv2d(work, values, taps, indptr, xp, bias, KH, KW, stride)


# --------------------------------------------------------------------------
# Layers
#
# A layer here is two independent choices, one class each:
#   the geometry, how M is used:   CSRDense (M = W.T) or CSRConv2D (M = W.reshape(F, -1))
#   the storage, what M's nonzeros are made of: trained values (_SparseLayer, below), or
#   codebook[labels] (optim.sharing._SharedLayer)
# so SparseDense is `_SparseLayer` + `CSRDense`, and a shared layer runs the very same
# forward and backward as the pruned one.


class CSRLayer(Layer):
    """The machinery of a weight matrix M (rows, cols) held as its nonzeros in CSR, plus a bias.

    CSR structure: `indices` (nnz,) uint32 and `indptr` (rows+1,) int64; params are
    {weight_param: what the nonzeros are made of, "b": (rows,) bias}. A storage class provides
        weight_param      the name of that param ("values", "codebook")
        values()          (nnz,) float, M's nonzeros in CSR order
        _weight_grad(dM)  dL/d(params[weight_param]) from dL/dM (rows, cols)
        _common_config()  its constructor arguments, added to the geometry's in config()
    and a geometry class (CSRDense, CSRConv2D) provides sparse_family, forward and backward.
    """

    def _set_structure(self, shape, indices, indptr, params):
        self.shape = tuple(shape)
        self.indices, self.indptr = np.ascontiguousarray(indices, np.uint32), indptr
        self.params = params
        self.grads = {name: np.zeros_like(p) for name, p in params.items()}
        self._dense = None  # M, built on demand when the dense kernel is faster
        # What the sparse kernels derive from the layer, built on first use: what follows from the
        # pattern alone (_pattern) lasts as long as the pattern; the values laid out for a kernel
        # (_values_in), until training changes them.
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

    def uses_sparse_kernel(self, batch=1):
        """Whether forward runs the sparse kernel for a batch of this many inputs (SPARSE_BELOW)."""
        return self.density < sparse_below(self.sparse_family, batch)

    def macs(self, in_shape):
        return self.indices.size


class CSRDense(CSRLayer):
    """Geometry of Dense (y = x @ W + b) with M = W.T (out, in): x (N, in_features) -> (N, out_features)."""

    sparse_family = "dense"

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
            return self._sparse_forward(np.ascontiguousarray(x))
        out = x @ self._dense_matrix().T
        out += self.params["b"]
        return out

    def _sparse_forward(self, x):
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

    def _blocks(self):
        return self._pattern("blocks", lambda: column_blocks(self.indices, self.indptr, self.shape[1]))

    def _lanes(self):
        return self._pattern("lanes", lambda: lane_layout(self.indices, self.indptr, self.shape[1]))

    def _values_in(self, layout):
        """The values laid out for `layout`'s kernel.

        Laid out again after backward (training is about to change them) or when the array
        they come from is a new one (a cast; `layer.params["values"] = edited`). Values changed
        in place by hand, outside training, are not noticed: comparing them at every call
        would cost as much as the batch-1 kernel itself. (`_dense_matrix` does compare them:
        next to a dense product the comparison is cheap.)"""
        source = self.params[self.weight_param]
        if self._laid_out.get(layout, (None,))[0] is not source:
            if layout == "blocks":
                order, _, _ = self._blocks()
                laid_out = self.values()[order]
            else:
                slots, lane_columns, _ = self._lanes()
                laid_out = lane_values(self.values(), slots, lane_columns.size)
            self._laid_out[layout] = (source, laid_out)
        return self._laid_out[layout][1]

    def backward(self, dout):
        self._laid_out = {}
        x, dout = self.cache, dout.astype(self.dtype, copy=False)
        self.grads[self.weight_param] = self._weight_grad(dout.T @ x)  # dL/dM = dout^T x, (out, in)
        self.grads["b"] = dout.sum(axis=0)
        return dout @ self._dense_matrix()

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features, **self._common_config()}


class CSRConv2D(CSRLayer):
    """Geometry of Conv2D with M = W.reshape(F, C*KH*KW): x (N, C, H, W) -> (N, F, Ho, Wo)."""

    sparse_family = "conv2d"

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
        # The sparse forward never built the im2row matrix backward needs: build it here.
        x, k = self.cache, self.kernel_size
        rows = kernels.conv_rows(x, k, k, self.stride, self.padding)
        dx, dW, self.grads["b"] = kernels.conv2d_backward(
            dout.astype(self.dtype, copy=False), rows, x.shape, self._weight(), self.stride, self.padding)
        self.grads[self.weight_param] = self._weight_grad(dW)
        return dx

    def macs(self, in_shape):
        _, Ho, Wo = self.output_shape(in_shape)
        return self.indices.size * Ho * Wo

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                **self._common_config()}


class _SparseLayer(CSRLayer):
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
        self._set_structure(shape, indices, indptr, {"values": np.ascontiguousarray(values), "b": b})

    def _empty(self, shape, index_bits):
        """No nonzeros yet (from_dense or from_state fill the layer)."""
        empty = (np.zeros(0, np.float32), np.zeros(0, np.uint32), np.zeros(shape[0] + 1, np.int64))
        self._set_csr(*empty, shape, np.zeros(shape[0], np.float32), _check_index_bits(index_bits))

    def values(self):
        """The nonzero weights (nnz,), in CSR order."""
        return self.params["values"]

    def _positions(self):
        return csr_positions(self.indices, self.indptr, self.shape[1])

    def _weight_grad(self, dM):
        """dL/dvalues from dL/dM (rows, cols): the gradient at the stored positions only."""
        return dM.reshape(-1)[self._positions()].astype(self.dtype, copy=False)

    def state(self):
        positions = self._positions()
        codes, slots = encode_relative(positions, self.index_bits)
        flat = np.zeros(self.shape[0] * self.shape[1], dtype=self.params["values"].dtype)
        flat[positions] = self.params["values"]
        return {"values": flat[slots], "codes": pack_bits(codes, self.index_bits), "b": self.params["b"]}

    @classmethod
    def from_state(cls, config, arrays):
        """Rebuild the layer from its config and the arrays `state()` saved (fillers dropped)."""
        new = cls(**config)
        for name in ("values", "codes", "b"):
            if name not in arrays:
                raise ValueError(f"{cls.kind} layer is missing its {name!r} array")
        values, b = arrays["values"], arrays["b"]
        if values.ndim != 1 or values.dtype.kind != "f" or b.shape != new.params["b"].shape or b.dtype.kind != "f":
            raise ValueError(f"{cls.kind} layer: expected 1-D float values and a float bias of shape "
                             f"{new.params['b'].shape}, got {values.dtype} {values.shape} and {b.dtype} {b.shape}")
        slots = decode_relative(unpack_bits(arrays["codes"], new.index_bits, values.size))
        if slots.size and slots[-1] >= new.shape[0] * new.shape[1]:
            raise ValueError(f"{cls.kind} layer: index stream points past the end of its {new.shape} matrix")
        new._set_csr(*csr_from_positions(slots, values, new.shape), new.shape, b, new.index_bits)
        return new

    @classmethod
    def _from_matrix(cls, M, b, config, index_bits):
        """The layer holding the nonzeros of M (rows, cols); index_bits None picks the smallest file."""
        positions = np.flatnonzero(M)
        index_bits = best_index_bits(positions) if index_bits is None else _check_index_bits(index_bits)
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

    def _common_config(self):
        return {"index_bits": self.index_bits}


class SparseDense(_SparseLayer, CSRDense):
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


class SparseConv2D(_SparseLayer, CSRConv2D):
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
    if not isinstance(model, Sequential):
        raise TypeError(f"expected a Sequential model, got {type(model).__name__}")
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


def to_dense(model, layer_type=_SparseLayer):
    """A copy of `model` with its `layer_type` layers (default: the sparse ones; optim.sharing.unshare
    passes its shared ones) turned back into Dense/Conv2D, to prune further or train."""
    if not isinstance(model, Sequential):
        raise TypeError(f"expected a Sequential model, got {type(model).__name__}")
    layers = [layer.to_dense() if isinstance(layer, layer_type) else copy.deepcopy(layer) for layer in model.layers]
    return Sequential(layers, input_shape=model.input_shape)
