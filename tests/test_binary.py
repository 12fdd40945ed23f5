"""Binary networks: bit packing, XNOR-popcount and add/subtract kernels, the
straight-through gradients, packed inference, files (optim/binary/)."""


import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minicnn
from gradcheck import numerical_gradient, relative_error
from minicnn import kernels, parallel, simd
from minicnn.inference import Inference
from minicnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from optim.binary import (
    BinaryConv2D, BinaryDense, PackedBinaryConv2D, PackedBinaryDense, addsub, binarize, clip_latent, lanes, pack,
    windows, xnor,
)
from portable import run_without_avx512
from strategies import conv_geometry, random_array

seeds = st.integers(0, 2**31 - 1)
lengths = st.integers(1, 300)  # across word boundaries: 63, 64, 65, 127, 128, ...


def signs_of(v):
    return np.where(v >= 0, 1.0, -1.0)


BUILDS = ("threaded", "serial")  # the same loops compiled with prange in parallel, and on one thread


# --------------------------------------------------------------------------
# Packing and the popcount lanes


@given(st.integers(1, 4), lengths, seeds)
def test_pack_round_trip_any_length(rows, n, seed):
    v = random_array(seed, (rows, n), np.float32)
    v[:, ::7] = 0  # sign(0) = +1 must survive too
    for build in BUILDS:
        with parallel.forced(build):
            packed = xnor.pack_signs(v)
        assert packed.dtype == np.uint64 and packed.shape == (rows, (n + 63) // 64)
        np.testing.assert_array_equal(packed, xnor.pack_signs_ref(v), err_msg=f"numba pack vs reference ({build})")
    np.testing.assert_array_equal(xnor.unpack_signs(packed, n), signs_of(v))
    padding = n % 64
    if padding:  # the bits past n are zero, so XOR never counts them
        assert np.all(packed[:, -1] >> np.uint64(padding) == 0), f"padding bits set: {packed[:, -1]}"


def test_pack_layout_is_lsb_first():
    v = np.full((1, 70), -1.0, np.float32)
    v[0, [0, 2, 63, 64, 69]] = 1.0
    packed = xnor.pack_signs(v)
    np.testing.assert_array_equal(packed, [[(1 << 0) | (1 << 2) | (1 << 63), (1 << 0) | (1 << 5)]])


@numba.njit
def _lanes_ops(x, wt, i, n, m, out, as_float, values):
    d = lanes.count_add(lanes.count_add(lanes.zeros(), x, wt, i), x, wt, i)  # twice: the counts add
    lanes.store_first(out, 0, d, 16)
    lanes.store_first(out, 16, lanes.dots(d, n), m)
    lanes.store_first(out, 32, lanes.widen(lanes.count_add(lanes.zeros8(), x, wt, i)), 16)  # 8 counts, 8 zeros
    simd.store(as_float, 0, lanes.to_float(d))
    return lanes.sign_bits(simd.load(values, 0), m)


@given(st.integers(0, 2**32 - 1), st.lists(st.integers(0, 2**32 - 1), min_size=20, max_size=20),
       st.integers(0, 4), st.integers(-100, 100), st.integers(0, 16), seeds)
def test_lanes_ops_are_the_numpy_popcounts(x, words, i, n, m, seed):
    """lanes' operations against their NumPy meaning; the masked store writes m lanes, no more."""
    wt = np.array(words, np.uint32)
    out, as_float = np.full(48, -7, np.int32), np.empty(16, np.float32)
    values = random_array(seed, (16,), np.float32)
    values[::3] = 0  # sign(0) = +1
    bits = _lanes_ops(np.uint32(x), wt, i, n, m, out, as_float, values)
    counts = 2 * np.array([bin(x ^ int(v)).count("1") for v in wt[i : i + 16]])
    np.testing.assert_array_equal(out[:16], counts)
    np.testing.assert_array_equal(out[16 : 16 + m], (n - 2 * counts)[:m])
    assert (out[16 + m : 32] == -7).all()
    np.testing.assert_array_equal(out[32:], np.r_[counts[:8] // 2, np.zeros(8)])
    np.testing.assert_array_equal(as_float, counts.astype(np.float32))
    assert bits == sum(1 << lane for lane in range(m) if values[lane] >= 0)


# --------------------------------------------------------------------------
# Kernels against the float dot product


def test_xnor_dot_hand_computed():
    a = np.array([[1.0, -1.0, 1.0]])
    w = np.array([[1.0, 1.0, -1.0]])  # products +1, -1, -1: dot -1; bits 101 ^ 011 = 110: 3 - 2 * 2
    assert xnor.xnor_matmul(xnor.pack_signs(a), xnor.pack_signs(w), 3)[0, 0] == -1


@given(st.integers(1, 70), st.integers(1, 70), lengths, seeds)
@example(3, 33, 4096, 0)  # a last group of 3 rows; a second pass of 32 filters, one of them real; long rows
@example(8, 32, 32, 0)  # whole groups and passes; rows of one uint64 word, its high half zero
def test_xnor_matmul_equals_plus_minus_one_dot_exactly(R, F, n, seed):
    a = signs_of(random_array(seed, (R, n)))
    w = signs_of(random_array(seed + 1, (F, n)))
    expected = (a @ w.T).astype(np.int64)  # small integers: exact in float64
    pa, pw = xnor.pack_signs(a), xnor.pack_signs(w)
    for build in BUILDS:
        with parallel.forced(build):
            ours = xnor.xnor_matmul(pa, pw, n)
        assert ours.dtype == np.int32
        np.testing.assert_array_equal(ours, expected, err_msg=f"xnor_matmul vs float +-1 dot ({build})")
    np.testing.assert_array_equal(xnor.xnor_matmul_ref(pa, pw, n), expected, err_msg="reference vs float dot")


@given(st.integers(1, 20), st.integers(1, 300), lengths, st.booleans(), seeds)
def test_addsub_dense_equals_float_reference(R, F, n, relu, seed):
    """Rows in tiles of 8 and alone; outputs in pairs of 16-lane groups, in spans of 8 groups (the
    last one overlapping the one before unless the groups are a multiple of 8), or group by group
    below 8 groups (112 outputs); any n."""
    x = random_array(seed, (R, n), np.float32)
    signs = signs_of(random_array(seed + 1, (F, n)))
    alpha = np.abs(random_array(seed + 2, (F,), np.float32))
    b = random_array(seed + 3, (F,), np.float32)
    lanes = addsub.pack_lanes(signs)
    exact = (x.astype(np.float64) @ signs.T.astype(np.float64)) * alpha + b
    exact = np.maximum(exact, 0) if relu else exact
    bound = 1e-6 * n * np.abs(x).sum(axis=1, keepdims=True) * alpha + 1e-6 * np.abs(b)  # float32 rounding
    ref = addsub.addsub_dense_ref(x, signs.astype(np.float32), alpha, b, relu)
    assert np.all(np.abs(ref - exact) <= bound), f"reference {ref} vs exact {exact}"
    for build in BUILDS:
        with parallel.forced(build):
            ours = addsub.addsub_dense(x, lanes, alpha, b, relu)
        assert ours.dtype == np.float32
        assert np.all(np.abs(ours - exact) <= bound), f"ours {ours} vs exact {exact} ({build})"


def test_pack_lanes_puts_output_16g_plus_l_in_bit_l():
    signs = -np.ones((20, 3), np.float32)
    signs[0, 0] = signs[5, 0] = signs[17, 2] = 1
    lanes = addsub.pack_lanes(signs)
    assert lanes.dtype == np.uint16 and lanes.shape == (2, 3)
    np.testing.assert_array_equal(lanes, [[1 | 1 << 5, 0, 0], [0, 0, 1 << 1]])


def test_addsub_and_xnor_kernels_without_avx512_agree():
    """The portable path: the kernels compiled for an AVX2-only CPU (Numba's CPU name), where a
    masked add is a blend and a popcount has no vector instruction, in a fresh process, against
    the references; LeNet-5's predict (fused stages, real and binary inputs) against forward."""
    run_without_avx512(
        "import numpy as np\n"
        "from minicnn import parallel\n"
        "from optim.binary import addsub, xnor\n"
        "rng = np.random.default_rng(0)\n"
        "for R, F, n in ((1, 500, 800), (21, 37, 75)):\n"
        "    x = rng.standard_normal((R, n)).astype(np.float32)\n"
        "    s = np.where(rng.standard_normal((F, n)) >= 0, 1, -1).astype(np.float32)\n"
        "    alpha, b = rng.random(F).astype(np.float32), rng.standard_normal(F).astype(np.float32)\n"
        "    for build in ('serial', 'threaded'):\n"
        "        with parallel.forced(build):\n"
        "            y = addsub.addsub_dense(x, addsub.pack_lanes(s), alpha, b)\n"
        "            d = xnor.xnor_matmul(xnor.pack_signs(x), xnor.pack_signs(s), n)\n"
        "        assert np.abs(y - addsub.addsub_dense_ref(x, s, alpha, b)).max() < 1e-3, build\n"
        "        assert (d == np.where(x >= 0, 1, -1) @ s.T.astype(int)).all(), build\n"
        "from minicnn import zoo\n"
        "from optim.binary import binarize, pack\n"
        "x = rng.random((9, 1, 28, 28), dtype=np.float32)\n"
        "for acts in (False, True):\n"
        "    m = pack(binarize(zoo.lenet5(seed=0), binary_activations=acts))\n"
        "    for b in (1, 9):\n"
        "        assert np.abs(m.predict(x[:b]) - m.forward(x[:b])).max() < 2e-5, (acts, b)\n"
        "print('ok')\n"
    )


# --------------------------------------------------------------------------
# Straight-through gradients


def surrogate_sign(v, v0):
    """Equal to sign(v0) at v = v0, with the derivative of the clipped identity: the STE as a function."""
    return signs_of(v0) + np.clip(v, -1, 1) - np.clip(v0, -1, 1)


def surrogate_binarize(v, v0):
    """mean|v| * surrogate sign, per row: the exact function whose gradient the layers' backward computes."""
    return np.abs(v).mean(axis=1, keepdims=True) * surrogate_sign(v, v0)


def test_weight_gradient_hand_computed():
    layer = BinaryDense(2, 1).astype(np.float64)
    layer.params["W"][:] = [[0.5], [-0.25]]  # alpha 0.375, signs +1, -1
    layer.params["b"][:] = 0
    x = np.array([[1.0, 2.0]])
    assert layer.forward(x)[0, 0] == pytest.approx(0.375 * (1 - 2))
    layer.backward(np.ones((1, 1)))
    # dL/dW~ = x = (1, 2): alpha * (1, 2) + sign(W) * ((+1)(1) + (-1)(2)) / 2 = (0.375, 0.75) + (-0.5, 0.5)
    np.testing.assert_allclose(layer.grads["W"][:, 0], [-0.125, 1.25])

    layer.params["W"][:] = [[1.5], [-0.5]]  # |W| > 1: the sign path is cancelled there; alpha = 1
    layer.forward(x)
    layer.backward(np.ones((1, 1)))
    np.testing.assert_allclose(layer.grads["W"][:, 0], [0 - 0.5, 2 + 0.5])


def test_activation_gradient_hand_computed():
    layer = BinaryDense(2, 1, binary_input=True).astype(np.float64)
    layer.params["W"][:] = [[1.0], [1.0]]  # alpha 1, signs +1, +1
    layer.params["b"][:] = 0
    x = np.array([[0.5, -3.0]])  # beta 1.75; signs +1, -1; |-3| > 1 cancels the sign path
    assert layer.forward(x)[0, 0] == pytest.approx(1.75 * (1 - 1))
    dx = layer.backward(np.ones((1, 1)))
    # dL/dx~ = W~ = (1, 1): beta * (1, 0) + sign(x) * ((+1)(1) + (-1)(1)) / 2 = (1.75, 0)
    np.testing.assert_allclose(dx[0], [1.75, 0.0])


def dense_surrogate(layer, x, x0, W0):
    W = layer.params["W"]
    xb = surrogate_binarize(x, x0) if layer.binary_input else x
    return xb @ surrogate_binarize(W.T, W0.T).T + layer.params["b"]


def conv_surrogate(layer, x, x0, W0):
    F, k, s, p = layer.out_channels, layer.kernel_size, layer.stride, layer.padding
    rows = kernels.im2row_ref(kernels.pad(x, p), k, k, s)
    if layer.binary_input:
        rows = surrogate_binarize(rows, kernels.im2row_ref(kernels.pad(x0, p), k, k, s))
    out = rows @ surrogate_binarize(layer.params["W"].reshape(F, -1), W0.reshape(F, -1)).T + layer.params["b"]
    N, (_, Ho, Wo) = x.shape[0], layer.output_shape(x.shape[1:])
    return out.reshape(N, Ho, Wo, F).transpose(0, 3, 1, 2)


def check_ste_gradients(layer, x, surrogate, seed):
    """backward() equals the numerical gradient of the surrogate, for the input and every parameter."""
    layer.astype(np.float64)
    layer.params["W"] *= 3  # some latent weights beyond 1 (before clipping), so the cancellation is exercised
    out = layer.forward(x)
    x0, W0 = x.copy(), layer.params["W"].copy()
    np.testing.assert_allclose(surrogate(layer, x, x0, W0), out, rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(seed).standard_normal(out.shape)
    analytic = {"input": layer.backward(g), **{k: v.copy() for k, v in layer.grads.items()}}
    for name, arr in {"input": x, **layer.params}.items():
        num = numerical_gradient(lambda: surrogate(layer, x, x0, W0), arr, g)
        err = relative_error(analytic[name], num)
        assert err < 1e-6, (
            f"{type(layer).__name__} d/d{name}: relative error {err:.2e}; ours {analytic[name]}, numerical {num}"
        )


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 4), st.booleans(), seeds)
@example(N=1, n=2, F=2, binary_input=True, seed=566)  # a zero input gradient (both inputs past the clip)
def test_dense_ste_gradients(N, n, F, binary_input, seed):
    layer = BinaryDense(n, F, binary_input=binary_input, rng=seed)
    check_ste_gradients(layer, random_array(seed, (N, n)), dense_surrogate, seed)


@given(conv_geometry(max_batch=2, max_channels=3, max_size=6), st.booleans(), seeds)
def test_conv_ste_gradients(geom, binary_input, seed):
    N, C, H, W, F, k, s, p = geom
    layer = BinaryConv2D(C, F, k, s, p, binary_input=binary_input, rng=seed)
    check_ste_gradients(layer, random_array(seed, (N, C, H, W)), conv_surrogate, seed)


# --------------------------------------------------------------------------
# Packed inference = the training-time forward


def bound(x_rows, alpha, beta=None):
    """float32 rounding of a dot product of n terms bounded by |x| * alpha, with room."""
    n = x_rows.shape[1]
    scale = np.abs(x_rows).sum(axis=1, keepdims=True) * alpha.max()
    return 1e-6 * n * scale + 1e-6


@given(st.integers(1, 5), lengths, st.integers(1, 6), st.booleans(), seeds)
def test_packed_dense_equals_training_forward(N, n, F, binary_input, seed):
    layer = BinaryDense(n, F, binary_input=binary_input, rng=seed)
    x = random_array(seed, (N, n), np.float32)
    packed = PackedBinaryDense.from_layer(layer)
    ours, expected = packed.forward(x), layer.forward(x)
    alpha = np.abs(layer.params["W"]).mean(axis=0)
    assert ours.dtype == np.float32
    assert np.all(np.abs(ours - expected) <= bound(x, alpha)), f"packed {ours} vs training {expected}"


@given(conv_geometry(max_channels=5), st.booleans(), seeds)
def test_packed_conv_equals_training_forward(geom, binary_input, seed):
    N, C, H, W, F, k, s, p = geom
    layer = BinaryConv2D(C, F, k, s, p, binary_input=binary_input, rng=seed)
    x = random_array(seed, (N, C, H, W), np.float32)
    packed = PackedBinaryConv2D.from_layer(layer)
    ours, expected = packed.forward(x), layer.forward(x)
    alpha = np.abs(layer.params["W"]).reshape(F, -1).mean(axis=1)
    tol = bound(x.reshape(N, -1), alpha)[:, :, None, None]
    assert ours.shape == expected.shape
    assert np.all(np.abs(ours - expected) <= tol), f"max difference {np.abs(ours - expected).max()}"


# --------------------------------------------------------------------------
# Models: binarize, train, pack, save


def small_cnn(seed=0):
    rng = np.random.default_rng(seed)
    return minicnn.Sequential([
        Conv2D(1, 4, 5, rng=rng), MaxPool2D(2), Conv2D(4, 8, 3, padding=1, rng=rng), MaxPool2D(2),
        Flatten(), Dense(8 * 6 * 6, 32, rng=rng), ReLU(), Dense(32, 10, rng=rng),
    ])


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 20), st.integers(0, 1), st.booleans(), st.sampled_from([12, 21]), seeds)
@example(1, 0, False, 21, 0)  # the add/subtract kernel
@example(9, 1, True, 21, 1)  # direct.dense_block on decoded weights, and a row left over
@example(9, 1, True, 12, 1)  # minicnn.narrow's kernel, as a float Dense of at most 16 outputs
def test_predict_runs_binary_layers_in_fused_stages(N, padding, relu_after_pool, width, seed):
    """Packed binary layers join predict's stages: with real inputs the add/subtract kernel below
    ADDSUB_BELOW rows, from there the float kernel a Dense of its width runs, on decoded weights;
    with binary inputs XNOR-popcount on channels-last signs, the ReLU and pool in its loop. Either
    way predict is forward."""
    rng = np.random.default_rng(seed)
    layers = [Conv2D(1, 4, 5, rng=rng), MaxPool2D(2), Conv2D(4, 8, 3, padding=padding, rng=rng), MaxPool2D(2)]
    layers += [ReLU()] if relu_after_pool else []
    layers += [Flatten(), Dense(8 * (5 + padding) ** 2, width, rng=rng), ReLU(), Dense(width, 3, rng=rng)]
    model = minicnn.Sequential(layers, input_shape=(1, 28, 28))
    x = rng.random((N, 1, 28, 28), dtype=np.float32)
    for binary_activations in (False, True):
        packed = pack(binarize(model, binary_activations=binary_activations))
        kinds = [type(stage).__name__ for stage in Inference(packed.layers).stages]
        assert kinds == ["_Conv", "_Conv", "_Dense", "_Dense"], kinds
        for build in BUILDS:
            with parallel.forced(build):
                np.testing.assert_allclose(packed.predict(x), packed.forward(x), rtol=0, atol=2e-5)


