"""Canonical Huffman coding of integer symbol streams, written out in full.

Huffman (1952): start with one tree per symbol, weighted by its frequency,
and repeatedly merge the two lightest trees; a symbol's code length l_s is
its depth in the final tree. No prefix code is shorter on average, and

    H <= sum_s p_s l_s < H + 1,    H = -sum_s p_s log2 p_s  (the entropy)

so a stream of n symbols costs less than n (H + 1) bits. Deep Compression
(Han, Mao & Dally, ICLR 2016, section 4) codes a layer's weight indices and
its sparse relative indices this way, saving 20-30% over fixed-width codes:
both are far from uniform (weights bunch near zero, short gaps dominate).

Canonical codes (as in DEFLATE, RFC 1951 section 3.2.2): the lengths alone
fix the codes. Sort the used symbols by (length, symbol) and hand out
consecutive binary numbers, shifting left whenever the length grows:

    code_0 = 0,    code_(i+1) = (code_i + 1) << (l_(i+1) - l_i)

so a file stores only the code lengths, never the tree. Decoding reads one
bit at a time (as zlib's puff.c does): among the codes of length l, which
run from `first` to first + count[l] - 1, a prefix `code` is complete as
soon as code < first + count[l].

A stream on its own (`to_bytes` / `from_bytes`), all integers little-endian:

    uint32 count      symbols in the stream
    uint32 alphabet   A: symbols are 0 .. A-1 (one code length each)
    uint8  width      bits per stored code length
    uint32 bits       bits of the payload (so a wrong count cannot read padding as symbols)
    lengths           A code lengths of `width` bits each (optim.bitpack)
    payload           the codes, most significant bit first, zero-padded to a byte

The empty stream has alphabet 0; a stream of a single distinct symbol gives
it the one-bit code 0.
"""

import heapq

import numba
import numpy as np

from ..bitpack import pack_bits, packed_size, unpack_bits

MAX_CODE_LENGTH = 63  # codes are handled as uint64; Huffman needs > 2**40 symbols to exceed 40
HEADER = np.dtype([("count", "<u4"), ("alphabet", "<u4"), ("width", "u1"), ("bits", "<u4")])


def _check_naturals(values, name):
    """`values` as a 1-D array of non-negative integers, or a ValueError naming `name`."""
    values = np.asarray(values)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got {values.dtype} {values.shape}")
    if values.size and values.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {values.min()}")
    return values


def _check_symbols(symbols):
    return _check_naturals(symbols, "symbols").astype(np.int64)


def code_lengths(frequencies):
    """frequencies (A,) non-negative ints -> Huffman code lengths (A,) uint8 (0 for unused symbols)."""
    frequencies = _check_naturals(frequencies, "frequencies")
    lengths = np.zeros(frequencies.size, np.uint8)
    used = np.flatnonzero(frequencies)
    if used.size == 1:
        lengths[used] = 1  # one symbol still needs one bit per occurrence
    if used.size <= 1:
        return lengths
    # Nodes 0..n-1 are the used symbols, n.. the merged trees in order of creation;
    # ties are broken by node number, so the code is deterministic.
    n = used.size
    heap = [(int(f), node) for node, f in enumerate(frequencies[used])]
    heapq.heapify(heap)
    parent = np.zeros(2 * n - 1, np.int64)
    for node in range(n, 2 * n - 1):
        weight_a, a = heapq.heappop(heap)
        weight_b, b = heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (weight_a + weight_b, node))
    depth = np.zeros(2 * n - 1, np.int64)
    for node in range(2 * n - 3, -1, -1):  # parents are created after their children
        depth[node] = depth[parent[node]] + 1
    if depth[:n].max() > MAX_CODE_LENGTH:
        raise ValueError(f"a Huffman code longer than {MAX_CODE_LENGTH} bits is not supported")
    lengths[used] = depth[:n]
    return lengths


def _canonical_order(lengths):
    """The used symbols sorted by (length, symbol): the order canonical codes are handed out in."""
    used = np.flatnonzero(lengths)
    return used[np.argsort(lengths[used], kind="stable")]


def canonical_codes(lengths):
    """Code lengths (A,) -> canonical codes (A,) uint64; symbol s's code is its low lengths[s] bits."""
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.uint64)
    code, previous = 0, 0
    for s in _canonical_order(lengths):
        code <<= int(lengths[s]) - previous
        codes[s], previous = code, int(lengths[s])
        code += 1
    return codes


def encoded_bits(frequencies):
    """Bits of the Huffman payload for symbols with these frequencies (without the header)."""
    frequencies = np.asarray(frequencies)
    return int((frequencies.astype(np.int64) * code_lengths(frequencies)).sum())


def encode(symbols, lengths):
    """symbols (n,) ints -> (payload uint8 (ceil(bits/8),), bits) with the canonical code of `lengths`."""
    symbols = _check_symbols(symbols)
    lengths = np.asarray(lengths, np.int64)
    if symbols.size and symbols.max() >= lengths.size:
        raise ValueError(f"symbol {symbols.max()} is outside the alphabet 0..{lengths.size - 1}")
    size, code = lengths[symbols], canonical_codes(lengths)[symbols]
    if np.any(size == 0):
        raise ValueError(f"symbol {symbols[np.argmax(size == 0)]} has no code (frequency 0)")
    ends = np.cumsum(size)
    starts = ends - size
    bits = np.zeros(int(ends[-1]) if size.size else 0, np.uint8)
    for j in range(int(size.max(initial=0))):  # bit j of every code at once, most significant first
        has = size > j
        shift = (size[has] - 1 - j).astype(np.uint64)
        bits[starts[has] + j] = (code[has] >> shift) & np.uint64(1)
    return np.packbits(bits), bits.size


