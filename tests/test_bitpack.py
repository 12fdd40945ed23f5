import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from optim.bitpack import pack_bits, packed_size, unpack_bits


@given(st.integers(1, 32).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, 2**b - 1), max_size=300))))
def test_round_trip_any_width_and_length(case):
    bits, values = case
    values = np.array(values, dtype=np.uint64)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(len(values), bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, len(values)), values)


def test_layout_is_msb_first():
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 3]), 2), [0b01101100])
    np.testing.assert_array_equal(pack_bits(np.array([5]), 3), [0b10100000])


@pytest.mark.parametrize("values,bits,message", [
    (np.array([4]), 2, r"\[0, 2\*\*2\)"), (np.array([-1]), 3, "lie in"), (np.array([1]), 0, "1..32"),
    (np.array([1.0]), 3, "integer"), (np.zeros((2, 2), int), 3, "1-D"),
])
def test_bad_values(values, bits, message):
    with pytest.raises(ValueError, match=message):
        pack_bits(values, bits)


def test_truncated_stream():
    packed = pack_bits(np.arange(10), 4)
    with pytest.raises(ValueError, match="has 4 bytes; 10 values of 4 bits need 5"):
        unpack_bits(packed[:-1], 4, 10)
