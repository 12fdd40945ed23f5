"""minicnn.convpool: the conv + pool training step against its reference, the reference against
numerical gradients, and the step against the layers one by one."""

import pickle

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, convpool, fit, parallel, zoo
from minicnn.kernels import conv2d_forward_ref
from gradcheck import check_layer_gradients
from portable import run_without_avx512
from strategies import random_array


@st.composite
def conv_pool_geometry(draw):
    """(N, C, H, W, F, K, stride, padding, relu) whose conv output has at least one 2x2 window."""
    K, S, P = draw(st.integers(1, 5)), draw(st.integers(1, 2)), draw(st.integers(0, 2))
    low = K - 2 * P + S  # the conv's output is at least 2 pixels on a side
    return (draw(st.integers(1, 9)), draw(st.integers(1, 21)), draw(st.integers(max(low, 1), 14)),
            draw(st.integers(max(low, 1), 14)), draw(st.integers(1, 40)), K, S, P, draw(st.booleans()))


def case(geom, seed, dtype=np.float32):
    N, C, H, W, F, K, S, P, relu = geom
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((N, C, H, W)).astype(dtype), rng.standard_normal((F, C, K, K)).astype(dtype)
    return x, w, rng.standard_normal(F).astype(dtype), S, P, relu


class Reference:
    """conv_pool_*_ref as a layer, for gradcheck (float64)."""

    def __init__(self, W, b, stride, padding, relu):
        self.params = {"W": W, "b": b}
        self.grads, self.config = {}, (stride, padding)
        self.relu = relu

    def astype(self, dtype):
        return self

    def forward(self, x):
        out, codes = convpool.conv_pool_forward_ref(x, *self.params.values(), *self.config, self.relu)
        self.cache = (x, codes)
        return out

    def backward(self, dout):
        x, codes = self.cache
        dx, self.grads["W"], self.grads["b"] = convpool.conv_pool_backward_ref(dout, codes, x, self.params["W"],
                                                                               *self.config)
        return dx


@settings(max_examples=20, deadline=None)
@given(conv_pool_geometry(), st.integers(0, 1000))
def test_the_reference_backward_is_the_gradient(geom, seed):
    geom = (min(geom[0], 2), min(geom[1], 3), min(geom[2], 8), min(geom[3], 8), min(geom[4], 3), *geom[5:])
    assume((min(geom[2], geom[3]) + 2 * geom[7] - geom[5]) // geom[6] + 1 >= 2)
    x, W, b, S, P, relu = case(geom, seed, np.float64)
    check_layer_gradients(Reference(W, b, S, P, relu), x, seed)  # random normals: no ties, no output at 0


@settings(max_examples=40, deadline=None)
@given(conv_pool_geometry(), st.integers(0, 1000))
def test_the_fast_step_is_the_reference(geom, seed):
    x, W, b, S, P, relu = case(geom, seed)
    forwards = {}
    for mode in ("serial", "threaded"):
        with parallel.forced(mode):
            forwards[mode] = convpool.conv_pool_forward(x, W, b, S, P, relu)
    for a, b_ in zip(*forwards.values()):
        assert np.array_equal(a, b_)
    out, codes, xp = forwards["serial"]
    ref_out, ref_codes = convpool.conv_pool_forward_ref(x, W, b, S, P, relu)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-4)
    # The codes agree wherever the window's two largest values are apart by more than rounding.
    y = conv2d_forward_ref(x.astype(np.float64), W.astype(np.float64), b.astype(np.float64), S, P)
    Hq, Wq = out.shape[2:]
    top = np.sort(y[:, :, : 2 * Hq, : 2 * Wq].reshape(*out.shape[:2], Hq, 2, Wq, 2).transpose(0, 1, 2, 4, 3, 5)
                  .reshape(*out.shape, 4), axis=-1)
    clear = top[..., -1] - top[..., -2] > 1e-4 * (1 + np.abs(top[..., -1]))
    if relu:
        clear &= np.abs(top[..., -1]) > 1e-4  # nor where the ReLU's 0 is a near tie
    assert np.array_equal(codes[clear], ref_codes[clear])
    g = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(np.float32)
    ref = convpool.conv_pool_backward_ref(g, codes, x, W, S, P)
    results = {}
    for mode in ("serial", "threaded"):
        with parallel.forced(mode):
            results[mode] = convpool.conv_pool_backward(g, codes, xp, W, S, P)
            for fast, slow in zip(results[mode], ref):
                np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(slow).max()))
    for a, b_ in zip(*results.values()):
        assert np.array_equal(a, b_)  # the same runs of images, summed in the same order
    dx, dW, db = convpool.conv_pool_backward(g, codes, xp, W, S, P, input_grad=False)
    assert dx is None and np.array_equal(dW, results["serial"][1]) and np.array_equal(db, results["serial"][2])


