"""Sequential.predict through minicnn.inference's fused stages: the same numbers as forward."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, parallel, zoo
from minicnn.inference import Inference
from portable import run_without_avx512

NETWORKS = ("lenet5", "seed_cnn", "tiny_cnn", "small_cnn", "deep_cnn", "lenet300", "small_mlp")


def images(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def assert_same_logits(model, x, **predict_args):
    np.testing.assert_allclose(model.predict(x, **predict_args), model.forward(x), rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", NETWORKS)
def test_predict_is_forward(name):
    model = zoo.build(name, seed=1)
    for mode in ("serial", "threaded"):
        with parallel.forced(mode):
            assert_same_logits(model, images(37), batch_size=16)  # two full batches and a part
            assert_same_logits(model, images(1, seed=2))


def test_every_zoo_layer_stack_fuses():
    """No zoo network leaves a layer to its own forward."""
    for name in NETWORKS:
        stages = Inference(zoo.build(name).layers).stages
        assert {type(s).__name__ for s in stages} <= {"_Conv", "_Dense"}, name


@settings(max_examples=15)
@given(st.sampled_from(["relu pool", "pool relu", "relu", "pool", ""]), st.integers(1, 2), st.integers(0, 1),
       st.integers(1, 12), st.integers(0, 2**16))
def test_predict_is_forward_for_any_stack_of_fusable_layers(tail, stride, padding, n_out, seed):
    rng = np.random.default_rng(seed)
    layers = [Conv2D(1, 5, 3, stride=stride, padding=padding, rng=rng)]
    layers += [ReLU() if word == "relu" else MaxPool2D(2) for word in tail.split()]
    layers += [Conv2D(5, 7, 2, rng=rng), ReLU(), Flatten()]
    model = Sequential(layers, input_shape=(1, 15, 15))
    features = model.output_shapes()[-1][0]
    model.layers += [Dense(features, n_out, rng=rng), ReLU(), Dense(n_out, 3, rng=rng)]
    x = rng.random((5, 1, 15, 15), dtype=np.float32)
    assert_same_logits(model, x)


def test_predict_follows_weights_changed_in_place():
    """Training and pruning change weights in place: the packed copy must notice."""
    model = zoo.lenet5(seed=0)
    x = images(3)
    before = model.predict(x)
    conv2 = model.layers[2]
    conv2.params["W"][7, 3] *= -2.0
    model.layers[0].params["b"][4] += 1.0
    after = model.predict(x)
    assert not np.allclose(before, after)
    assert_same_logits(model, x)


def test_predict_returns_its_own_array_and_copies_leave_the_buffers_behind():
    model = zoo.seed_cnn(seed=0)
    first = model.predict(images(4))
    kept = first.copy()
    model.predict(images(4, seed=1))
    np.testing.assert_array_equal(first, kept)
    clone = model.copy()
    assert "_inference" in vars(model) and "_inference" not in vars(clone)
    np.testing.assert_array_equal(clone.predict(images(4)), kept)


def test_predict_rebuilds_its_stages_when_the_layers_change():
    model = zoo.seed_cnn(seed=0)
    model.predict(images(2))
    model.layers[-1] = Dense(32 * 13 * 13, 10, rng=5)
    assert_same_logits(model, images(2))


def test_other_layers_and_dtypes_run_their_own_forward():
    class Double(ReLU):  # a layer inference knows nothing about, between two fusable ones
        def forward(self, x):
            return 2 * x

    model = zoo.lenet5(seed=0)
    model.layers.insert(2, Double())
    stages = [type(s).__name__ for s in Inference(model.layers).stages]
    assert stages == ["_Conv", "_Layer", "_Conv", "_Dense", "_Dense"]
    assert_same_logits(model, images(3))
    model64 = zoo.seed_cnn(seed=0).astype(np.float64)
    logits = model64.predict(images(3))
    assert logits.dtype == np.float32  # predict's contract, whatever the model's dtype
    np.testing.assert_allclose(logits, model64.forward(images(3)), rtol=1e-6)


def test_predict_is_forward_for_unusual_stacks():
    """A Flatten of a 3-D input, a network that ends in a conv, a Flatten fed NCHW by a layer
    inference does not know, and a model converted to float64 after predict ran."""
    flat3 = Sequential([Flatten(), Dense(42, 10, rng=0)], input_shape=(6, 7))
    wide3 = Sequential([Flatten(), Dense(42, 20, rng=0), ReLU()], input_shape=(6, 7))
    x3 = np.random.default_rng(0).random((9, 6, 7), dtype=np.float32)
    assert_same_logits(flat3, x3)
    assert_same_logits(wide3, x3)
    ends_in_conv = Sequential([Conv2D(1, 4, 3, rng=0), ReLU()], input_shape=(1, 5, 5))
    x = np.random.default_rng(1).random((2, 1, 5, 5), dtype=np.float32)
    assert ends_in_conv.predict(x).shape == (2, 4, 3, 3)
    assert_same_logits(ends_in_conv, x)

    class Scale(ReLU):
        def forward(self, x):
            return 0.5 * x

    nchw_into_flatten = zoo.seed_cnn(seed=0)
    nchw_into_flatten.layers.insert(3, Scale())  # after the pool, before Flatten
    assert_same_logits(nchw_into_flatten, images(10))
    model = zoo.lenet5(seed=0)
    model.predict(images(2))
    model.astype(np.float64)
    np.testing.assert_allclose(model.predict(images(2)), model.forward(images(2)), rtol=1e-6)


def test_predict_follows_a_weight_of_another_shape_in_the_same_layer():
    model = Sequential([Conv2D(1, 3, 3, rng=0), Flatten(), Dense(3 * 26 * 26, 4, rng=0)])
    model.predict(images(2))
    conv = model.layers[0]
    conv.params["W"] = np.random.default_rng(2).standard_normal((3, 1, 3, 3)).astype(np.float32)[:, :, ::-1].copy()
    assert_same_logits(model, images(2))


def test_predict_refuses_a_weight_that_no_longer_fits_its_layer():
    """The stages are bound to each layer's geometry: a weight array replaced by one of another
    shape is named, not read past its end."""
    model = zoo.lenet5(seed=0)
    x = images(2)
    np.testing.assert_array_equal(model.predict(x.astype(np.float64)), model.predict(x))  # same steps, any dtype
    model.layers[0].params["W"] = np.zeros((20, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"Conv2D weight must have shape \(20, 1, 5, 5\)"):
        model.predict(x)
    model = zoo.lenet5(seed=0)
    model.predict(x)
    model.layers[-1].params["W"] = np.zeros((500, 9), np.float32)
    with pytest.raises(ValueError, match=r"Dense weight must have shape \(500, 10\)"):
        model.predict(x)


def test_a_stage_refuses_inputs_its_layer_does_not_take():
    """Inference is public: channels or features its layer does not expect are named before a kernel
    would read past the weights."""
    with pytest.raises(ValueError, match="Conv2D expects 1 input channels, got 3"):
        Inference([Conv2D(1, 4, 3, rng=0)])(np.ones((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="Dense expects 12 input features, got 16"):
        Inference([Flatten(), Dense(12, 20, rng=0)])(np.ones((1, 1, 4, 4), np.float32))


def test_predict_returns_c_contiguous_logits_for_any_number_of_batches():
    ends_in_conv = Sequential([Conv2D(1, 4, 3, rng=0), ReLU()], input_shape=(1, 5, 5))
    x = np.random.default_rng(1).random((3, 1, 5, 5), dtype=np.float32)
    for batch in (1, 3):
        assert ends_in_conv.predict(x, batch_size=batch).flags.c_contiguous, batch


def test_a_layer_that_changes_its_output_shape_is_caught_before_a_fused_stage():
    class Shrinking(ReLU):  # returns one column less on every call after the first
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x if self.calls == 1 else np.ascontiguousarray(x[..., : 1 - self.calls])

    model = zoo.lenet5(seed=0)
    model.layers.insert(2, Shrinking())
    model.predict(images(1))
    with pytest.raises(ValueError, match=r"inference bound a stage to inputs of shape \(1, 12, 12, 20\)"):
        model.predict(images(1))


def test_predict_from_two_threads_at_once():
    """Each thread runs its own stages and buffers: neither sees the other's activations."""
    model = zoo.lenet5(seed=0)
    batches = [images(64, seed=s) for s in range(6)]
    expected = [model.forward(x) for x in batches]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            results = list(pool.map(model.predict, batches))
            for got, want in zip(results, expected):
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_predict_of_no_images_and_bad_input():
    model = zoo.seed_cnn(seed=0)
    assert model.predict(images(0)).shape == (0, 10)
    with pytest.raises(ValueError, match="model expects inputs of shape"):
        model.predict(np.zeros((2, 1, 27, 28), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        model.predict(np.full((1, 1, 28, 28), np.nan, np.float32))


def test_kernels_without_avx512_agree():
    """The portable path: the same kernels compiled for an AVX2-only CPU (Numba's CPU name),
    in a fresh process, against forward."""
    run_without_avx512(
        "import numpy as np\n"
        "from minicnn import zoo\n"
        "x = np.random.default_rng(0).random((20, 1, 28, 28), dtype=np.float32)\n"
        "for name in ('lenet5', 'seed_cnn', 'deep_cnn'):\n"
        "    m = zoo.build(name, seed=0)\n"
        "    for b in (1, 20):\n"
        "        assert np.abs(m.predict(x[:b]) - m.forward(x[:b])).max() < 2e-5, name\n"
        "print('ok')\n"
    )
