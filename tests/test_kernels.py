"""Fast kernels agree with their NumPy references on any valid geometry."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minicnn import kernels as K
from minicnn import parallel, relu
from strategies import conv_geometry, pool_geometry, random_array

seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module", params=["threaded", "serial"])
def build(request):
    """Run every test against both builds of the Numba loops."""
    with parallel.forced(request.param):
        yield request.param


@given(conv_geometry(), seeds, st.sampled_from([np.float32, np.float64]))
def test_conv_forward_matches_reference(geom, seed, dtype):
    N, C, H, W, F, k, s, p = geom
    x = random_array(seed, (N, C, H, W), dtype)
    w = random_array(seed + 1, (F, C, k, k), dtype)
    b = random_array(seed + 2, (F,), dtype)
    out, _ = K.conv2d_forward(x, w, b, s, p)
    ref = K.conv2d_forward_ref(x, w, b, s, p)
    assert out.shape == ref.shape == (N, F, K.conv_output_size(H, k, s, p), K.conv_output_size(W, k, s, p))
    assert out.dtype == dtype
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


@given(conv_geometry(), seeds)
def test_conv_backward_matches_reference(geom, seed):
    N, C, H, W, F, k, s, p = geom
    x = random_array(seed, (N, C, H, W))
    w = random_array(seed + 1, (F, C, k, k))
    b = random_array(seed + 2, (F,))
    out, rows = K.conv2d_forward(x, w, b, s, p)
    dout = random_array(seed + 3, out.shape)
    for fast, ref in zip(K.conv2d_backward(dout, rows, x.shape, w, s, p), K.conv2d_backward_ref(dout, x, w, s, p)):
        assert fast.shape == ref.shape
        np.testing.assert_allclose(fast, ref, rtol=1e-10, atol=1e-10)
    dx, dW, db = K.conv2d_backward(dout, rows, x.shape, w, s, p, input_grad=False)
    assert dx is None
    np.testing.assert_allclose(dW, K.conv2d_backward_ref(dout, x, w, s, p)[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("C,H,k", [(1, 9, 3), (4, 5, 4)], ids=["few columns: per-image dW", "many columns: one GEMM"])
def test_conv_backward_both_dW_paths(C, H, k):
    x, w = random_array(0, (3, C, H, H)), random_array(1, (2, C, k, k))
    out, rows = K.conv2d_forward(x, w, np.zeros(2), 1, 0)
    dout = random_array(2, out.shape)
    for fast, ref in zip(K.conv2d_backward(dout, rows, x.shape, w, 1, 0), K.conv2d_backward_ref(dout, x, w, 1, 0)):
        np.testing.assert_allclose(fast, ref, rtol=1e-10, atol=1e-10)


@given(conv_geometry(), seeds)
def test_im2row_and_row2im_match_reference_and_are_adjoint(geom, seed):
    N, C, H, W, F, k, s, p = geom
    xp = K.pad(random_array(seed, (N, C, H, W)), p)
    rows = K.im2row(xp, k, k, s)
    np.testing.assert_array_equal(rows, K.im2row_ref(xp, k, k, s))
    r = random_array(seed + 1, rows.shape)
    back = K.row2im(r, xp.shape, k, k, s)
    np.testing.assert_allclose(back, K.row2im_ref(r, xp.shape, k, k, s), rtol=1e-12, atol=1e-12)
    # <im2row(x), r> == <x, row2im(r)>: the scatter is the exact adjoint of the gather.
    assert np.isclose((rows * r).sum(), (xp * back).sum())


def check_hwc_rows(x, k, s, p, seed):
    """conv_rows are im2row's rows with their columns reordered from (c, kh, kw) to (kh, kw, c),
    and row2im_hwc (fast and reference) is their exact adjoint."""
    N, C, H, W = x.shape
    rows = K.conv_rows(x, k, k, s, p)
    by_c = K.im2row_ref(K.pad(x, p), k, k, s)
    M = by_c.shape[0]
    np.testing.assert_array_equal(rows, by_c.reshape(M, C, k, k).transpose(0, 2, 3, 1).reshape(M, -1))
    xp = K.pad_nhwc(x, p)
    np.testing.assert_array_equal(xp, K.pad(x, p).transpose(0, 2, 3, 1))
    r = random_array(seed + 1, rows.shape)
    back = K.row2im_hwc(r, xp.shape, k, k, s)
    np.testing.assert_allclose(back, K.row2im_hwc_ref(r, xp.shape, k, k, s), rtol=1e-12, atol=1e-12)
    assert np.isclose((rows * r).sum(), (xp * back).sum())  # <gather(x), r> == <x, scatter(r)>


@given(conv_geometry(), seeds)
def test_hwc_rows_reorder_im2row_and_row2im_hwc_is_their_adjoint(geom, seed):
    N, C, H, W, F, k, s, p = geom
    check_hwc_rows(random_array(seed, (N, C, H, W)), k, s, p, seed)


@pytest.mark.parametrize("C,H,k", [(1, 12, 3), (3, 12, 3)], ids=["one channel: column-order copy", "runs of KW*C"])
def test_hwc_rows_both_copy_orders(C, H, k):
    x = random_array(0, (2, C, H, H))
    assert K.conv_rows(x, k, k, 1, 0).flags.c_contiguous == (C > 1)
    check_hwc_rows(x, k, 1, 0, 0)


@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), seeds,
       st.sampled_from([np.float32, np.float64]))
def test_rows_to_nchw_matches_reference(N, F, Ho, Wo, seed, dtype):
    out_rows = random_array(seed, (N * Ho * Wo, F), dtype)
    b = random_array(seed + 1, (F,), dtype)
    out = K.rows_to_nchw(out_rows, b, N, Ho, Wo)
    assert out.dtype == dtype and out.flags.c_contiguous
    np.testing.assert_array_equal(out, K.rows_to_nchw_ref(out_rows, b, N, Ho, Wo))
    # the value at image n, filter f, pixel (i, j) is its GEMM row's entry f plus b[f]
    n, f, i, j = N - 1, F - 1, Ho - 1, 0
    assert out[n, f, i, j] == out_rows[(n * Ho + i) * Wo + j, f] + b[f]


@given(pool_geometry(), seeds, st.sampled_from([np.float32, np.float64]))
def test_maxpool_matches_reference(geom, seed, dtype):
    N, C, H, W, k, s = geom
    x = random_array(seed, (N, C, H, W), dtype)
    out, arg = K.maxpool_forward(x, k, s)
    ref_out, ref_arg = K.maxpool_forward_ref(x, k, s)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(arg, ref_arg)
    dout = random_array(seed + 1, out.shape, dtype)
    np.testing.assert_allclose(K.maxpool_backward(dout, arg, x.shape), K.maxpool_backward_ref(dout, ref_arg, x.shape), rtol=1e-6)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 7), st.integers(2, 7), seeds)
def test_maxpool_2x2_path_matches_reference_with_ties(N, C, H, W, seed):
    x = np.random.default_rng(seed).integers(0, 3, (N, C, H, W)).astype(np.float32)  # ties everywhere
    out, arg = K.maxpool_forward(x, 2, 2)
    ref_out, ref_arg = K.maxpool_forward_ref(x, 2, 2)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(arg, ref_arg, err_msg="argmax: ours vs reference (first maximum wins)")


@given(st.lists(st.integers(1, 5), min_size=1, max_size=4), seeds, st.sampled_from([np.float32, np.float64]))
def test_relu_matches_reference_bit_for_bit(shape, seed, dtype):
    rng = np.random.default_rng(seed)
    x = random_array(seed, shape, dtype)
    special = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf], dtype)
    x.reshape(-1)[: min(x.size, 5)] = rng.permutation(special)[: min(x.size, 5)]
    out, mask = relu.relu_forward(x)
    ref_out, ref_mask = relu.relu_forward_ref(x)
    assert out.dtype == dtype and mask.dtype == np.bool_
    np.testing.assert_array_equal(out.view(np.uint8), ref_out.view(np.uint8))  # -0.0 and NaNs included
    np.testing.assert_array_equal(mask, ref_mask)
    dout = random_array(seed + 1, shape, dtype)
    np.testing.assert_array_equal(relu.relu_backward(dout, mask), relu.relu_backward_ref(dout, mask))
    if x.ndim > 1:  # a transposed (not C-contiguous) input
        np.testing.assert_array_equal(relu.relu_forward(x.T)[0], relu.relu_forward_ref(x.T)[0])


def test_maxpool_ties_go_to_the_first_maximum():
    x = np.zeros((1, 1, 2, 2), np.float32)
    out, arg = K.maxpool_forward(x, 2, 2)
    assert out.item() == 0 and arg.item() == 0
    dx = K.maxpool_backward(np.ones((1, 1, 1, 1), np.float32), arg, x.shape)
    np.testing.assert_array_equal(dx.ravel(), [1, 0, 0, 0])


def test_conv_hand_computed():
    # 3x3 input of 1..9, 2x2 kernel of ones: each output sums a 2x2 window.
    x = np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)
    w = np.ones((1, 1, 2, 2), np.float32)
    out, _ = K.conv2d_forward(x, w, np.array([0.5], np.float32), 1, 0)
    np.testing.assert_array_equal(out[0, 0], [[12.5, 16.5], [24.5, 28.5]])
    out, _ = K.conv2d_forward(x, w, np.zeros(1, np.float32), 2, 1)  # padded corners
    np.testing.assert_array_equal(out[0, 0], [[1, 5], [11, 28]])


@pytest.mark.parametrize("size,k,s,p,expected", [(28, 5, 1, 0, 24), (28, 3, 1, 1, 28), (7, 3, 2, 1, 4), (5, 5, 1, 0, 1)])
def test_conv_output_size(size, k, s, p, expected):
    assert K.conv_output_size(size, k, s, p) == expected
