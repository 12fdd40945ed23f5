"""Hypothesis strategies shared by the tests: valid conv geometries by construction."""

import numpy as np
from hypothesis import strategies as st


@st.composite
def conv_geometry(draw, max_batch=3, max_channels=4, max_size=9):
    """(N, C, H, W, F, K, stride, padding) with at least one output position."""
    k = draw(st.integers(1, 4))
    padding = draw(st.integers(0, 2))
    stride = draw(st.integers(1, 3))
    low = max(1, k - 2 * padding)
    return (
        draw(st.integers(1, max_batch)),
        draw(st.integers(1, max_channels)),
        draw(st.integers(low, max_size)),
        draw(st.integers(low, max_size)),
        draw(st.integers(1, max_channels)),
        k, stride, padding,
    )


@st.composite
def pool_geometry(draw):
    """(N, C, H, W, k, stride) with H, W >= k."""
    k = draw(st.integers(1, 3))
    return (
        draw(st.integers(1, 3)), draw(st.integers(1, 3)),
        draw(st.integers(k, 9)), draw(st.integers(k, 9)),
        k, draw(st.integers(1, 3)),
    )


def random_array(seed, shape, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)
