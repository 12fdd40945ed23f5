"""Every layer's backward against numerical gradients (float64), and its input checks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from gradcheck import check_layer_gradients
from strategies import conv_geometry, pool_geometry, random_array


@settings(max_examples=15)
@given(conv_geometry(max_batch=2, max_channels=3, max_size=6), st.integers(0, 1000))
def test_conv2d_gradients(geom, seed):
    N, C, H, W, F, k, s, p = geom
    layer = Conv2D(C, F, k, stride=s, padding=p, rng=seed)
    check_layer_gradients(layer, random_array(seed, (N, C, H, W)), seed)


@settings(max_examples=15)
@given(pool_geometry(), st.integers(0, 1000))
def test_maxpool_gradients(geom, seed):
    N, C, H, W, k, s = geom
    # Random normals have no ties, so the max is differentiable at x.
    check_layer_gradients(MaxPool2D(k, s), random_array(seed, (N, C, H, W)), seed)


@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6), st.integers(0, 1000))
def test_dense_gradients(n, fin, fout, seed):
    check_layer_gradients(Dense(fin, fout, rng=seed), random_array(seed, (n, fin)), seed)


def test_relu_gradients():
    x = random_array(0, (3, 2, 4, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep clear of the kink at 0
    check_layer_gradients(ReLU(), x)


def test_flatten_gradients_and_order():
    x = random_array(1, (2, 3, 2, 2))
    check_layer_gradients(Flatten(), x)
    np.testing.assert_array_equal(Flatten().forward(x)[1], x[1].ravel())  # C, H, W order


def test_parameter_conventions():
    conv, dense = Conv2D(3, 8, 5, rng=0), Dense(20, 7, rng=0)
    assert conv.params["W"].shape == (8, 3, 5, 5) and conv.params["b"].shape == (8,)
    assert dense.params["W"].shape == (20, 7) and dense.params["b"].shape == (7,)
    for layer in (conv, dense):
        assert layer.params.keys() == layer.grads.keys()
        assert all(p.dtype == np.float32 for p in layer.params.values())
    x = random_array(0, (4, 20), np.float32)
    np.testing.assert_allclose(dense.forward(x), x @ dense.params["W"] + dense.params["b"], rtol=1e-6)


def test_same_padding_keeps_size():
    out = Conv2D(2, 4, 3, padding=1, rng=0).forward(random_array(0, (1, 2, 7, 7), np.float32))
    assert out.shape == (1, 4, 7, 7)


@pytest.mark.parametrize("layer,x,message", [
    (Conv2D(3, 4, 3), np.zeros((2, 3, 8), np.float32), "rank 4"),
    (Conv2D(3, 4, 3), np.zeros((2, 1, 8, 8), np.float32), "3 input channels"),
    (Conv2D(1, 4, 5), np.zeros((2, 1, 3, 3), np.float32), "larger than the padded input"),
    (Conv2D(1, 4, 3), np.zeros((2, 1, 8, 8), np.int64), "floating"),
    (Dense(10, 2), np.zeros((2, 9), np.float32), "10 input"),
    (Dense(10, 2), np.zeros((10,), np.float32), "rank 2"),
    (MaxPool2D(3), np.zeros((1, 1, 2, 2), np.float32), "larger than the input"),
    (ReLU(), [1.0, 2.0], "numpy array"),
])
def test_bad_input_is_named(layer, x, message):
    with pytest.raises((ValueError, TypeError), match=message):
        layer.forward(x)


@pytest.mark.parametrize("make", [
    lambda: Conv2D(0, 4, 3), lambda: Conv2D(1, 4, 3, stride=0), lambda: Conv2D(1, 4, 3, padding=-1),
    lambda: Dense(3, 0), lambda: MaxPool2D(0), lambda: Conv2D(1.5, 4, 3),
])
def test_bad_configuration(make):
    with pytest.raises(ValueError, match="must be an integer"):
        make()


@pytest.mark.parametrize("make,shape", [(lambda: Conv2D(2, 3, 3, padding=1, rng=0), (2, 2, 5, 5)),
                                        (lambda: Dense(6, 4, rng=0), (3, 6))])
def test_first_layer_skips_the_input_gradient_and_keeps_its_own(make, shape):
    x = random_array(0, shape, np.float32)
    full, skip = make(), make()
    skip.needs_input_grad = False
    g = random_array(1, full.forward(x).shape, np.float32)
    skip.forward(x)
    assert full.backward(g) is not None and skip.backward(g) is None
    for name in full.grads:
        np.testing.assert_array_equal(skip.grads[name], full.grads[name], err_msg=name)