@pytest.mark.parametrize("N", [1, 5])
def test_binary_input_dense_as_the_last_stage(N):
    """A stage's output is the array it was given (N, F), also when a binary-input dense layer, which
    runs as N 1 x 1 images, ends the network."""
    rng = np.random.default_rng(N)
    model = pack(minicnn.Sequential([Flatten(), BinaryDense(12, 5, binary_input=True, rng=rng)], input_shape=(3, 2, 2)))
    x = rng.standard_normal((N, 3, 2, 2)).astype(np.float32)
    out = model.predict(x)
    assert out.shape == (N, 5)
    np.testing.assert_allclose(out, model.forward(x), rtol=0, atol=1e-5)


def test_binarize_defaults_to_the_middle_and_keeps_the_original():
    model = small_cnn()
    before = [layer.params["W"].copy() for layer in model.layers if layer.params]
    b = binarize(model)
    assert [type(layer).__name__ for layer in b.layers] == [
        "Conv2D", "MaxPool2D", "BinaryConv2D", "MaxPool2D", "Flatten", "BinaryDense", "ReLU", "Dense"]
    for old, layer in zip(before, (layer for layer in model.layers if layer.params)):
        np.testing.assert_array_equal(old, layer.params["W"])


def test_binary_activations_remove_the_feeding_relu():
    b = binarize(minicnn.zoo.lenet300(), binary_activations=True)
    assert [type(layer).__name__ for layer in b.layers] == ["Flatten", "Dense", "BinaryDense", "ReLU", "Dense"]
    assert b.layers[2].binary_input


