"""Pack unsigned integers of any width 1..32 into a dense bit stream, and back.

A layer whose indices need only b bits should cost b bits each on disk, not
a byte or four. Value v_i occupies bits [i*b, (i+1)*b) of the stream, most
significant bit first, and the stream is padded with zeros to whole bytes:

    n values of b bits  ->  ceil(n * b / 8) bytes

The NumPy implementation spreads each value into its bits (np.unpackbits),
keeps the low b of them and packs the concatenation (np.packbits): short
and exact, at 32 bytes of scratch per value, which is fine for layers of a
few million weights.
"""

import numpy as np

from minicnn.checks import check_int


def packed_size(count, bits):
    """Bytes taken by `count` values of `bits` bits."""
    return (count * check_int(bits, "bits", 1, 32) + 7) // 8


def pack_bits(values, bits):
    """values (n,) unsigned ints < 2**bits -> uint8 (ceil(n*bits/8),)."""
    bits = check_int(bits, "bits", 1, 32)
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise ValueError(f"values must be a 1-D integer array, got {values.dtype} {values.shape}")
    if values.size and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"values must lie in [0, 2**{bits}), got [{values.min()}, {values.max()}]")
    as_bytes = values.astype(">u4").view(np.uint8).reshape(-1, 4)
    all_bits = np.unpackbits(as_bytes, axis=1)  # (n, 32), most significant first
    return np.packbits(all_bits[:, 32 - bits :].reshape(-1))


def unpack_bits(data, bits, count):
    """Inverse of pack_bits: uint8 stream -> uint32 (count,)."""
    bits = check_int(bits, "bits", 1, 32)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ValueError(f"packed data must be a 1-D uint8 array, got {data.dtype} {data.shape}")
    if data.size != packed_size(count, bits):
        raise ValueError(
            f"packed data has {data.size} bytes; {count} values of {bits} bits need {packed_size(count, bits)}"
        )
    stream = np.unpackbits(data)[: count * bits].reshape(count, bits)
    full = np.zeros((count, 32), np.uint8)
    full[:, 32 - bits :] = stream
    return np.packbits(full, axis=1).view(">u4").reshape(count).astype(np.uint32)