def _decode_loop(payload, available, count, counts, symbols, out):
    """Decode `count` symbols from the first `available` bits of payload into out; returns the
    bits read, -1 if they ran out, -2 on a bit pattern that is no code.
    counts[l]: the number of codes of length l; symbols: the used symbols in canonical order."""
    position = 0
    for i in range(count):
        code = first = index = 0
        found = False
        for length in range(1, counts.size):
            if position >= available:
                return -1
            code |= (int(payload[position >> 3]) >> (7 - (position & 7))) & 1  # int: no uint8 overflow
            position += 1
            n = counts[length]
            if code < first + n:
                out[i] = symbols[index + code - first]
                found = True
                break
            index += n
            first = (first + n) << 1
            code <<= 1
        if not found:
            return -2
    return position


decode_loop = numba.njit(cache=True)(_decode_loop)  # sequential by nature: one thread


def _check_lengths(lengths):
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu"):
        raise ValueError(f"code lengths must be a 1-D integer array, got {lengths.dtype} {lengths.shape}")
    lengths = lengths.astype(np.int64)
    if lengths.size and (lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH):
        raise ValueError(f"code lengths must lie in 0..{MAX_CODE_LENGTH}, got {lengths.min()}..{lengths.max()}")
    kraft = float(np.ldexp(1.0, -lengths[lengths > 0]).sum())
    if kraft > 1:
        raise ValueError(f"corrupt Huffman code: its lengths are no prefix code (Kraft sum {kraft:.4f} > 1)")
    return lengths


def _decode(payload, lengths, count, loop, bits):
    payload = np.asarray(payload)
    if payload.ndim != 1 or payload.dtype != np.uint8:
        raise ValueError(f"payload must be a 1-D uint8 array, got {payload.dtype} {payload.shape}")
    lengths = _check_lengths(lengths)
    counts = np.bincount(lengths, minlength=int(lengths.max(initial=0)) + 1)
    counts[0] = 0
    if count and counts.sum() == 0:
        raise ValueError(f"corrupt Huffman stream: {count} symbols but no code")
    available = payload.size * 8 if bits is None else min(bits, payload.size * 8)
    if count > available:  # every code is at least one bit long
        raise ValueError(f"truncated Huffman stream: {count} symbols cannot fit in {available} bits")
    out = np.zeros(count, np.int64)
    used = loop(payload, available, count, counts, _canonical_order(lengths), out)
    if used == -1:
        raise ValueError(f"truncated Huffman stream: {available} bits end before symbol {count}")
    if used == -2:
        raise ValueError("corrupt Huffman stream: a bit pattern that is no code")
    if bits is not None and used != bits:
        raise ValueError(f"corrupt Huffman stream: {count} symbols took {used} of its {bits} bits")
    if payload.size != (used + 7) // 8 or (used % 8 and payload[-1] & (0xFF >> (used % 8))):
        raise ValueError(f"corrupt Huffman stream: {count} symbols take {used} bits, "
                         f"the payload has {payload.size} bytes (or non-zero padding)")
    return out


def decode(payload, lengths, count, bits=None):
    """Inverse of encode: payload uint8, code lengths (A,), symbol count -> symbols (count,) int64.
    bits: the payload's exact length in bits, if known (checked)."""
    return _decode(payload, lengths, count, decode_loop, bits)


def decode_ref(payload, lengths, count, bits=None):
    """decode, with the bit loop run by the Python interpreter (the reference for the Numba one)."""
    return _decode(payload, lengths, count, _decode_loop, bits)


def to_bytes(symbols, alphabet=None):
    """A self-contained stream: header, code lengths, payload (see the module docstring) -> uint8."""
    symbols = _check_symbols(symbols)
    alphabet = int(symbols.max()) + 1 if alphabet is None and symbols.size else (alphabet or 0)
    if symbols.size and symbols.max() >= alphabet:
        raise ValueError(f"symbol {symbols.max()} is outside the alphabet 0..{alphabet - 1}")
    lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
    payload, bits = encode(symbols, lengths)
    width = int(lengths.max(initial=0)).bit_length()
    header = np.array([(symbols.size, alphabet, width, bits)], HEADER).view(np.uint8)
    packed = pack_bits(lengths, width) if width else np.zeros(0, np.uint8)
    return np.concatenate([header, packed, payload])


def _take(data, start, nbytes, what):
    if start + nbytes > data.size:
        raise ValueError(f"truncated Huffman stream: its {what} needs {nbytes} bytes at offset {start}, "
                         f"{max(data.size - start, 0)} left")
    return data[start : start + nbytes], start + nbytes


def from_bytes(data, offset=0):
    """Read one stream written by to_bytes from data (uint8) at `offset` -> (symbols int64, end offset)."""
    data = np.asarray(data)
    if data.ndim != 1 or data.dtype != np.uint8:
        raise ValueError(f"data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
    raw, offset = _take(data, offset, HEADER.itemsize, "header")
    header = raw.view(HEADER)[0]
    count, alphabet, width, bits = (int(header[name]) for name in HEADER.names)
    if width > MAX_CODE_LENGTH.bit_length():
        raise ValueError(f"corrupt Huffman stream: code lengths of {width} bits")
    lengths = np.zeros(0, np.int64)  # width 0: no code at all, so no symbol (decode checks)
    if width:
        raw, offset = _take(data, offset, packed_size(alphabet, width), "code lengths")
        lengths = unpack_bits(raw, width, alphabet)
    payload, offset = _take(data, offset, (bits + 7) // 8, "payload")
    return decode(payload, lengths, count, bits), offset