def latent_extremes(model):
    binary = (layer for layer in model.layers if isinstance(layer, (BinaryDense, BinaryConv2D)))
    return max(np.abs(layer.params["W"]).max() for layer in binary)


def test_clipping_keeps_latent_weights_in_range():
    x, y = minicnn.datasets.load("mnist10k")[:2]
    runs = {}
    for constraint in (None, clip_latent):  # Adam at lr 0.1 moves a weight by up to ~0.1 a step: 16 steps leave [-1, 1]
        runs[constraint] = binarize(small_cnn())
        minicnn.fit(runs[constraint], x[:1024], y[:1024], epochs=1, optimizer=minicnn.Adam(0.1),
                    constraint=constraint, verbose=False)
    assert latent_extremes(runs[None]) > 1, "without the clip, this run must leave [-1, 1], or the test proves nothing"
    assert latent_extremes(runs[clip_latent]) == 1, f"clipped run reached {latent_extremes(runs[clip_latent])}"


def test_binary_training_learns_and_packs():
    x, y, x_test, y_test = minicnn.datasets.load("mnist10k")
    model = binarize(small_cnn(), binary_activations=False)
    minicnn.fit(model, x[:3000], y[:3000], epochs=2, optimizer=minicnn.Adam(1e-2), constraint=clip_latent,
                verbose=False)
    packed = pack(model)
    accuracy = minicnn.evaluate(packed, x_test[:500], y_test[:500])
    # 0.87 measured (the same float CNN, same recipe: 0.90); chance is 0.1
    assert accuracy > 0.8, f"binary-weight CNN after 2 epochs on 3000 images: accuracy {accuracy}"
    np.testing.assert_allclose(packed.predict(x_test[:64]), model.predict(x_test[:64]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("binary_activations", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, binary_activations):
    packed = pack(binarize(small_cnn(), binary_activations=binary_activations))
    path = tmp_path / "bin.npz"
    packed.save(path)
    loaded = minicnn.load(path)
    x = random_array(0, (7, 1, 28, 28), np.float32)
    np.testing.assert_array_equal(loaded.predict(x), packed.predict(x))
    for ours, theirs in zip(loaded.layers, packed.layers):
        assert type(ours) is type(theirs)
        if isinstance(ours, PackedBinaryDense | PackedBinaryConv2D):
            np.testing.assert_array_equal(ours.bits, theirs.bits)
            assert ours.binary_input == binary_activations
    with np.load(path) as f:
        signs = f["layers.5.signs"]
    assert signs.dtype == np.uint8 and signs.size == (288 * 32 + 7) // 8  # one bit per weight on disk


def test_stats_report_one_bit_per_weight():
    dense = PackedBinaryDense.from_layer(BinaryDense(800, 500))
    s = dense.stats()
    assert s["params"] == 800 * 500 + 500
    assert s["bytes"] == 800 * 500 // 8 + 2 * 500 * 4  # signs + alpha + bias, float32
    assert "1.08" in minicnn.Sequential([dense], input_shape=(800,)).summary()


# --------------------------------------------------------------------------
# Bad input


def test_truncated_signs_are_rejected(tmp_path):
    packed = pack(binarize(small_cnn()))
    path = tmp_path / "bin.npz"
    packed.save(path)
    with np.load(path) as f:
        arrays = dict(f)
    arrays["layers.5.signs"] = arrays["layers.5.signs"][:-1]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=r"array 'signs' must have shape \(1152,\), got \(1151,\)"):
        minicnn.load(bad)


@pytest.mark.parametrize("arrays,message", [
    ({"signs": np.zeros(2, np.uint8), "alpha": np.ones(2, np.float32)}, "missing its 'b'"),
    ({"signs": np.zeros(2, np.uint8), "alpha": np.ones(3, np.float32), "b": np.zeros(2, np.float32)}, "array 'alpha' must have shape"),
    ({"signs": np.zeros(2, np.uint16), "alpha": np.ones(2, np.float32), "b": np.zeros(2, np.float32)}, "array 'signs' must be uint8"),
    ({"signs": np.zeros(2, np.uint8), "alpha": -np.ones(2, np.float32), "b": np.zeros(2, np.float32)}, ">= 0"),
])
def test_bad_layer_arrays(arrays, message):
    with pytest.raises(ValueError, match=message):
        PackedBinaryDense.from_state({"in_features": 5, "out_features": 2, "binary_input": False}, arrays)


def test_bad_uses():
    with pytest.raises(ValueError, match="layer 1 is not a float Conv2D or Dense"):
        binarize(small_cnn(), layers=[1])
    with pytest.raises(ValueError, match="none between the first and the last"):
        binarize(minicnn.zoo.seed_cnn())
    with pytest.raises(ValueError, match="no BinaryDense / BinaryConv2D"):
        pack(small_cnn())
    with pytest.raises(TypeError, match="Sequential"):
        binarize([Dense(2, 2)])
    dense = PackedBinaryDense.from_layer(BinaryDense(4, 3))
    with pytest.raises(ValueError, match=r"expects inputs of shape \(4,\)"):
        dense.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(NotImplementedError, match="inference-only"):
        dense.backward(np.zeros((2, 3), np.float32))


def test_cli_quantize_bits_1(tmp_path, capsys):
    from optim.app.cli import main

    float_path, out = tmp_path / "mlp.npz", tmp_path / "mlp-bin.npz"
    minicnn.zoo.lenet300(seed=0).save(float_path)
    # No retraining: the pipeline is under test here, the training in test_binary_training_learns_and_packs.
    args = ["quantize", "--model", str(float_path), "--bits", "1", "--retrain-epochs", "0", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "float model" in text and "PackedBinaryDense" in text and text.count("Total") == 2
    accuracy = float(text.split("test accuracy ")[-1].split()[0])
    x, y = minicnn.datasets.load()[2:]
    assert abs(minicnn.evaluate(minicnn.load(out), x, y) - accuracy) <= 5e-5


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 70), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 3), seeds)
@example(2, 12, 12, 20, 5, 5, 1, 0)  # LeNet-5's conv2: lines of 100 signs in 4 words, 5 tails of 4 bits in one
@example(2, 4, 4, 1, 3, 3, 2, 0)  # one channel, 3 x 3, stride 2: lines of one word, a window's 9 signs in one
@example(1, 3, 3, 8, 2, 2, 1, 0)  # lines of 16 bits: two make a whole tail word
@example(3, 1, 1, 64, 1, 1, 1, 0)  # a dense layer's rows: 1 x 1 images; whole words
@example(2, 3, 7, 32, 2, 3, 3, 0)  # lines of whole words, stride 3
def test_window_signs_match_reference(N, Hp, Wp, C, KH, KW, stride, seed):
    """Each window line's KW C signs in ceil(KW C / 32) words, and where they fit, the KH lines' last
    words from each line down side by side in its slot, bit for bit; the windows' mean |x| to float32
    rounding."""
    x = random_array(seed, (N, Hp + KH - 1, Wp + KW - 1, C), np.float32)
    x[..., ::5] = 0  # sign(0) = +1
    lines, beta = windows.window_signs_ref(x, KH, KW, stride)
    Wo, L, t = (x.shape[2] - KW) // stride + 1, -(-KW * C // 32), windows.tail_bits(KH, KW, C)
    assert lines.shape == (*x.shape[:2], Wo, windows.line_slot(KH, KW, C))
    line_values = np.stack([x[:, :, j * stride : j * stride + KW].reshape(N, x.shape[1], -1) for j in range(Wo)], 2)
    bits = np.unpackbits(lines[..., :L].copy().view(np.uint8), axis=-1, bitorder="little")
    np.testing.assert_array_equal(bits[..., : KW * C], line_values >= 0)
    if t:  # each line's tail word: the last words of the KH lines from it down, t bits each
        tails = np.zeros(lines.shape[:3], np.uint32)
        for h in range(x.shape[1]):
            for kh in range(min(KH, x.shape[1] - h)):
                tails[:, h] |= lines[:, h + kh, :, L - 1] << np.uint32(t * kh)
        np.testing.assert_array_equal(lines[..., L], tails)
    for build in BUILDS:
        with parallel.forced(build):
            got_lines, got_beta = windows.window_signs(x, KH, KW, stride)
        np.testing.assert_array_equal(got_lines, lines, err_msg=build)
        np.testing.assert_allclose(got_beta, beta, rtol=1e-5, err_msg=build)


