"""minicnn.chain: a small batch's stages in one parallel loop, the same numbers as the stages one by one."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, chain, direct, narrow, parallel, zoo
from minicnn.inference import CHAIN_BATCH, Inference

# The chain runs when its work would run threaded: on Numba's workqueue layer (no TBB) only from 2^24
# multiply-adds, more than these networks do below a batch of 8.
needs_tbb = pytest.mark.skipif(parallel.MIN_MACS > 1 << 19, reason="Numba's TBB layer not loaded: nothing chains")


def images(n, seed=0, side=28):
    return np.random.default_rng(seed).random((n, 1, side, side), dtype=np.float32)


def chained(inference, x):
    """The output of inference on x, asserting that it ran as one chain step."""
    out = inference(x)
    assert len(inference.bound[x.shape]) == 1, "not run as a chain"
    return out


@needs_tbb
@pytest.mark.parametrize("name", ["lenet5", "seed_cnn", "small_cnn"])
@pytest.mark.parametrize("mode", ["serial", "threaded"])
def test_a_small_batch_as_one_chain_is_the_stages_bit_for_bit(name, mode):
    """The chain runs the stages' own task kernels: whoever claims a task, it writes the same bits."""
    model = zoo.build(name, seed=3)
    for n in (3, CHAIN_BATCH - 1):  # enough work to run threaded: the chain declines less
        x = images(n, seed=n)
        inference = Inference(model.layers)
        with parallel.forced(mode):
            stages = Inference(model.layers)._bind_stages(x)[1].copy()
            for _ in range(20):  # claims race differently from call to call
                np.testing.assert_array_equal(chained(inference, x), stages)
        np.testing.assert_allclose(inference(x), model.forward(x), rtol=0, atol=2e-5)


@needs_tbb
def test_a_padded_first_conv_chains_and_a_later_one_does_not():
    rng = np.random.default_rng(0)
    first = Sequential([Conv2D(1, 32, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2), Flatten(),
                        Dense(32 * 14 * 14, 10, rng=rng)], input_shape=(1, 28, 28))
    x = images(3)
    np.testing.assert_allclose(chained(Inference(first.layers), x), first.forward(x), rtol=0, atol=2e-5)
    later = Sequential([Conv2D(1, 32, 3, rng=rng), ReLU(), Conv2D(32, 16, 3, padding=1, rng=rng), Flatten(),
                        Dense(16 * 26 * 26, 10, rng=rng)], input_shape=(1, 28, 28))
    inference = Inference(later.layers)
    np.testing.assert_allclose(inference(x), later.forward(x), rtol=0, atol=2e-5)
    assert len(inference.bound[x.shape]) > 1


@needs_tbb
def test_a_chained_predict_follows_weights_changed_in_place_or_replaced():
    model = zoo.lenet5(seed=0)
    x = images(1)
    before = model.predict(x)
    assert len(model._inference.run.bound[x.shape]) == 1, "not run as a chain"
    model.layers[2].params["W"][3, 1] *= -3.0  # conv2's packed weights must follow
    after = model.predict(x)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, model.forward(x), rtol=0, atol=2e-5)
    model.layers[5].params["W"][:, 7] += 0.5
    model.layers[-1].params["b"][2] -= 1.0
    np.testing.assert_allclose(model.predict(x), model.forward(x), rtol=0, atol=2e-5)
    model.layers[0].params["W"] = model.layers[0].params["W"] * -0.5  # new arrays, not edits
    model.layers[5].params = {"W": model.layers[5].params["W"] * 0.5, "b": model.layers[5].params["b"] + 1.0}
    np.testing.assert_allclose(model.predict(x), model.forward(x), rtol=0, atol=2e-5)


@needs_tbb
def test_weight_shared_layers_chain_on_their_dense_weights_and_sparse_ones_keep_their_stage():
    """A layer of another class chains through chain_params: a weight-shared LeNet-5 (dense weights
    decoded) in one chain (its stage sums fc1 in the input's order, the chain in Flatten's: the same
    numbers to rounding); a pruned fc1 that predict runs on its sparse kernel keeps the stages;
    retraining the codebook reaches the chain."""
    from optim import pruning, sharing, sparse  # optim builds on minicnn, the test may use both

    x = images(1)
    shared = sharing.share_weights(zoo.lenet5(seed=0), 4)
    inference = Inference(shared.layers)
    np.testing.assert_allclose(chained(inference, x), shared.forward(x), rtol=0, atol=2e-5)
    shared.layers[2].params["codebook"] *= 0.5  # in place, as an optimizer step does after backward
    shared.forward(x)
    shared.backward(np.ones((1, 10), np.float32))  # backward empties the laid-out weights
    np.testing.assert_allclose(chained(inference, x), shared.forward(x), rtol=0, atol=2e-5)
    pruned = zoo.lenet5(seed=0)
    pruning.apply_masks(pruned, pruning.global_masks(pruned, 0.95))
    pruned = sparse.to_sparse(pruned)
    assert pruned.layers[5].density < 0.15 and pruned.layers[5].chain_params() is None
    inference = Inference(pruned.layers)
    np.testing.assert_allclose(inference(x), pruned.forward(x), rtol=0, atol=2e-5)
    assert len(inference.bound[x.shape]) > 1


