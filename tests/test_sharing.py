"""optim.sharing and optim.deep_compression: k-means, shared layers, their files, the pipeline."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, parallel
from optim import deep_compression, sharing
from optim.sharing import clustering
from optim.sparse import csr_layer
from optim.bitpack import pack_bits, unpack_bits
from optim.sharing import SharedConv2D, SharedDense

from gradcheck import check_layer_gradients

weights_and_k = st.tuples(st.integers(0, 2**32 - 1), st.integers(2, 300), st.integers(2, 20),
                          st.sampled_from(sharing.INITS))


def draw_weights(seed, n, distinct=None):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(n) * 0.1).astype(np.float32)
    if distinct is not None:
        w = rng.choice(w[:distinct], n).astype(np.float32)
    return w


# --------------------------------------------------------------------------
# k-means


@given(weights_and_k, st.sampled_from([0.0, 1e-8, 1e-3, 1.0]), st.sampled_from([1, 2, 5, clustering.MAX_ROUNDS]))
def test_lloyd_objective_never_increases_and_stops_by_its_rule(args, tol, cap):
    seed, n, k, init = args
    w = draw_weights(seed, max(n, k))
    result = sharing.kmeans(w, k, init=init, seed=seed, tol=tol, iterations=cap)
    J = np.array(result.objective)
    assert np.all(np.diff(J) <= 1e-12 * max(J[0], 1e-30)), f"objective went up: {J}"
    final = ((w.astype(np.float64) - result.centroids[result.labels]) ** 2).sum()
    assert np.isclose(final, J[-1], rtol=1e-12, atol=1e-30)
    assert 1 <= result.rounds == J.size <= cap
    # it stopped for a reason: a fixed point, the tolerance, or the cap; and not earlier
    _, _, moved = clustering.lloyd_round(np.sort(w).astype(np.float64), result.centroids)
    fixed = np.array_equal(moved, result.centroids)
    within_tol = J.size > 1 and J[-2] - J[-1] <= tol * J[-2]
    assert result.converged == (fixed or within_tol), (result.converged, fixed, within_tol, J[-3:])
    assert result.converged or result.rounds == cap
    assert not np.any(J[:-2] - J[1:-1] <= tol * J[:-2]), f"went on after J fell by <= tol * J: {J}"


@given(weights_and_k)
def test_default_runs_to_a_fixed_point(args):
    seed, n, k, init = args
    w = draw_weights(seed, max(n, k))
    result = sharing.kmeans(w, k, init=init, seed=seed)
    assert result.converged and 1 <= result.rounds <= clustering.MAX_ROUNDS
    again = sharing.kmeans(w, k, init=init, seed=seed, tol=0.0)
    np.testing.assert_array_equal(again.centroids, result.centroids)  # the default is tol = 0
    _, J, moved = clustering.lloyd_round(np.sort(w).astype(np.float64), result.centroids)
    np.testing.assert_array_equal(moved, result.centroids, err_msg="a round from the result moves its centroids")
    assert J == result.objective[-1]


def test_rounds_on_a_layer_sized_sample():
    w = np.random.default_rng(0).laplace(0, 0.03, 20_000).astype(np.float32)  # trained weights are peaked
    few = sharing.kmeans(w, 32, iterations=50)
    full = sharing.kmeans(w, 32)
    assert not few.converged and few.rounds == 50
    assert full.converged and 50 < full.rounds < clustering.MAX_ROUNDS, full.rounds
    assert full.objective[-1] < few.objective[-1]
    _, _, moved = clustering.lloyd_round(np.sort(w).astype(np.float64), full.centroids)
    np.testing.assert_array_equal(moved, full.centroids)
    loose = sharing.kmeans(w, 32, tol=1e-3)
    assert loose.rounds < full.rounds and loose.objective[-1] >= full.objective[-1]


def test_rounds_hand_computed():
    w = np.array([0.0, 1.0, 2.0, 10.0, 11.0])
    # linear start [0, 5.5, 11]: clusters {0, 1, 2}, {}, {10, 11}, J = 1 + 4 + 1; the empty
    # centroid goes to the worst-fitted weight, 2: [1, 2, 10.5], J = 1 + 2 * 0.25; then 1 leaves
    # the first cluster: [0.5, 2, 10.5], J = 4 * 0.25, and the next update moves nothing
    result = sharing.kmeans(w, 3)
    assert result.objective == [6.0, 1.5, 1.0] and result.rounds == 3 and result.converged
    np.testing.assert_array_equal(result.centroids, [0.5, 2.0, 10.5])
    np.testing.assert_array_equal(result.labels, [0, 0, 1, 2, 2])
    assert sharing.kmeans(w, 3, tol=1.0).rounds == 2  # any fall of J is <= 1 * J
    capped = sharing.kmeans(w, 3, iterations=2)
    assert capped.rounds == 2 and not capped.converged and capped.objective == [6.0, 1.5]


@given(st.integers(0, 2**32 - 1), st.integers(2, 400), st.integers(2, 40), st.integers(0, 3))
def test_sorted_round_matches_the_reference(seed, n, k, case):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n)
    if case == 1:
        w = rng.choice(w[:5], n)  # repeated weights
    k = min(k, n)
    centroids = np.sort(rng.choice(np.concatenate([w, rng.standard_normal(k)]), k))  # some exactly on weights
    if case == 2:
        centroids[k // 2] = centroids[k // 2 - 1]  # equal centroids: the first takes all
    if case == 3:
        centroids = np.sort(np.concatenate([w[: k // 2], (w[: k - k // 2] + w[1 : 1 + k - k // 2]) / 2]))  # midpoints
    ws = np.sort(w)
    starts = clustering.cluster_starts(ws, centroids)
    np.testing.assert_array_equal(np.repeat(np.arange(k), np.diff(starts)), clustering.assign_ref(ws, centroids))
    counts, J, new = clustering.lloyd_round(ws, centroids)
    counts_ref, J_ref, new_ref = clustering.lloyd_round_ref(rng.permutation(w), centroids)
    np.testing.assert_array_equal(counts, counts_ref)
    assert np.isclose(J, J_ref, rtol=1e-12, atol=1e-300), (J, J_ref)
    np.testing.assert_allclose(new, new_ref, rtol=1e-12, atol=1e-12 * np.abs(w).max())


@given(weights_and_k)
def test_every_weight_is_assigned_to_its_nearest_centroid(args):
    seed, n, k, init = args
    w = draw_weights(seed, max(n, k)).astype(np.float64)
    result = sharing.kmeans(w, k, init=init, seed=seed)
    distances = np.abs(w[:, None] - result.centroids[None, :])
    ours = distances[np.arange(w.size), result.labels]
    assert np.all(ours <= distances.min(axis=1)), "a weight is nearer another centroid than its own"


@given(st.integers(0, 2**32 - 1), st.integers(1, 2000), st.integers(1, 300))
def test_numba_assignment_matches_brute_force(seed, n, k):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n)
    centroids = np.sort(rng.choice(np.concatenate([w, rng.standard_normal(k)]), k))  # some exactly on weights
    for build in ("threaded", "serial"):
        with parallel.forced(build):
            np.testing.assert_array_equal(clustering.assign(w, centroids), clustering.assign_ref(w, centroids),
                                          err_msg=build)


def test_assignment_hand_computed_with_ties():
    centroids = np.array([-1.0, 0.0, 0.0, 2.0])  # a duplicate centroid and a midpoint at 1.0
    ours = clustering.assign(np.array([-3.0, -0.5, 0.0, 0.9, 1.0, 1.1, 5.0]), centroids)
    np.testing.assert_array_equal(ours, [0, 0, 1, 1, 1, 3, 3])  # ties go to the lower centroid


@given(st.integers(0, 2**32 - 1), st.integers(2, 12), st.integers(0, 5), st.sampled_from(sharing.INITS))
def test_enough_clusters_reproduce_the_weights_exactly(seed, distinct, extra, init):
    w = draw_weights(seed, 200, distinct)
    k = min(np.unique(w).size + extra, w.size)
    result = sharing.kmeans(w, max(k, 2), init=init, seed=seed, iterations=200)
    np.testing.assert_array_equal(result.centroids.astype(np.float32)[result.labels], w)


def test_inits_hand_computed():
    w = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    np.testing.assert_allclose(clustering.init_centroids(w, 3, "linear"), [0, 5, 10])
    np.testing.assert_allclose(clustering.init_centroids(w, 3, "density"), [0, 2, 10])  # quantiles 0, 1/2, 1
    for method in ("random", "kmeans++"):
        c = clustering.init_centroids(w, 5, method, seed=3)
        np.testing.assert_array_equal(c, w)  # k = n distinct: every weight drawn once


def test_kmeans_plus_plus_never_draws_a_chosen_point_twice():
    w = np.repeat([0.0, 1.0, 7.0], [50, 1, 1])
    for seed in range(20):  # zero distance, zero probability
        assert np.unique(clustering.init_centroids(w, 3, "kmeans++", seed=seed)).size == 3


@pytest.mark.parametrize("call, message", [
    (lambda: sharing.kmeans(np.ones(5, np.float32), 1), "k .*>= 2"),
    (lambda: sharing.kmeans(np.arange(5.0), 6), "k = 6 clusters for only 5"),
    (lambda: sharing.kmeans(np.arange(5.0), 2, init="spread"), "unknown init"),
    (lambda: sharing.kmeans(np.array([1.0, np.nan]), 2), "non-finite"),
    (lambda: sharing.kmeans(np.arange(5.0), 2, tol=-1e-6), "tol .*must be a number in \\[0.0, 1.0\\]"),
    (lambda: sharing.kmeans(np.arange(5.0), 2, tol=float("nan")), "tol .*must be a number"),
    (lambda: sharing.kmeans(np.arange(5.0), 2, tol=2), "tol .*must be a number"),
    (lambda: sharing.kmeans(np.arange(5.0), 2, tol="1e-6"), "tol .*must be a number"),
    (lambda: sharing.kmeans(np.arange(5.0), 2, iterations=0), "iterations .*must be an integer >= 1"),
    (lambda: sharing.share_weights(Sequential([Flatten(), Dense(784, 10, rng=0)]), 4, tol=-1), "tol"),
    (lambda: SharedDense.from_layer(Dense(4, 3, rng=0), 0), "bits must be an integer in 1..16"),
    (lambda: SharedDense.from_layer(Dense(4, 3, rng=0), 17), "bits must be an integer in 1..16"),
    (lambda: SharedDense.from_layer(Dense(4, 3, rng=0), 4), "k = 16 clusters for only 12"),
    (lambda: sharing.share_weights(Sequential([Flatten(), Dense(784, 10, rng=0)]), {"conv": 4}), "no bits given"),
    (lambda: sharing.share_weights(Sequential([Flatten(), Dense(784, 2, rng=0)]), 11), "2048 clusters"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_wrong_layer_type():
    with pytest.raises(TypeError, match="expected a Dense layer, got Conv2D"):
        SharedDense.from_layer(Conv2D(1, 2, 3, rng=0), 2)


@given(st.lists(st.integers(0, 2**16 - 1), max_size=50), st.integers(1, 16))
def test_bit_packing_round_trips(values, bits):
    values = np.array(values, np.int64) % (2**bits)
    packed = pack_bits(values, bits)
    assert packed.size == (values.size * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, values.size), values)


# --------------------------------------------------------------------------
# Shared layers


def pruned_dense(seed, n_in=30, n_out=8, density=0.3):
    layer = Dense(n_in, n_out, rng=seed)
    rng = np.random.default_rng(seed)
    layer.params["W"][rng.random(layer.params["W"].shape) >= density] = 0
    return layer


def pruned_conv(seed, density=0.4):
    layer = Conv2D(3, 4, 3, stride=2, padding=1, rng=seed)
    rng = np.random.default_rng(seed)
    layer.params["W"][rng.random(layer.params["W"].shape) >= density] = 0
    return layer


@pytest.mark.parametrize("use_sparse_kernel", [False, True])
def test_shared_layers_compute_with_their_centroids(monkeypatch, use_sparse_kernel):
    below = {1: 2.0 if use_sparse_kernel else 0.0}
    monkeypatch.setattr(csr_layer, "SPARSE_BELOW", {"dense": below, "conv2d": below})
    rng = np.random.default_rng(0)
    for original, x in ((pruned_dense(1), rng.standard_normal((5, 30))),
                        (pruned_conv(2), rng.standard_normal((2, 3, 7, 7)))):
        x = x.astype(np.float32)
        shared = (SharedDense if isinstance(original, Dense) else SharedConv2D).from_layer(original, 3)
        W = shared.to_dense().params["W"]
        np.testing.assert_array_equal(W == 0, original.params["W"] == 0)  # pruned zeros stay zero
        assert np.unique(W[W != 0]).size <= 8 and np.isin(W[W != 0], shared.params["codebook"]).all()
        twin = shared.to_dense()
        for n in (1, len(x)):
            np.testing.assert_allclose(shared.forward(x[:n]), twin.forward(x[:n]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, x_shape", [
    (lambda: SharedDense.from_layer(pruned_dense(3, 6, 4, 0.6), 2), (3, 6)),
    (lambda: SharedDense.from_layer(Dense(5, 3, rng=4), 2), (2, 5)),
    (lambda: SharedConv2D.from_layer(pruned_conv(5), 3), (2, 3, 5, 5)),
])
def test_shared_layer_gradients(make, x_shape):
    check_layer_gradients(make(), np.random.default_rng(1).standard_normal(x_shape))


def test_codebook_gradient_is_the_sum_over_each_cluster():
    dense = pruned_dense(6)
    shared = SharedDense.from_layer(dense, 2)
    twin = shared.to_dense()
    x = np.random.default_rng(2).standard_normal((4, 30)).astype(np.float32)
    g = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
    shared.forward(x), twin.forward(x)
    np.testing.assert_allclose(shared.backward(g), twin.backward(g), rtol=1e-5, atol=1e-6)
    dW = twin.grads["W"].T.reshape(-1)[shared.positions]
    expected = [dW[shared.labels == j].sum() for j in range(4)]
    np.testing.assert_allclose(shared.grads["codebook"], expected, rtol=1e-5, atol=1e-6)


def tiny_cnn(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Conv2D(1, 4, 3, rng=rng), MaxPool2D(2), ReLU(), Flatten(), Dense(4 * 13 * 13, 10, rng=rng)])


@pytest.fixture(scope="module")
def mnist_small():
    x_train, y_train, x_test, y_test = minicnn.datasets.load("mnist10k")
    return x_train[:2000], y_train[:2000], x_test[:500], y_test[:500]


def test_fine_tuning_keeps_every_weight_on_its_centroid(mnist_small):
    x, y, _, _ = mnist_small
    model = tiny_cnn()
    model.layers[4].params["W"][:, ::3] = 0  # a pruned layer beside a dense one
    shared = sharing.share_weights(model, {"conv": 3, "fc": 4})
    before = [layer.params["codebook"].copy() for layer in shared.layers if hasattr(layer, "labels")]
    labels = [layer.labels.copy() for layer in shared.layers if hasattr(layer, "labels")]
    minicnn.fit(shared, x, y, epochs=1, optimizer=minicnn.Adam(1e-3), verbose=False)
    for i, layer in enumerate(layer for layer in shared.layers if hasattr(layer, "labels")):
        assert not np.array_equal(layer.params["codebook"], before[i]), "the centroids did not train"
        np.testing.assert_array_equal(layer.labels, labels[i])
        W = layer.to_dense().params["W"]
        nonzero = W[W != 0]
        assert np.isin(nonzero, layer.params["codebook"]).all() and np.unique(nonzero).size <= layer.clusters
    assert (shared.layers[4].to_dense().params["W"][:, ::3] == 0).all(), "a pruned weight grew back"


def test_one_sgd_step_moves_each_centroid_by_its_summed_gradient():
    shared = SharedDense.from_layer(pruned_dense(7), 2)
    model = Sequential([shared], input_shape=(30,))
    x = np.random.default_rng(0).standard_normal((6, 30)).astype(np.float32)
    y = np.arange(6) % 8
    before = shared.params["codebook"].copy()
    dense = Sequential([shared.to_dense()], input_shape=(30,))
    _, dz = minicnn.losses.cross_entropy(dense.forward(x), y)
    dense.backward(dz)
    dW = dense.layers[0].grads["W"].T.reshape(-1)[shared.positions]
    minicnn.fit(model, x, y, epochs=1, batch_size=6, optimizer=minicnn.SGD(0.5), verbose=False)
    expected = before - 0.5 * np.bincount(shared.labels, weights=dW, minlength=4)
    np.testing.assert_allclose(shared.params["codebook"], expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("coding", sharing.CODINGS)
@pytest.mark.parametrize("index_bits", [None, 1, 3])
def test_file_round_trip_is_bit_exact(tmp_path, coding, index_bits):
    model = tiny_cnn(1)
    model.layers[4].params["W"][np.random.default_rng(0).random((676, 10)) < 0.9] = 0
    shared = sharing.share_weights(model, {"conv": 2, "fc": 5}, coding=coding, index_bits=index_bits)
    path = tmp_path / "shared.npz"
    shared.save(path)
    loaded = minicnn.load(path)
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), shared.predict(x))
    for ours, theirs in zip(loaded.layers, shared.layers):
        if hasattr(ours, "labels"):
            np.testing.assert_array_equal(ours.positions, theirs.positions)
            np.testing.assert_array_equal(ours.labels, theirs.labels)
            np.testing.assert_array_equal(ours.params["codebook"], theirs.params["codebook"])
            assert ours.stats() == theirs.stats()
    if index_bits == 1:  # 1-bit relative indices at 10% density: many fillers, symbol k in the stream
        assert shared.layers[4].storage()["entries"] > shared.layers[4].positions.size
    assert "SharedDense" in loaded.summary()


def test_huffman_file_is_smaller_than_packed_and_stats_are_the_array_bytes():
    model = tiny_cnn(2)
    model.layers[4].params["W"][np.random.default_rng(0).random((676, 10)) < 0.9] = 0
    shared = sharing.share_weights(model, {"conv": 2, "fc": 4})
    layer = shared.layers[4]
    s = layer.storage()
    assert s["bytes_huffman"] < s["bytes_packed"], s
    assert layer.stats()["bytes"] == layer.state()["data"].nbytes == s["bytes_huffman"]
    # packed: 4-bit weight indices (or 5 with the filler symbol) and index_bits-bit relative indices
    assert s["weight_bits_packed"] >= 4 and s["index_bits_packed"] >= s["index_bits"]


def corrupt_file(tmp_path, edit):
    model = Sequential([Flatten(), Dense(784, 10, rng=0)])
    model.layers[1].params["W"][::2] = 0
    path = tmp_path / "shared.npz"
    sharing.share_weights(model, 4).save(path)
    meta, arrays = minicnn.serialization.read_npz(path)
    edit(meta, arrays)
    bad = tmp_path / "bad.npz"
    minicnn.serialization.write_npz(bad, meta, arrays)
    return bad


@pytest.mark.parametrize("edit, message", [
    (lambda meta, a: a.update({"layers.1.data": a["layers.1.data"][:-5]}), "truncated"),
    (lambda meta, a: a.update({"layers.1.data": a["layers.1.data"][:30]}), "cannot hold"),
    (lambda meta, a: meta["layers"][1]["config"].update({"clusters": 8}), "codebook/index mismatch|truncated|corrupt"),
    (lambda meta, a: meta["layers"][1]["config"].update({"clusters": 1}), "clusters must be an integer"),
    (lambda meta, a: meta["layers"][1]["config"].update({"index_bits": 17}), "index_bits must be an integer in 1..16"),
    (lambda meta, a: a.pop("layers.1.data"), "missing its 'data' array"),
])
def test_corrupt_files_are_clear_errors(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        minicnn.load(corrupt_file(tmp_path, edit))


def test_codebook_index_mismatch_is_named(tmp_path):
    layer = SharedDense.from_layer(pruned_dense(0, density=0.5), 3)
    config, data = layer.config(), layer.state()["data"]
    config["clusters"] = 4  # the streams hold indices up to 7 (and 8 for fillers)
    data = np.concatenate([data[:16], data[32:]])  # a codebook of 4 where the file had 8
    with pytest.raises(ValueError, match="codebook/index mismatch.*codebook has 4 entries"):
        SharedDense.from_state(config, {"data": data})


# --------------------------------------------------------------------------
# The pipeline and the table


def test_deep_compression_pipeline_and_table(tmp_path, mnist_small):
    x, y, x_test, y_test = mnist_small
    model = tiny_cnn(3)
    minicnn.fit(model, x, y, epochs=2, optimizer=minicnn.Adam(3e-3), verbose=False)
    original = tmp_path / "original.npz"
    model.save(original)
    result = deep_compression.deep_compression(model, x, y, sparsity=0.8, bits={"conv": 8, "fc": 4},
                                               retrain_epochs=1, finetune_epochs=1, prune_iterations=2,
                                               prune_lr=1e-3, finetune_lr=1e-3, verbose=False)
    rounds = result.rounds
    assert set(rounds) == {"conv1", "fc1"} and all(1 <= r < clustering.MAX_ROUNDS for r in rounds.values())
    assert [layer.kmeans_rounds for layer in result.model.layers if hasattr(layer, "labels")] == list(rounds.values())
    zeros, size = result.sparsity["conv1"]
    assert result.bits == {"conv1": int(np.log2(size - zeros)), "fc1": 4}, (
        f"conv1 keeps {size - zeros} of its 36 weights: 8 bits are capped to that many clusters, ours {result.bits}")
    small = tmp_path / "small.npz"
    result.model.save(small)
    loaded = minicnn.load(small)
    assert all(layer.kmeans_rounds is None for layer in loaded.layers if hasattr(layer, "labels"))  # not stored
    base = minicnn.evaluate(model, x_test, y_test)
    assert minicnn.evaluate(loaded, x_test, y_test) >= base - 0.05, "compression lost more than 5 points"
    kept = sum(layer.positions.size for layer in loaded.layers if hasattr(layer, "labels"))
    assert kept == round(0.2 * (36 + 6760))
    table = deep_compression.format_table(loaded, original.stat().st_size, small.stat().st_size)
    assert "conv1" in table and "fc1" in table and f"{small.stat().st_size:,} bytes" in table
    assert original.stat().st_size / small.stat().st_size > 5  # a 27 KB model: the file headers weigh


def test_cli_compress(tmp_path, capsys):
    model = Sequential([Flatten(), Dense(784, 10, rng=0)])
    x, y = minicnn.datasets.load("mnist10k")[:2]
    minicnn.fit(model, x[:500], y[:500], epochs=1, verbose=False)
    path, out = tmp_path / "m.npz", tmp_path / "small.npz"
    model.save(path)
    from optim.app.cli import main

    assert main(["compress", "--model", str(path), "--pipeline", "deep", "--sparsity", "0.8",
                 "--bits-fc", "4", "--retrain-epochs", "1", "--finetune-epochs", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rate +H" in text and "test accuracy" in text and "fc1" in text
    assert "k-means rounds to convergence per layer: {'fc1': " in text
    assert isinstance(minicnn.load(out).layers[1], SharedDense)
    assert main(["compress", "--model", str(path), "--pipeline", "share", "--bits-fc", "17", "--out", str(out)]) == 2
    assert "bits must be an integer in 1..16" in capsys.readouterr().err