def test_tails_are_where_they_fit():
    """LeNet-5's conv2 (5 x 5 x 20: lines of 100 bits) keeps 5 tails of 4 bits in a fifth word a line, and
    its windows are 16 words; lines of whole words, or tails that do not fit one word, keep none; lines
    of a mismatched slot are refused."""
    assert windows.tail_bits(5, 5, 20) == 4 and windows.line_slot(5, 5, 20) == 5
    lines, _ = windows.window_signs(np.ones((1, 12, 12, 20), np.float32), 5, 5, 1)
    assert windows.window_rows(lines, 5, 5, 20, 1).off.size == 16
    assert windows.tail_bits(3, 3, 32) == 0 and windows.tail_bits(5, 5, 30) == 0 and windows.tail_bits(1, 5, 20) == 0
    with pytest.raises(ValueError, match="words a slot"):
        windows.window_rows(lines[..., :4], 5, 5, 20, 1)


@given(conv_geometry(max_channels=40), seeds)
@example((2, 20, 12, 12, 50, 5, 1, 0), 0)  # LeNet-5's conv2
@example((2, 1, 9, 9, 3, 3, 1, 0), 0)  # one channel: a window's 9 signs in one word
@example((2, 2, 7, 7, 20, 4, 2, 1), 0)  # lines of 8 bits, four to a tail word; stride 2, padding
def test_xnor_conv_on_windows_read_in_place(geom, seed):
    """window_rows' rows are each window's signs as window_filters packs a filter's (lines, or lines
    and tails), and the kernel's products of them with window_filters' words are the +-1 dot products
    of the windows' signs with the filters', exactly."""
    N, C, H, W, F, k, s, p = geom
    xp = np.ascontiguousarray(kernels.pad(random_array(seed, (N, C, H, W), np.float32), p).transpose(0, 2, 3, 1))
    filters = signs_of(random_array(seed + 1, (F, k, k, C))).astype(np.float32)
    lines, _ = windows.window_signs_ref(xp, k, k, s)
    rows = windows.window_rows(lines, k, k, C, s)
    sign_windows = np.lib.stride_tricks.sliding_window_view(signs_of(xp), (k, k), axis=(1, 2))[:, ::s, ::s]
    Ho, Wo = sign_windows.shape[1:3]
    sign_windows = sign_windows.transpose(0, 1, 2, 4, 5, 3).reshape(N * Ho * Wo, k, k, C)
    np.testing.assert_array_equal(rows.x32[rows.starts[:, None] + rows.off], windows.window_filters(sign_windows))
    exact = sign_windows.reshape(N * Ho * Wo, -1) @ filters.reshape(F, -1).T
    ones, zeros = np.ones(N * Ho * Wo, np.float32), np.zeros(F, np.float32)
    wb = xnor.blocked(windows.window_filters(filters))
    for build in BUILDS:
        with parallel.forced(build):
            out = xnor.xnor_layer(rows, wb, k * k * C, ones, zeros + 1, zeros, (N, Ho, Wo), False, False,
                                  np.empty((N, Ho, Wo, F), np.float32))
        np.testing.assert_array_equal(out.reshape(-1, F), exact, err_msg=build)


