"""minicnn.simd's vector operations (and minicnn.quads'), each against the NumPy expression its docstring gives."""

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minicnn import simd
from minicnn.quads import quad_first, store_quarter, swap_pairs, transpose4
from minicnn.simd import (LANES, absolute, add, add_where, aligned_empty, broadcast, fma, load, load_first, maximum,
                          mul, permute2, splat, store, store_first, total, transpose16)

floats = st.floats(-1e6, 1e6, width=32)


@numba.njit
def _copy(src, i, dst, j):
    store(dst, j, load(src, i))


@numba.njit
def _arithmetic(a, b, c, out):
    store(out, 0, fma(load(a, 0), load(b, 0), load(c, 0)))
    store(out, LANES, add(load(a, 0), load(b, 0)))
    store(out, 2 * LANES, splat(a[0]))
    store(out, 3 * LANES, mul(load(a, 0), load(b, 0)))
    store(out, 4 * LANES, absolute(load(a, 0)))
    out[5 * LANES] = total(load(c, 0))


@numba.njit
def _add_where(a, m, i, b, out):
    store(out, 0, add_where(load(a, 0), m, i, load(b, 0)))


@numba.njit
def _masked(src, i, n, dst, j, m):
    store_first(dst, j, load_first(src, i, n), m)


@numba.njit
def _broadcast_max(a, b, i, out):
    store(out, 0, maximum(load(a, 0), broadcast(b, i)))


@numba.njit
def _transpose(src, i, ss, dst, j, ds):
    transpose16(src, i, ss, dst, j, ds)


@numba.njit
def _permute(lo, k, j, hi, out):
    store(out, 0, permute2(load(lo, 0), k, j, load(hi, 0)))


@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 2**32 - 1))
def test_load_store_move_16_lanes_at_any_offset(i, j, seed):
    src = np.random.default_rng(seed).standard_normal(i + LANES + 3).astype(np.float32)
    dst = np.full(j + LANES + 3, -7.0, np.float32)
    _copy(src, i, dst, j)
    expected = np.full_like(dst, -7.0)
    expected[j : j + LANES] = src[i : i + LANES]
    np.testing.assert_array_equal(dst, expected)


@given(st.lists(floats, min_size=2 * LANES, max_size=2 * LANES), st.integers(0, 2**16 - 1), st.integers(0, 2))
def test_add_where_adds_in_the_lanes_of_the_mask_bits(values, m, i):
    a, b = np.array(values, np.float32).reshape(2, LANES)
    out = np.empty(LANES, np.float32)
    bits = np.full(3, 0xA5A5, np.uint16)
    bits[i] = m  # the mask is read at its index, not next to it
    _add_where(a, bits, i, b, out)
    np.testing.assert_array_equal(out, np.where([(m >> lane) & 1 for lane in range(LANES)], a + b, a))


@given(st.lists(floats, min_size=3 * LANES, max_size=3 * LANES))
def test_fma_add_splat_mul_absolute_total(values):
    a, b, c = np.array(values, np.float32).reshape(3, LANES)
    out = np.empty(5 * LANES + 1, np.float32)
    _arithmetic(a, b, c, out)
    # fma is fused (one rounding) where the CPU has FMA, else a float32 multiply then add. The
    # float64 route to the fused result (a*b exact, then the sum) rounds twice, which can land
    # one unit in the last place away.
    fused = (a.astype(np.float64) * b + c).astype(np.float32)
    near_fused = np.abs(out[:LANES] - fused) <= np.spacing(np.abs(fused))
    assert (near_fused | (out[:LANES] == a * b + c)).all(), (out[:LANES], fused, a * b + c)
    np.testing.assert_array_equal(out[LANES : 2 * LANES], a + b)
    np.testing.assert_array_equal(out[2 * LANES : 3 * LANES], np.full(LANES, a[0]))
    np.testing.assert_array_equal(out[3 * LANES : 4 * LANES], a * b)
    np.testing.assert_array_equal(out[4 * LANES : 5 * LANES], np.abs(a))
    exact = c.astype(np.float64).sum()  # the lanes' adds in any order: within 16 roundings of the sum
    assert abs(out[5 * LANES] - exact) <= 16 * np.spacing(np.float32(np.abs(c).sum())), (out[5 * LANES], exact)


@numba.njit
def _quads(src, i, n, out):
    a = quad_first(src, i, n)
    store(out, 0, a)
    store(out, LANES, swap_pairs(a))
    store(out, 2 * LANES, transpose4(load(out, 3 * LANES)))


@numba.njit
def _swapped(a, out):
    store(out, 0, swap_pairs(load(a, 0)))


@numba.njit
def _quarter(a, q, n, dst, j):
    store_quarter(dst, j, load(a, 0), q, n)


