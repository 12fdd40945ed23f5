"""The storage of a sparse matrix: CSR in memory, a relative-index stream on disk.

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
"""

import numpy as np

from minicnn.checks import check_array, check_int

MAX_INDEX_BITS = 16


def check_index_bits(bits):
    """bits as an int, checked to be a valid index width (1..MAX_INDEX_BITS)."""
    return check_int(bits, "index_bits", 1, MAX_INDEX_BITS)


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
    return int(((gaps - 1) >> check_index_bits(index_bits)).sum())


def encode_relative(positions, index_bits):
    """Flat positions of the nonzeros -> the relative-index stream.

    positions: (nnz,) strictly increasing ints (e.g. np.flatnonzero(M)).
    Returns (codes, slots), both (m,) with m = nnz + fillers:
      codes uint32: slot_i - slot_(i-1) - 1, each < 2**index_bits;
      slots int64: the flat position of every stream entry, fillers included
      (a filler's slot is a zero of M, so M.flat[slots] is the values stream).
    """
    positions = _check_positions(positions)
    bits = check_index_bits(index_bits)
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
