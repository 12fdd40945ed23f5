"""The fused inference kernels against their references: minicnn.direct and minicnn.narrow.

Float sums in another order: they agree to float32 rounding, in float64 references
scaled by the size of the sum. Both builds of each kernel (threaded and serial)
run every example.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minicnn import direct, kernels, narrow, parallel
from portable import run_without_avx512
from strategies import random_array


def close(got, expected, terms):
    """float32 sums of `terms` products of standard normals, against float64: an absolute bound per
    term, and a few units in the last place of the result (a 1x1 conv's one product and bias, near
    8.6, came out 1.2e-6 from float64)."""
    np.testing.assert_allclose(got, expected, rtol=2.4e-7, atol=1e-6 * terms)


@st.composite
def block_geometry(draw):
    """(N, C, H, W, F, K, stride, padding, relu, pool), with a 2x2 pool only where the conv output has one."""
    N, C, F = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 70))
    K, S, P = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
    low = max(1, K - 2 * P)
    H, W = draw(st.integers(low, 14)), draw(st.integers(low, 14))
    pooled = min(kernels.conv_output_size(H, K, S, P), kernels.conv_output_size(W, K, S, P)) >= 2
    return N, C, H, W, F, K, S, P, draw(st.booleans()), pooled and draw(st.booleans())


@given(block_geometry(), st.integers(0, 2**32 - 1))
@example((2, 3, 11, 9, 50, 3, 2, 1, True, True), 1)  # stride 2, padding, pool, 50 filters: 32 + 18 lanes
@example((1, 1, 28, 28, 20, 5, 1, 0, False, True), 2)  # LeNet-5's conv1
@example((2, 4, 13, 13, 17, 3, 1, 1, True, False), 3)  # 17 filters: one lane past a vector
@example((3, 2, 9, 10, 64, 2, 1, 0, False, False), 4)  # two full blocks; rows end mid-tile
@example((1, 5, 12, 12, 16, 5, 1, 2, True, True), 5)  # 16 filters: the second vector skipped
@example((2, 1, 13, 11, 37, 3, 2, 1, True, True), 6)  # one channel at stride 2: not quads
@example((1, 1, 9, 14, 6, 2, 1, 0, False, True), 7)  # quads: 13 columns, 6 pooled (the last column unused)
@example((1, 1, 9, 12, 6, 2, 1, 0, True, True), 9)  # quads: 11 columns, the last quad 3 wide
@example((2, 1, 8, 11, 21, 2, 1, 0, True, True), 10)  # quads: 10 columns, the last quad 2 wide; 6 groups
@example((2, 1, 10, 12, 37, 3, 1, 1, False, True), 8)  # quads: 8 groups of 4 filters, then 2 (one 1 wide)
def test_conv_block_matches_conv_relu_pool(geometry, seed):
    N, C, H, W, F, K, S, P, relu, pool = geometry
    x, Wt, b = random_array(seed, (N, C, H, W)), random_array(seed + 1, (F, C, K, K)), random_array(seed + 2, F)
    expected = direct.conv_block_ref(x, Wt, b, S, P, relu, pool).transpose(0, 2, 3, 1)
    xp, w = kernels.pad_nhwc(x.astype(np.float32), P), direct.pack_filters(Wt.astype(np.float32), S, pool)
    for mode in ("serial", "threaded"):
        with parallel.forced(mode):
            got = direct.conv_block(xp, w, b.astype(np.float32), F, K, S, relu, pool)
        close(got, expected, C * K * K)


def test_convs_without_avx512_agree():
    """The portable build of both tiles (quads, and the other convs'), against the reference: one and
    three channels, stride 1 and 2, with and without pool, 8, 20 and 37 filters."""
    run_without_avx512(
        "import numpy as np\n"
        "from minicnn import direct, kernels\n"
        "rng = np.random.default_rng(0)\n"
        "for C, F, S, pool in ((1, 20, 1, True), (1, 37, 2, True), (1, 8, 1, True), (1, 8, 1, False),\n"
        "                      (3, 37, 1, True)):\n"
        "    x, W = rng.standard_normal((2, C, 14, 11)).astype(np.float32), rng.standard_normal((F, C, 3, 3))\n"
        "    b = rng.standard_normal(F).astype(np.float32)\n"
        "    w = direct.pack_filters(W.astype(np.float32), S, pool)\n"
        "    got = direct.conv_block(kernels.pad_nhwc(x, 1), w, b, F, 3, S, True, pool)\n"
        "    expected = direct.conv_block_ref(x, W, b, S, 1, True, pool).transpose(0, 2, 3, 1)\n"
        "    assert np.abs(got - expected).max() < 1e-5, (C, F, S, pool)\n"
        "print('ok')\n"
    )


@given(st.integers(1, 20), st.integers(1, 40), st.integers(1, 300), st.booleans(), st.integers(0, 2**32 - 1))
@example(7, 30, 300, True, 1)  # fewer rows than a tile: 128-output spans, the last one 44 wide
@example(17, 9, 129, False, 2)  # two tiles of 8 rows and one row alone; one output past a span
@example(9, 1, 40, True, 3)  # one input feature: a 1x1 conv of one channel, 8 rows as a tile and one alone
def test_dense_block_is_a_dense_layer(N, n_in, n_out, relu, seed):
    x, W, b = random_array(seed, (N, n_in)), random_array(seed + 1, (n_in, n_out)), random_array(seed + 2, n_out)
    expected = direct.dense_block_ref(x, W, b, relu)
    for mode in ("serial", "threaded"):
        with parallel.forced(mode):
            got = direct.dense_block(*(a.astype(np.float32) for a in (x, W, b)), relu)
        close(got, expected, n_in)


@given(st.integers(1, 70), st.integers(1, 4), st.integers(1, 5), st.integers(1, 2), st.booleans())
def test_pack_filters_lays_out_blocks_of_32_on_a_cache_line(F, C, K, S, pool):
    W = np.arange(F * C * K * K, dtype=np.float32).reshape(F, C, K, K) + 1
    w = direct.pack_filters(W, S, pool)
    assert w.ctypes.data % 64 == 0
    quads = C == 1 and S == 1 and pool and F % 16 != 0
    assert direct.in_quads(C, F, S, pool) == quads
    repeat = direct.QUAD if quads else 1  # each weight once per pixel of a quad
    blocks = w.reshape(-1, K, K, C, direct.BLOCK, repeat)  # (B, KH, KW, C, 32, repeat)
    assert w.size == -(-F // direct.BLOCK) * direct.filter_strides(C, F, K, S, pool)[0]
    np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[..., :1], blocks.shape))
    taps = blocks[..., 0].transpose(0, 4, 3, 1, 2).reshape(-1, C, K, K)  # (B * 32, C, KH, KW)
    np.testing.assert_array_equal(taps[:F], W)
    np.testing.assert_array_equal(taps[F:], 0)


def test_conv_block_writes_into_out_and_refuses_an_out_it_cannot_write_through():
    x = np.ones((2, 6, 6, 3), np.float32)
    w, b = direct.pack_filters(np.ones((5, 3, 3, 3), np.float32), 1, True), np.zeros(5, np.float32)
    out = np.full((2, 2, 2, 6), -1.0, np.float32)
    with pytest.raises(ValueError, match="not contiguous"):
        direct.conv_block(x, w, b, 5, 3, 1, False, True, out[..., :5])  # the kernel would write a copy
    with pytest.raises(ValueError, match=r"shape \(2, 2, 2, 5\)"):
        direct.conv_block(x, w, b, 5, 3, 1, False, True, out)
    head = out.reshape(-1)[:40].reshape(2, 2, 2, 5)
    assert direct.conv_block(x, w, b, 5, 3, 1, False, True, head) is head
    np.testing.assert_array_equal(out.reshape(-1)[:40], 27.0)
    np.testing.assert_array_equal(out.reshape(-1)[40:], -1.0)


@given(st.integers(1, 20), st.integers(1, 60), st.integers(1, narrow.MAX_OUTPUTS), st.booleans(),
       st.integers(0, 2**32 - 1))
def test_narrow_dense_matches_its_reference(N, K, O, relu, seed):
    x, W, b = random_array(seed, (N, K)), random_array(seed + 1, (K, O)), random_array(seed + 2, O)
    order = np.random.default_rng(seed).permutation(K)
    expected = narrow.narrow_dense_ref(x, order, W, b, relu)
    for mode in ("serial", "threaded"):
        with parallel.forced(mode):
            got = narrow.narrow_dense(*(a.astype(np.float32) for a in (x,)), order, W.astype(np.float32),
                                      b.astype(np.float32), relu)
        close(got, expected, K)


@given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_flatten_order_reads_channels_last_as_flatten_reads_nchw(H, W, C, seed):
    x = random_array(seed, (2, C, H, W))
    Wd = random_array(seed + 1, (C * H * W, 3))
    channels_last = x.transpose(0, 2, 3, 1).reshape(2, -1)
    got = narrow.narrow_dense_ref(channels_last, narrow.flatten_order(H, W, C), Wd, 0, False)
    # the same float64 products summed in another order: an error relative to the terms, not to a sum
    # that cancels (a relative tolerance on -0.00147 from terms near 1 failed at 1.2e-12)
    terms = np.abs(x.reshape(2, -1)) @ np.abs(Wd)
    assert np.all(np.abs(got - x.reshape(2, -1) @ Wd) <= 1e-12 * terms)


def test_kernels_refuse_what_they_would_misread():
    x, W, b = np.zeros((2, 3), np.float32), np.zeros((3, 5), np.float32), np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="at most 16 outputs"):
        narrow.narrow_dense(x, np.arange(3), np.zeros((3, 17), np.float32), np.zeros(17, np.float32), False)
    with pytest.raises(ValueError, match=r"order must have shape \(3,\)"):
        narrow.narrow_dense(x, np.arange(6), W, b, False)
    with pytest.raises(ValueError, match="order must hold row numbers of W"):
        narrow.narrow_dense(x, np.array([0, 1, 3]), W, b, False)
    with pytest.raises(ValueError, match="x must be a C-contiguous float32 array, got float64"):
        direct.dense_block(x.astype(np.float64), W, b, False)
    with pytest.raises(ValueError, match=r"b must have shape \(5,\)"):
        direct.dense_block(x, W, b[:4], False)
    with pytest.raises(ValueError, match=r"W must have shape \(3, 5\)"):
        direct.dense_block(x, W[:2].copy(), b, False)
    with pytest.raises(ValueError, match="pack_filters"):
        direct.conv_block(np.zeros((1, 4, 4, 2), np.float32), np.zeros(10, np.float32), b, 5, 3, 1, False, False)
