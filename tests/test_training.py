"""Optimizers, the training loop and evaluation."""

import numpy as np
import pytest

import minicnn
from minicnn import SGD, Adam, Dense, Flatten, Sequential, datasets, parallel, zoo
from minicnn.optimizers import adam_update, adam_update_ref


@pytest.fixture(scope="module")
def mnist():
    return datasets.load("mnist10k")


def one_param_layer(w, g):
    layer = Dense(1, 1, rng=0)
    layer.params = {"W": np.array([[w]], np.float64)}
    layer.grads = {"W": np.array([[g]], np.float64)}
    return layer


def test_sgd_momentum_hand_computed():
    layer, opt = one_param_layer(1.0, 0.5), SGD(lr=0.1, momentum=0.9)
    opt.step([layer])  # v = 0.5, w = 1 - 0.05
    opt.step([layer])  # v = 0.9*0.5 + 0.5 = 0.95, w = 0.95 - 0.095
    assert layer.params["W"].item() == pytest.approx(0.855)


def test_adam_first_step_moves_by_lr():
    # With bias correction, Adam's first step is lr * g / |g| = lr * sign(g).
    layer = one_param_layer(1.0, -3.0)
    Adam(lr=0.01).step([layer])
    assert layer.params["W"].item() == pytest.approx(1.01, rel=1e-6)


def test_adam_follows_the_textbook_formula_even_where_eps_matters():
    # Gradients of 1e-9 to 1: eps = 1e-8 dominates the smallest, so the eps placement shows.
    g = np.array([[1e-9, -3e-8, 1e-4, 1.0]])
    layer = Dense(1, 4)
    layer.params["W"] = np.zeros((1, 4))
    w, m, v = np.zeros(4), np.zeros(4), np.zeros(4)
    adam = Adam(lr=0.01)
    for t in range(1, 4):
        layer.grads["W"] = g * t
        adam.step([layer])
        m = 0.9 * m + 0.1 * g[0] * t
        v = 0.999 * v + 0.001 * (g[0] * t) ** 2
        w -= 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        np.testing.assert_allclose(layer.params["W"][0], w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("build", ["threaded", "serial"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_fast_adam_update_matches_reference(build, dtype, contiguous):
    rng = np.random.default_rng(0)
    p, g, m = (rng.standard_normal((30, 7)).astype(dtype) for _ in range(3))
    v = rng.random((30, 7)).astype(dtype)
    if not contiguous:
        p, g, m, v = p.T, g.T, m.T, v.T
    ours, ref = [a.copy() for a in (p, g, m, v)], [a.copy() for a in (p, g, m, v)]
    for _ in range(3):
        with parallel.forced(build):
            adam_update(*ours, 0.9, 0.999, 3e-3, 1e-8)
        adam_update_ref(*ref, 0.9, 0.999, 3e-3, 1e-8)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for name, a, b in zip("pgmv", ours, ref):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol, err_msg=f"{name}: ours vs reference")
    assert not np.array_equal(ours[0], p)  # the step moved the parameters, in place


@pytest.mark.parametrize("make", [lambda: SGD(lr=0), lambda: Adam(lr=-1), lambda: SGD(0.1, momentum=1.0)])
def test_bad_optimizer_settings(make):
    with pytest.raises(ValueError):
        make()


def test_short_training_run_learns(mnist):
    x, y, xt, yt = mnist
    model = zoo.lenet300(seed=0)
    history = minicnn.fit(model, x, y, epochs=2, batch_size=64, optimizer=Adam(1e-3), seed=0, verbose=False)
    assert history["loss"][1] < history["loss"][0]
    assert minicnn.evaluate(model, xt, yt) >= 0.90  # measured 0.92


def test_same_seed_same_result(mnist):
    x, y = mnist[0][:512], mnist[1][:512]
    runs = []
    for _ in range(2):
        model = zoo.seed_cnn(seed=1)
        minicnn.fit(model, x, y, epochs=1, batch_size=64, seed=5, verbose=False)
        runs.append(model.layers[0].params["W"].copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_constraint_runs_after_every_step(mnist):
    x, y = mnist[0][:300], mnist[1][:300]
    model = Sequential([Flatten(), Dense(784, 10, rng=0)])
    mask = np.random.default_rng(0).random((784, 10)) < 0.5
    calls = []

    def keep_masked(m):
        calls.append(1)
        m.layers[1].params["W"] *= mask

    minicnn.fit(model, x, y, epochs=2, batch_size=100, constraint=keep_masked, verbose=False)
    assert len(calls) == 6
    assert not model.layers[1].params["W"][~mask].any()


def test_custom_loss_gets_batch_indices(mnist):
    x, y = mnist[0][:128], mnist[1][:128]
    seen = []

    def loss(z, idx):
        seen.extend(idx.tolist())
        return minicnn.losses.cross_entropy(z, y[idx])

    minicnn.fit(zoo.lenet300(), x, y, epochs=1, batch_size=50, loss=loss, verbose=False)
    assert sorted(seen) == list(range(128))


def test_evaluate_takes_anything_with_predict():
    class Constant:
        def predict(self, x, batch_size=256):
            return np.tile([0.0, 1.0], (len(x), 1))

    assert minicnn.evaluate(Constant(), np.zeros((4, 1, 2, 2), np.float32), np.array([1, 1, 0, 1])) == 0.75


@pytest.mark.parametrize("x,y,message", [
    (np.zeros((4, 1, 28, 28), np.float32), np.array([0, 1, 2]), "3 labels for 4 samples"),
    (np.zeros((4, 1, 28, 28), np.float32), np.array([0, 1, 2, 10]), r"\[0, 10\)"),
    (np.zeros((4, 28, 28), np.float32), np.array([0, 1, 2, 3]), "rank 4"),
    (np.zeros((4, 1, 28, 28), np.uint8), np.array([0, 1, 2, 3]), "floating"),
    (np.full((4, 1, 28, 28), np.nan, np.float32), np.array([0, 1, 2, 3]), "non-finite"),
])
def test_fit_rejects_bad_data(x, y, message):
    with pytest.raises((ValueError, TypeError), match=message):
        minicnn.fit(zoo.lenet300(), x, y, epochs=1, verbose=False)


def test_backward_skips_the_image_gradient_unless_asked():
    model = zoo.lenet5(seed=0)
    x = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    _, dz = minicnn.losses.cross_entropy(model.forward(x), np.arange(4))
    assert model.backward(dz) is None
    skipped = [g.copy() for layer in model.layers for g in layer.grads.values()]
    dx = model.backward(dz, input_grad=True)
    assert dx.shape == x.shape
    for ours, expected in zip(skipped, [g for layer in model.layers for g in layer.grads.values()]):
        np.testing.assert_array_equal(ours, expected)
    assert model.layers[0].needs_input_grad  # told for one call only