def test_the_pool_pass_is_exact():
    """The pool's maxima and codes are those of the conv's output, bit for bit: the first maximum
    of each window, NONE where the ReLU cut it."""
    y = np.random.default_rng(0).integers(-2, 3, (3, 6, 7, 5)).astype(np.float32)  # small integers: ties
    identity = np.eye(5, dtype=np.float32).reshape(5, 5, 1, 1)  # a 1x1 conv that gives y back, exactly
    for relu in (False, True):
        out, codes = np.empty((3, 5, 3, 3), np.float32), np.empty((3, 5, 3, 3), np.uint8)
        convpool._pool(y.size, y, relu, out, codes)
        ref_out, ref_codes = convpool.conv_pool_forward_ref(y.transpose(0, 3, 1, 2), identity,
                                                            np.zeros(5, np.float32), 1, 0, relu)
        assert np.array_equal(out, ref_out) and np.array_equal(codes, ref_codes)
        assert (codes == convpool.NONE).any() == relu


def one_by_one(layers, x, g):
    """(output, d/dinput, the first layer's grads) of the layers run one at a time, dout g."""
    for layer in layers:
        x = layer.forward(x)
    for layer in reversed(layers):
        g = layer.backward(g)
    return x, g, {k: v.copy() for k, v in layers[0].grads.items()}


