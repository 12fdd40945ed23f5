"""The sparse kernels on 16-lane float32 vectors (`minicnn.simd`).

The CSR loops of kernels.py are bound by the loads of one nonzero at a time:
its value, its column, x at that column. The kernels here regroup the
nonzeros once per sparsity pattern (the layers cache the layouts) so that
every load brings 16 useful lanes, and keep their running sums in registers:

- `lanes_matmul`, y = x @ M.T + bias for a few inputs (AVX-512): 16 rows of
  M at a time, one per lane; a chunk of 32 inputs sits in two registers and
  each layer of nonzeros picks its 16 inputs out of them with one table
  lookup (vpermi2ps), so only the values and one byte per column are read
  from memory. The layers pad each row of a 16-row slice to the fullest one.
- `blocked_matmul`, the same for a batch: x transposed, 16 inputs a vector,
  so a nonzero multiplies 64 inputs with four multiply-adds whose sums stay
  in registers; columns in blocks of 128 keep x's rows in the L1 cache.
- `wide_conv2d`, the direct sparse convolution at stride 1: 64 outputs of a
  plane in four registers while the filter's nonzeros go by.

Each computes what its reference in kernels.py (or `lanes_matmul_ref`) does,
up to rounding: one per multiply-add.
"""

import numba
import numpy as np
from numba import prange

from minicnn.parallel import twin
from minicnn.simd import HAS_PERMUTE, LANES, add, aligned_empty, fma, load, permute2, splat, store, transpose16

BLOCK_COLUMNS = 128  # columns of M per block of blocked_matmul: 128 rows of a 64-lane X, 32 KB


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
                       "see minicnn.simd.HAS_PERMUTE; blocked_matmul and the CSR loops run everywhere")


# Compiled only where vpermi2ps exists: compiling it elsewhere is a fatal LLVM error.
lanes_matmul = numba.njit(cache=True)(_lanes_matmul_loops) if HAS_PERMUTE else _no_permute


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
_wide_conv2d = twin(_wide_conv2d_loops, MIN_CONV_MACS)


def wide_conv2d(values, taps, indptr, xp, bias, KH, KW):
    """sparse_conv2d_ref's result at stride 1 for float32 xp (N, C, Hp, Wp), values and bias, with the
    column indices as `kernels.conv_taps`; serial below MIN_CONV_MACS multiply-adds."""
    N, C, Hp, Wp = xp.shape
    work = N * values.size * (Hp - KH + 1) * (Wp - KW + 1)
    xflat = aligned_empty(xp.size + LANES)  # a vector of slack past the end, for the last tile
    xflat[: xp.size] = xp.ravel()
    xflat[xp.size :] = 0
    return _wide_conv2d(work, values, taps, indptr, xflat, bias, N, C, Hp, Wp, KH, KW)
