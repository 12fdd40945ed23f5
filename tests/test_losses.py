"""Softmax and cross-entropy: invariants, stability and the gradient."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from minicnn.losses import cross_entropy, log_softmax, softmax
from gradcheck import numerical_gradient, relative_error

logits = arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(2, 6)),
                elements=st.floats(-1e4, 1e4, allow_nan=False))
temperatures = st.floats(0.05, 50)


@given(logits, temperatures)
def test_softmax_rows_sum_to_one_and_stay_finite(z, t):
    p = softmax(z, t)
    assert np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-12)
    assert np.isfinite(log_softmax(z, t)).all()


@given(logits, st.floats(-1e3, 1e3), temperatures)
def test_softmax_is_shift_invariant(z, c, t):
    np.testing.assert_allclose(softmax(z + c, t), softmax(z, t), rtol=1e-9, atol=1e-12)


def test_huge_logits_do_not_overflow():
    z = np.array([[1e300, 0.0, -1e300]])
    np.testing.assert_array_equal(softmax(z), [[1.0, 0.0, 0.0]])


def test_cross_entropy_hand_computed():
    z = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    loss, dz = cross_entropy(z, np.array([0, 2]))
    assert loss == pytest.approx(-(np.log(0.5) + np.log(0.7)) / 2)
    np.testing.assert_allclose(dz, np.array([[-0.5, 0.25, 0.25], [0.1, 0.2, -0.3]]) / 2)


@given(st.integers(1, 5), st.integers(2, 6), st.integers(0, 10**6))
def test_cross_entropy_gradient_is_numerical(n, k, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k))  # saturated softmax would leave the finite difference only rounding noise
    y = rng.integers(0, k, n)
    _, dz = cross_entropy(z, y)
    num = numerical_gradient(lambda: np.array(cross_entropy(z, y)[0]), z, np.array(1.0))
    assert relative_error(dz, num) < 1e-6


@pytest.mark.parametrize("z,y,message", [
    (np.zeros((2, 3)), np.array([0, 3]), r"\[0, 3\)"),
    (np.zeros((2, 3)), np.array([0]), "1 labels for 2 samples"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), "integer"),
    (np.array([[0.0, np.nan]]), np.array([0]), "non-finite"),
    (np.zeros(3), np.array([0]), "rank 2"),
])
def test_bad_input(z, y, message):
    with pytest.raises((ValueError, TypeError), match=message):
        cross_entropy(z, y)


@pytest.mark.parametrize("t", [0, -1, np.inf, np.nan])
def test_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        softmax(np.zeros((1, 2)), t)