def stages_of(rng, N, side, C, filters, kernel, pool, units):
    """A random plan: conv (+ ReLU, pool) -> flatten -> dense (ReLU) -> classifier, its buffers and weights."""
    xp = rng.standard_normal((N, side, side, C)).astype(np.float32)
    W = rng.standard_normal((filters, C, kernel, kernel)).astype(np.float32)
    rows = [chain.conv_stage(xp.shape, filters, kernel, 1, True, pool)]
    shape = direct.output_shape(xp.shape, filters, kernel, 1, pool)
    K = int(np.prod(shape[1:]))
    rows += [chain.dense_stage(N, K, units, True), chain.dense_stage(N, units, 3, False)]
    order = narrow.input_order(shape)  # as minicnn.inference gives it: rows of W for a narrow stage
    at = [np.zeros(0, np.int64), order if units <= narrow.MAX_OUTPUTS else np.argsort(order), np.arange(units)]
    acts = [xp, np.empty(shape, np.float32), np.empty((N, units), np.float32), np.empty((N, 3), np.float32)]
    weights = [W, rng.standard_normal((K, units)).astype(np.float32),
               rng.standard_normal((units, 3)).astype(np.float32)]
    biases = [rng.standard_normal(n).astype(np.float32) for n in (filters, units, 3)]
    return rows, acts, at, weights, biases


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 5), st.integers(6, 11), st.integers(1, 3), st.integers(1, 40), st.integers(1, 3),
       st.booleans(), st.integers(1, 300), st.integers(0, 2**16))
def test_chain_is_its_tasks_in_order(N, side, C, filters, kernel, pool, units, seed):
    """Chain() (threaded or serial) against run_stages_ref, the tasks one after the other: bit for bit."""
    rows, acts, at, weights, biases = stages_of(np.random.default_rng(seed), N, side, C, filters, kernel, pool, units)
    c = chain.Chain(rows, acts, at)
    for s, (w, b) in enumerate(zip(weights, biases)):
        c.set_arrays(s, w, b)
    expected = [a.reshape(-1).copy() for a in acts]
    read = (direct.pack_filters(weights[0], 1, pool), *(w.reshape(-1) for w in weights[1:]))
    chain.run_stages_ref(c.plan, tuple(expected), read, tuple(biases), tuple(at))
    for mode in ("serial", "threaded"):
        with parallel.forced(mode):
            np.testing.assert_array_equal(c(), expected[-1].reshape(N, 3))


@pytest.mark.parametrize("mode", ["serial", "threaded"])
@pytest.mark.parametrize("C", [3, 1])  # one channel: the blocks packed as quads (direct.quads)
def test_the_chain_repacks_the_blocks_of_filters_changed_in_place(mode, C):
    """The loop's first tasks compare each block of 32 filters with the copy it was packed from."""
    rows, acts, at, weights, biases = stages_of(np.random.default_rng(5), 2, 9, C, 70, 3, True, 40)
    c = chain.Chain(rows, acts, at)
    for s, (w, b) in enumerate(zip(weights, biases)):
        c.set_arrays(s, w, b)
    W = weights[0]
    with parallel.forced(mode):
        c()
        W[40, C - 1, 1, 0] = -W[40, C - 1, 1, 0] - 1.0  # block 1 of 3
        W[69] *= 2.0  # the last, narrow block
        weights[1][5] += 1.0  # a dense layer's weights are read in place
        got = c().copy()
    source, packed = c.packs[0]
    np.testing.assert_array_equal(source, W.reshape(-1))
    np.testing.assert_array_equal(packed, direct.pack_filters(W, 1, True))
    expected = [a.reshape(-1).copy() for a in acts]
    read = (direct.pack_filters(W, 1, True), *(w.reshape(-1) for w in weights[1:]))
    chain.run_stages_ref(c.plan, tuple(expected), read, tuple(biases), tuple(at))
    np.testing.assert_array_equal(got, expected[-1].reshape(2, 3))
