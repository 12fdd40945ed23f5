"""optim.sharing.huffman: optimal prefix codes, canonical codes from lengths, bit-exact round trips."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from optim.sharing import huffman

symbol_streams = st.lists(st.integers(0, 40), max_size=300).map(lambda s: np.array(s, dtype=np.int64))
skewed_streams = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 400), st.floats(0.05, 0.95)).map(
    lambda a: np.random.default_rng(a[0]).geometric(a[2], a[1]).astype(np.int64) - 1)


def test_textbook_example():
    # CLRS 16.3: frequencies a..f = 45, 13, 12, 16, 9, 5 -> a:1, b c d:3, e f:4 bits
    lengths = huffman.code_lengths(np.array([45, 13, 12, 16, 9, 5]))
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4], f"ours {lengths.tolist()}"
    codes = huffman.canonical_codes(lengths)
    # canonical: a=0, then b, c, d = 100, 101, 110, then e, f = 1110, 1111
    assert codes.tolist() == [0b0, 0b100, 0b101, 0b110, 0b1110, 0b1111], f"ours {[bin(c) for c in codes]}"
    payload, bits = huffman.encode(np.array([1, 0, 5]), lengths)
    assert bits == 3 + 1 + 4 and payload.tolist() == [0b10001111], f"ours {bits} bits {payload}"


@given(skewed_streams | symbol_streams)
def test_round_trip_is_exact(symbols):
    data = huffman.to_bytes(symbols)
    decoded, end = huffman.from_bytes(data)
    assert end == data.size
    np.testing.assert_array_equal(decoded, symbols)


@given(symbol_streams)
def test_numba_decoder_matches_reference(symbols):
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=41))
    payload, _ = huffman.encode(symbols, lengths)
    np.testing.assert_array_equal(huffman.decode(payload, lengths, symbols.size),
                                  huffman.decode_ref(payload, lengths, symbols.size))


@pytest.mark.parametrize("symbols", [np.zeros(0, np.int64), np.array([7]), np.full(100, 3)])
def test_empty_and_single_symbol_streams(symbols):
    decoded, _ = huffman.from_bytes(huffman.to_bytes(symbols))
    np.testing.assert_array_equal(decoded, symbols)
    payload, bits = huffman.encode(symbols, huffman.code_lengths(np.bincount(symbols, minlength=8)))
    assert bits == symbols.size, f"one distinct symbol costs one bit each: ours {bits} for {symbols.size}"


@given(skewed_streams | symbol_streams)
def test_length_within_one_bit_per_symbol_of_entropy(symbols):
    counts = np.bincount(symbols)
    p = counts[counts > 0] / symbols.size if symbols.size else np.zeros(0)
    entropy_bits = -(counts[counts > 0] * np.log2(p)).sum() if symbols.size else 0.0
    _, bits = huffman.encode(symbols, huffman.code_lengths(counts if counts.size else np.zeros(1, np.int64)))
    assert bits == huffman.encoded_bits(counts)
    assert entropy_bits - 1e-6 <= bits <= entropy_bits + symbols.size + 1e-6, (
        f"{bits} bits for {symbols.size} symbols of entropy {entropy_bits:.2f} bits in total")


@given(st.lists(st.integers(0, 1000), min_size=2, max_size=60))
def test_code_lengths_form_a_complete_prefix_code(frequencies):
    lengths = huffman.code_lengths(np.array(frequencies))
    used = lengths[lengths > 0].astype(int)
    assert np.all((lengths > 0) == (np.array(frequencies) > 0))
    if used.size >= 2:  # Huffman trees are full: Kraft's sum is exactly 1
        assert sum(2.0**-length for length in used) == 1.0


def test_truncated_stream_is_a_clear_error():
    data = huffman.to_bytes(np.random.default_rng(0).integers(0, 9, 500))
    for cut in (3, 20, data.size - 1):
        with pytest.raises(ValueError, match="truncated Huffman stream"):
            huffman.from_bytes(data[:cut])
    lengths = huffman.code_lengths(np.array([5, 3, 1]))
    payload, _ = huffman.encode(np.array([0, 1, 2, 2, 1]), lengths)
    with pytest.raises(ValueError, match="truncated Huffman stream"):
        huffman.decode(payload, lengths, 17)  # more symbols than the payload's 16 bits hold
    with pytest.raises(ValueError, match="truncated Huffman stream"):
        huffman.decode(payload, lengths, 6, bits=9)  # would read the padding as symbols without the bit count
    with pytest.raises(ValueError, match="took 5 of its 9 bits"):
        huffman.decode(payload, lengths, 3, bits=9)
    data = huffman.to_bytes(np.array([0, 1, 2, 2, 1]))
    data[0] += 1  # the header's symbol count, one too many
    with pytest.raises(ValueError, match="truncated Huffman stream"):
        huffman.from_bytes(data)


def test_corrupt_streams_are_clear_errors():
    lengths = huffman.code_lengths(np.array([4]))  # a single symbol: code "0" only
    with pytest.raises(ValueError, match="no code"):
        huffman.decode(np.array([0b10000000], np.uint8), lengths, 1)
    with pytest.raises(ValueError, match="Kraft"):
        huffman.decode(np.zeros(1, np.uint8), np.array([1, 1, 1]), 1)
    with pytest.raises(ValueError, match="padding|payload has"):
        huffman.decode(np.array([0, 0], np.uint8), lengths, 3)  # a whole spare byte
    with pytest.raises(ValueError, match="outside the alphabet"):
        huffman.encode(np.array([3]), np.array([1, 1]))
    with pytest.raises(ValueError, match="has no code"):
        huffman.encode(np.array([1]), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        huffman.to_bytes(np.array([-1, 2]))