LAYOUTS = {
    "conv pool": lambda c: [c, MaxPool2D(2)],
    "conv relu pool": lambda c: [c, ReLU(), MaxPool2D(2)],
    "conv pool relu": lambda c: [c, MaxPool2D(2), ReLU()],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("filters, stride", [(8, 1), (20, 2)])
def test_the_step_is_its_layers(layout, first, filters, stride):
    """Forward: the same bits as the layers one by one (the same conv kernel, an exact max).
    Backward: the same gradients to float32 rounding, and dx only when asked."""
    conv = Conv2D(3, filters, 3, stride=stride, padding=1, rng=0)
    layers = LAYOUTS[layout](conv)
    (step,) = convpool.training_steps(layers)
    x = random_array(1, (4, 3, 11, 11), np.float32)
    _, Ho, Wo = conv.output_shape((3, 11, 11))
    g = random_array(2, (4, filters, Ho // 2, Wo // 2), np.float32)  # the pooled output's shape
    conv.needs_input_grad = not first
    expected, dx_layers, grads = one_by_one(layers, x, g)
    assert np.array_equal(step.forward(x), expected)
    dx = step.backward(g)
    for name in grads:
        np.testing.assert_allclose(conv.grads[name], grads[name], rtol=1e-5, atol=1e-5)
    assert (dx is None) == first == (dx_layers is None)
    if not first:
        np.testing.assert_allclose(dx, dx_layers, rtol=1e-5, atol=1e-5)


def test_nan_stays_nan_and_backward_needs_forward():
    """A diverged conv's NaN passes the ReLU and the pool, as through the layers one by one."""
    conv = Conv2D(1, 2, 3, rng=0)
    conv.params["W"][1, 0, 0, 0] = np.nan
    (step,) = convpool.training_steps([conv, ReLU(), MaxPool2D(2)])
    x = random_array(0, (2, 1, 8, 8), np.float32)
    out = step.forward(x)
    assert np.isnan(out[:, 1]).all() and np.isfinite(out[:, 0]).all()
    with pytest.raises(RuntimeError, match="before forward"):
        convpool.training_steps([conv, MaxPool2D(2)])[0].backward(out)


@pytest.mark.parametrize("kind", ["shared", "sparse"])
def test_a_pruned_or_shared_conv_trains_in_the_step_as_through_its_own_backward(kind):
    """optim's convs offer their dense weights (step_params) and take the step's dW back
    (set_step_grads): the same gradients, for their own parameters, as their backward gives."""
    from optim import pruning, sharing, sparse  # optim builds on minicnn, the test may use both

    model = Sequential([Conv2D(3, 20, 3, rng=0), ReLU(), MaxPool2D(2), Flatten(), Dense(20 * 4 * 4, 4, rng=1)],
                       input_shape=(3, 10, 10))
    if kind == "shared":
        model = sharing.share_weights(model, 3)
    else:
        pruning.apply_masks(model, pruning.global_masks(model, 0.7))
        model = sparse.to_sparse(model)
    conv = model.layers[0]
    x, g = random_array(0, (5, 3, 10, 10), np.float32), random_array(1, (5, 20, 4, 4), np.float32)
    (step,) = convpool.training_steps(model.layers[:3])
    expected, dx_layers, grads = one_by_one(model.layers[:3], x, g)
    np.testing.assert_allclose(step.forward(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step.backward(g), dx_layers, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        np.testing.assert_allclose(conv.grads[name], grad, rtol=1e-4, atol=1e-4)


def test_which_layers_make_a_step():
    def kinds(layers):
        return [type(s).__name__ if not isinstance(s, convpool.ConvPool) else f"ConvPool{len(s.layers)}"
                for s in convpool.training_steps(layers)]

    conv = Conv2D(1, 2, 3, rng=0)
    assert kinds([conv, ReLU(), MaxPool2D(2), ReLU(), Flatten()]) == ["ConvPool3", "ReLU", "Flatten"]
    assert kinds([conv, MaxPool2D(2), ReLU(), ReLU()]) == ["ConvPool3", "ReLU"]
    assert kinds([conv, MaxPool2D(3)]) == ["Conv2D", "MaxPool2D"]
    assert kinds([conv, MaxPool2D(2, stride=1)]) == ["Conv2D", "MaxPool2D"]
    assert kinds([conv, ReLU(), ReLU(), MaxPool2D(2)]) == ["Conv2D", "ReLU", "ReLU", "MaxPool2D"]
    assert kinds([MaxPool2D(2), conv]) == ["MaxPool2D", "Conv2D"]


def test_a_float64_step_runs_its_layers_and_bad_input_is_named():
    x = random_array(0, (2, 1, 28, 28))
    expected = x
    for layer in zoo.lenet5(seed=0).astype(np.float64).layers:
        expected = layer.forward(expected)
    assert np.array_equal(zoo.lenet5(seed=0).astype(np.float64).forward(x), expected)
    step = convpool.training_steps([Conv2D(2, 3, 3, rng=0), MaxPool2D(2)])[0]
    with pytest.raises(ValueError, match="expects 2 input channels"):
        step.forward(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="larger than the input"):
        step.forward(np.zeros((1, 2, 3, 3), np.float32))


def test_training_through_the_steps_matches_float64():
    """Sequential's gradients (through the steps, float32) against the float64 layers one by one."""
    model = zoo.lenet5(seed=0)
    exact = zoo.lenet5(seed=0).astype(np.float64)
    x = random_array(0, (12, 1, 28, 28), np.float32)  # the dense kernel's rows: a group of 8, then 4 alone
    g = random_array(1, (12, 10), np.float32)
    np.testing.assert_allclose(model.forward(x), exact.forward(x.astype(np.float64)), rtol=1e-4, atol=1e-4)
    dx = model.backward(g, input_grad=True)
    dx_exact = exact.backward(g.astype(np.float64), input_grad=True)
    np.testing.assert_allclose(dx, dx_exact, atol=1e-4 * np.abs(dx_exact).max())
    for ours, theirs in zip(model.layers, exact.layers):
        for name in ours.grads:
            scale = np.abs(theirs.grads[name]).max()
            np.testing.assert_allclose(ours.grads[name], theirs.grads[name], atol=1e-4 * scale)


def test_kept_buffers_are_not_copied_or_kept_after_fit():
    model = Sequential([Conv2D(1, 4, 3, rng=0), MaxPool2D(2), Flatten(), Dense(4 * 13 * 13, 3, rng=0)])
    x = random_array(0, (8, 1, 28, 28), np.float32)
    model.forward(x)
    assert "_steps" in vars(model) and "_steps" not in vars(pickle.loads(pickle.dumps(model)))
    fit(model, x, np.arange(8) % 3, epochs=1, batch_size=4, verbose=False)
    assert "_steps" not in vars(model) and all(layer.cache is None for layer in model.layers)


def test_the_portable_build_agrees_with_the_reference():
    run_without_avx512(
        "import numpy as np\n"
        "from minicnn import convpool\n"
        "rng = np.random.default_rng(0)\n"
        "for C, F, K, relu in ((1, 20, 5, False), (20, 50, 5, True)):\n"
        "    x = rng.standard_normal((9, C, 12, 12)).astype(np.float32)\n"
        "    W = rng.standard_normal((F, C, K, K)).astype(np.float32)\n"
        "    out, codes, xp = convpool.conv_pool_forward(x, W, np.zeros(F, np.float32), 1, 0, relu)\n"
        "    assert np.allclose(out, convpool.conv_pool_forward_ref(x, W, np.zeros(F, np.float32), 1, 0, relu)[0],\n"
        "                       rtol=1e-5, atol=1e-4)\n"
        "    g = rng.standard_normal(out.shape).astype(np.float32)\n"
        "    for fast, ref in zip(convpool.conv_pool_backward(g, codes, xp, W, 1, 0),\n"
        "                         convpool.conv_pool_backward_ref(g, codes, x, W, 1, 0)):\n"
        "        assert np.allclose(fast, ref, rtol=1e-4, atol=1e-3), np.abs(fast - ref).max()\n"
        "print('ok')\n"
    )