@given(st.integers(0, 4), st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_quad_first_swap_pairs_and_transpose4(n, i, seed):
    """4 x 4 lanes, lane 4a + b: row a, column b. The source ends at its last lane read: a read past it
    would fault or show."""
    src = np.random.default_rng(seed).standard_normal(i + n).astype(np.float32)
    out = np.zeros(4 * LANES, np.float32)
    out[3 * LANES :] = np.arange(LANES)
    _quads(src, i, n, out)
    row = np.zeros(4, np.float32)
    row[:n] = src[i : i + n]
    np.testing.assert_array_equal(out[:LANES], np.tile(row, 4))
    np.testing.assert_array_equal(out[LANES : 2 * LANES], np.tile(row[[1, 0, 3, 2]], 4))
    lanes = np.arange(LANES)
    np.testing.assert_array_equal(out[2 * LANES : 3 * LANES], lanes.reshape(4, 4).T.reshape(-1))
    _swapped(lanes.astype(np.float32), out)
    np.testing.assert_array_equal(out[:LANES], lanes ^ 1)


@given(st.integers(0, 3), st.integers(0, 4), st.integers(0, 5))
def test_store_quarter_writes_its_lanes_alone(q, n, j):
    a = np.arange(1, LANES + 1, dtype=np.float32)
    dst = np.full(j + n, -7.0, np.float32)
    _quarter(a, q, n, dst, j)
    expected = np.full_like(dst, -7.0)
    expected[j:] = a[4 * q : 4 * q + n]
    np.testing.assert_array_equal(dst, expected)


@given(st.integers(0, LANES), st.integers(0, LANES), st.integers(0, 5), st.integers(0, 5))
def test_masked_load_and_store_touch_only_their_lanes(n, m, i, j):
    """Arrays that end where the lanes end: a masked load or store past them would fault or show."""
    src = np.arange(1, i + n + 1, dtype=np.float32)
    dst = np.full(j + m, -7.0, np.float32)
    _masked(src, i, n, dst, j, m)
    lanes = np.zeros(LANES, np.float32)
    lanes[:n] = src[i : i + n]
    expected = np.full_like(dst, -7.0)
    expected[j:] = lanes[:m]
    np.testing.assert_array_equal(dst, expected)


@given(st.lists(floats | st.just(float("nan")), min_size=LANES, max_size=LANES),
       st.lists(floats | st.just(float("nan")), min_size=3, max_size=3), st.integers(0, 2))
def test_broadcast_and_maximum(a, b, i):
    """maximum is numpy.maximum, NaNs included (a fused ReLU keeps a NaN as forward's does)."""
    a, b = np.array(a, np.float32), np.array(b, np.float32)
    out = np.empty(LANES, np.float32)
    _broadcast_max(a, b, i, out)
    np.testing.assert_array_equal(out, np.maximum(a, b[i]))


@pytest.mark.skipif(not (simd.HAS_PERMUTE or numba.config.DISABLE_JIT),
                    reason="permute2 is AVX-512's vpermi2ps; this CPU has no AVX-512")
@given(st.lists(st.integers(0, 31), min_size=LANES, max_size=LANES), st.integers(0, 5), st.integers(0, 2**32 - 1))
def test_permute2_looks_up_32_floats(table, j, seed):
    rng = np.random.default_rng(seed)
    lo, hi = rng.standard_normal((2, LANES)).astype(np.float32)
    k = rng.integers(0, 32, j + LANES).astype(np.uint8)
    k[j:] = table
    out = np.empty(LANES, np.float32)
    _permute(lo, k, j, hi, out)
    np.testing.assert_array_equal(out, np.concatenate([lo, hi])[k[j : j + LANES]])


@given(st.integers(0, 20), st.integers(16, 40), st.integers(0, 20), st.integers(16, 40))
def test_transpose16_moves_a_block_across_its_diagonal(i, ss, j, ds):
    src = np.arange(i + 16 * ss, dtype=np.float32)
    dst = np.full(j + 16 * ds, -1.0, np.float32)
    _transpose(src, i, ss, dst, j, ds)
    block = src[i : i + 16 * ss].reshape(16, ss)[:, :16]
    expected = np.full_like(dst, -1.0)
    expected[j : j + 16 * ds].reshape(16, ds)[:, :16] = block.T
    np.testing.assert_array_equal(dst, expected)


@given(st.integers(1, 100))  # (a zero-size view may keep no address)
def test_aligned_empty_starts_on_a_cache_line(n):
    a = aligned_empty(n)
    assert a.shape == (n,) and a.dtype == np.float32 and a.ctypes.data % 64 == 0


@numba.njit
def _permute_first(lo, k):
    return permute2(load(lo, 0), k, 0, load(lo, 0))


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="types are checked when Numba compiles")
@pytest.mark.parametrize("call", [
    lambda: _copy(np.zeros(LANES), 0, np.zeros(LANES, np.float32), 0),  # float64 source
    lambda: _copy(np.zeros(2 * LANES, np.float32)[::2], 0, np.zeros(LANES, np.float32), 0),  # strided source
    lambda: _copy(np.zeros(LANES, np.float32), 0, _read_only(LANES), 0),  # read-only destination
    lambda: _transpose(np.zeros(LANES * LANES, np.float32), 0, LANES, _read_only(LANES * LANES), 0, LANES),
    lambda: _permute_first(np.zeros(LANES, np.float32), np.zeros(LANES, np.int32)),  # int32 lane numbers
])
def test_operations_reject_what_they_would_mishandle(call):
    with pytest.raises(numba.TypingError):
        call()


def _read_only(n):
    a = np.zeros(n, np.float32)
    a.flags.writeable = False
    return a