@given(conv_geometry(max_channels=40), st.booleans(), st.booleans(), seeds)
def test_conv_runner_is_the_kernels_call_after_call(geom, relu, pool, seed):
    """conv_runner's bound offsets and work arrays give, call after call on new inputs, what the checked
    calls give (window_signs, window_rows, xnor_layer); a wrong shape is refused, not run."""
    N, C, H, W, F, k, s, p = geom
    rng = np.random.default_rng(seed)
    inputs = [np.ascontiguousarray(kernels.pad(rng.standard_normal((N, C, H, W)).astype(np.float32), p)
                                   .transpose(0, 2, 3, 1)) for _ in range(2)]
    wb = xnor.blocked(windows.window_filters(signs_of(rng.standard_normal((F, k, k, C))).astype(np.float32)))
    alpha, b = rng.random(F, dtype=np.float32), rng.standard_normal(F).astype(np.float32)
    Ho, Wo = (inputs[0].shape[1] - k) // s + 1, (inputs[0].shape[2] - k) // s + 1
    pool = pool and min(Ho, Wo) >= 2
    shape = (N, Ho // 2, Wo // 2, F) if pool else (N, Ho, Wo, F)
    run = windows.conv_runner(inputs[0].shape, k, s, wb, k * k * C, alpha, b, relu, pool)
    for x in (*inputs, inputs[0]):
        lines, beta = windows.window_signs(x, k, k, s)
        rows = windows.window_rows(lines, k, k, C, s)
        expected = xnor.xnor_layer(rows, wb, k * k * C, beta, alpha, b, (N, Ho, Wo), relu, pool,
                                   np.empty(shape, np.float32))
        np.testing.assert_array_equal(run(x, np.empty(shape, np.float32)), expected)
    with pytest.raises(ValueError, match="a runner for inputs"):
        run(np.zeros((N + 1, *inputs[0].shape[1:]), np.float32), np.empty(shape, np.float32))


@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7), st.integers(1, 70), st.integers(1, 2500),
       st.booleans(), st.booleans(), seeds)
@example(2, 3, 5, 33, 2049, True, True, 0)  # a second pass of 32 filters, one of them real; long rows
def test_xnor_layer_matches_reference(N, Ho, Wo, F, n, relu, pool, seed):
    """Scaled XNOR products with the ReLU and the 2x2 pool in the registers, bit for bit (the same
    float32 operations; with a pool, alpha and b applied after the maximum, which rounding keeps
    equal for alpha >= 0), odd grids included (the pool drops the last row and column), rows in
    groups of 4 and a last group cut short. A negative alpha is refused."""
    rng = np.random.default_rng(seed)
    a = xnor.pack_signs(rng.standard_normal((N * Ho * Wo, n)).astype(np.float32))
    w = xnor.pack_signs(rng.standard_normal((F, n)).astype(np.float32))
    beta, alpha = rng.random(N * Ho * Wo, dtype=np.float32), rng.random(F, dtype=np.float32)
    b = rng.standard_normal(F).astype(np.float32)
    pool = pool and min(Ho, Wo) >= 2
    expected = xnor.xnor_layer_ref(a, w, n, beta, alpha, b, (N, Ho, Wo), relu, pool)
    assert expected.shape[1:3] == ((Ho // 2, Wo // 2) if pool else (Ho, Wo))
    for build in BUILDS:
        with parallel.forced(build):
            out = np.empty(expected.shape, np.float32)
            got = xnor.xnor_layer(xnor.packed_rows(a), xnor.blocked(w), n, beta, alpha, b, (N, Ho, Wo), relu, pool,
                                  out)
        assert got is out
        np.testing.assert_array_equal(out, expected, err_msg=build)
    with pytest.raises(ValueError, match="alpha scales must be finite and >= 0"):
        xnor.xnor_layer(xnor.packed_rows(a), xnor.blocked(w), n, beta, -alpha, b, (N, Ho, Wo), relu, pool, out)
