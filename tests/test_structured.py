"""Structured pruning (optim.structured): removing whole filters and neurons.

Invariants: removing units that are already dead (zero weights and bias)
changes nothing, exactly; any sequence of removals leaves a valid network
that predicts, saves, loads and trains; the MAC count is what a brute-force
count of the multiplications finds; bad requests raise and leave the model
as it was.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from optim.app.cli import main
from optim import structured
from snapshots import assert_rejected_unchanged


@st.composite
def small_network(draw):
    """A random valid conv net: 1-2 convs (each maybe + ReLU, maybe + pool), Flatten,
    0-2 hidden Dense (maybe + ReLU), a Dense to 3 classes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels, size = draw(st.integers(1, 3)), draw(st.integers(5, 8))
    shape, layers = (channels, size, size), []
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.integers(1, 3))
        padding = draw(st.integers(0, 1)) if shape[1] >= k else 1  # k <= 3 fits a 1x1 input padded by 1
        conv = Conv2D(shape[0], draw(st.integers(2, 5)), k, padding=padding, rng=rng)
        layers.append(conv)
        shape = conv.output_shape(shape)
        if draw(st.booleans()):
            layers.append(ReLU())
        if shape[1] >= 2 and draw(st.booleans()):
            layers.append(MaxPool2D(2))
            shape = layers[-1].output_shape(shape)
    layers.append(Flatten())
    width = int(np.prod(shape))
    for _ in range(draw(st.integers(0, 2))):
        out = draw(st.integers(2, 6))
        layers.append(Dense(width, out, rng=rng))
        width = out
        if draw(st.booleans()):
            layers.append(ReLU())
    layers.append(Dense(width, 3, rng=rng))
    return Sequential(layers, input_shape=(channels, size, size)).astype(np.float64)


def integer_valued(model, seed):
    """Small integer weights (as floats): every product and sum is exact in any order,
    so 'unchanged' can be checked with ==, whatever the BLAS summation order."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for name, p in layer.params.items():
            layer.params[name] = rng.integers(-3, 4, p.shape).astype(np.float64)
    return model


def images(model, n=4, seed=0, integers=False):
    rng = np.random.default_rng(seed)
    shape = (n, *model.input_shape)
    return rng.integers(0, 4, shape).astype(np.float64) if integers else rng.standard_normal(shape)


def zero_units(model, index, units):
    """Kill units of layer `index` in place: their weights and bias become 0."""
    layer = model.layers[index]
    if type(layer) is Conv2D:
        layer.params["W"][units] = 0
    else:
        layer.params["W"][:, units] = 0
    layer.params["b"][units] = 0






def assert_consistent(model):
    """Configs agree with the arrays, shapes chain, forward gives (N, classes)."""
    for layer in model.layers:
        if type(layer) is Conv2D:
            assert layer.params["W"].shape == (layer.out_channels, layer.in_channels,
                                               layer.kernel_size, layer.kernel_size)
            assert layer.params["b"].shape == (layer.out_channels,)
        if type(layer) is Dense:
            assert layer.params["W"].shape == (layer.in_features, layer.out_features)
            assert layer.params["b"].shape == (layer.out_features,)
    model.output_shapes()
    assert model.forward(images(model)).shape == (4, model.num_classes)


# --------------------------------------------------------------------------
# Hand-computed cases


def test_surgery_by_hand_conv_flatten_dense():
    """Conv 1->3 on 2x2 (1x1 kernel), Flatten (3*4 features), Dense 12->2: removing
    filter 1 removes W[1], b[1] and rows 4..7 of the Dense."""
    conv, dense = Conv2D(1, 3, 1, rng=0), Dense(12, 2, rng=0)
    conv.params["W"] = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    conv.params["b"] = np.array([10, 11, 12], np.float32)
    dense.params["W"] = np.arange(24, dtype=np.float32).reshape(12, 2)
    model = Sequential([conv, ReLU(), Flatten(), dense], input_shape=(1, 2, 2))
    pruned = structured.remove_units(model, 0, [1])
    new_conv, new_dense = pruned.layers[0], pruned.layers[3]
    assert new_conv.out_channels == 2 and new_dense.in_features == 8
    assert np.array_equal(new_conv.params["W"].ravel(), [0, 2])
    assert np.array_equal(new_conv.params["b"], [10, 12])
    expected_rows = np.concatenate([np.arange(0, 8), np.arange(16, 24)]).reshape(8, 2)
    assert np.array_equal(new_dense.params["W"], expected_rows), f"ours {new_dense.params['W']}"
    assert np.array_equal(new_dense.params["b"], dense.params["b"])


def test_surgery_by_hand_dense_dense():
    first, second = Dense(2, 3, rng=0), Dense(3, 2, rng=1)
    model = Sequential([Flatten(), first, ReLU(), second], input_shape=(1, 1, 2))
    pruned = structured.remove_units(model, 1, np.array([0, 2]))
    assert np.array_equal(pruned.layers[1].params["W"], first.params["W"][:, [1]])
    assert np.array_equal(pruned.layers[1].params["b"], first.params["b"][[1]])
    assert np.array_equal(pruned.layers[3].params["W"], second.params["W"][[1]])


def test_norm_scores_by_hand():
    conv = Conv2D(1, 3, 2, rng=0)
    conv.params["W"] = np.array([[1, -1, 1, -1], [3, 0, 0, -4], [0, 0, 0, 0.5]], np.float32).reshape(3, 1, 2, 2)
    model = Sequential([conv, Flatten(), Dense(3 * 4, 2, rng=0)], input_shape=(1, 3, 3))
    assert np.allclose(structured.unit_scores(model, 0, "l1"), [4, 7, 0.5])
    assert np.allclose(structured.unit_scores(model, 0, "l2"), [2, 5, 0.5])
    pruned = structured.prune(model, {0: 0.67}, "l2")  # floor(0.67 * 3) = 2: the two smallest L2 norms
    assert np.array_equal(pruned.layers[0].params["W"], conv.params["W"][[1]])


def test_rate_counts_use_floor():
    model = minicnn.zoo.lenet5(seed=0)
    pruned = structured.prune(model, 0.5)
    assert [structured.num_units(pruned.layers[i]) for i in (0, 2, 5)] == [10, 25, 250]
    assert structured.num_units(pruned.layers[7]) == 10  # the classes stay
    pruned = structured.prune(model, 0.99)
    assert [structured.num_units(pruned.layers[i]) for i in (0, 2, 5)] == [1, 1, 5]


def test_removable_layers_of_the_zoo():
    assert structured.removable_layers(minicnn.zoo.lenet5()) == [0, 2, 5]
    assert structured.removable_layers(minicnn.zoo.lenet300()) == [1, 3]


# --------------------------------------------------------------------------
# Invariants over random networks


@given(small_network(), st.integers(0, 2**16), st.data())
def test_removing_dead_units_changes_nothing_exactly(model, seed, data):
    model = integer_valued(model, seed)
    index = data.draw(st.sampled_from(structured.removable_layers(model)))
    n = structured.num_units(model.layers[index])
    units = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True))
    zero_units(model, index, units)
    x = images(model, integers=True)
    expected = model.forward(x)
    pruned = structured.remove_units(model, index, units)
    ours = pruned.forward(x)
    assert np.array_equal(ours, expected), f"ours {ours} vs expected {expected}"
    assert structured.num_units(pruned.layers[index]) == n - len(units)


@given(small_network(), st.integers(0, 2**16), st.data())
def test_dead_units_score_zero_and_go_first(model, seed, data):
    index = data.draw(st.sampled_from(structured.removable_layers(model)))
    n = structured.num_units(model.layers[index])
    dead = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True))
    zero_units(model, index, dead)
    x = images(model, n=6, seed=seed)
    y = np.random.default_rng(seed).integers(0, 3, 6)
    for criterion in structured.CRITERIA:
        scores = structured.unit_scores(model, index, criterion, x, y)
        assert scores.shape == (n,) and (scores >= 0).all()
        assert np.all(scores[dead] == 0), f"{criterion}: dead units scored {scores[dead]}"


@given(small_network(), st.integers(0, 2**16), st.data())
def test_taylor_scores_do_not_depend_on_the_batch_size(model, seed, data):
    index = data.draw(st.sampled_from(structured.removable_layers(model)))
    x = images(model, n=7, seed=seed)
    y = np.random.default_rng(seed).integers(0, 3, 7)
    one = structured.unit_scores(model, index, "taylor", x, y, batch_size=1)
    many = structured.unit_scores(model, index, "taylor", x, y, batch_size=5)
    assert np.allclose(one, many, rtol=1e-10, atol=1e-14), f"batch 1: {one}, batch 5: {many}"


@given(small_network(), st.lists(st.tuples(st.integers(0, 10), st.floats(0, 0.99)), min_size=1, max_size=5))
def test_shapes_stay_consistent_after_any_sequence_of_removals(model, steps):
    for pick, rate in steps:
        layers = structured.removable_layers(model)
        index = layers[pick % len(layers)]
        n = structured.num_units(model.layers[index])
        model = structured.prune(model, {index: rate})
        assert structured.num_units(model.layers[index]) == n - int(np.floor(rate * n))
        assert_consistent(model)


def brute_force_macs(model, x):
    """Run every layer by explicit loops over one image, counting each multiply-add."""
    count, a = 0, x[0]
    for layer in model.layers:
        if type(layer) is Conv2D:
            W, b, s, p = layer.params["W"], layer.params["b"], layer.stride, layer.padding
            padded = np.pad(a, ((0, 0), (p, p), (p, p)))
            F, C, K, _ = W.shape
            Ho, Wo = (padded.shape[1] - K) // s + 1, (padded.shape[2] - K) // s + 1
            out = np.zeros((F, Ho, Wo))
            for f in range(F):
                for i in range(Ho):
                    for j in range(Wo):
                        acc = b[f]
                        for c in range(C):
                            for u in range(K):
                                for v in range(K):
                                    acc += W[f, c, u, v] * padded[c, i * s + u, j * s + v]
                                    count += 1
                        out[f, i, j] = acc
            a = out
        elif type(layer) is Dense:
            out = layer.params["b"].copy()
            for i in range(layer.in_features):
                for j in range(layer.out_features):
                    out[j] += a[i] * layer.params["W"][i, j]
                    count += 1
            a = out
        else:
            a = layer.forward(a[None])[0]
    return count, a


@given(small_network(), st.floats(0, 0.9))
def test_mac_counts_match_a_brute_force_count(model, rate):
    model = structured.prune(model, rate)
    x = images(model, n=1)
    count, out = brute_force_macs(model, x)
    assert structured.total_macs(model) == count, f"ours {structured.total_macs(model)} vs brute force {count}"
    assert np.allclose(out, model.forward(x)[0])  # the loops computed the network itself


# --------------------------------------------------------------------------
# The pruned network is an ordinary one


def test_pruned_model_saves_loads_and_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    model = minicnn.zoo.lenet5(seed=0)
    pruned = structured.prune(model, 0.5, "taylor", x, y)
    path = tmp_path / "narrow.npz"
    pruned.save(path)
    loaded = minicnn.load(path)
    assert np.array_equal(loaded.predict(x), pruned.predict(x))
    before = loaded.layers[0].params["W"].copy()
    history = minicnn.fit(loaded, x, y, epochs=2, batch_size=32, verbose=False)
    assert np.isfinite(history["loss"]).all() and not np.array_equal(before, loaded.layers[0].params["W"])
    assert "Total" in loaded.summary()
    assert path.stat().st_size < 0.3 * (431_080 * 4)  # about a quarter of LeNet-5's weights are left


def test_prune_and_finetune_reaches_the_target_counts():
    x, y, *_ = minicnn.datasets.load("mnist10k")
    model = minicnn.zoo.lenet5(seed=0)
    narrow = structured.prune_and_finetune(model, {0: 0.5, 2: 0.6, 5: 0.7}, x[:256], y[:256],
                                           steps=2, epochs=1, verbose=False)
    assert [structured.num_units(narrow.layers[i]) for i in (0, 2, 5)] == [10, 20, 150]
    assert [structured.num_units(model.layers[i]) for i in (0, 2, 5)] == [20, 50, 500]


def test_sensitivity_and_choose_rates():
    rng = np.random.default_rng(0)
    model = minicnn.zoo.lenet300(seed=0)
    x, y = rng.random((50, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 50)
    table = structured.sensitivity(model, x, y, rates=(0.5, 0.9))
    assert set(table["accuracy"]) == {1, 3} and all(len(v) == 2 for v in table["accuracy"].values())
    hand = {"baseline": 0.9, "rates": [0.25, 0.5, 0.75], "accuracy": {0: [0.9, 0.89, 0.5], 2: [0.7, 0.6, 0.5]}}
    assert structured.choose_rates(hand, 0.02) == {0: 0.5, 2: 0.0}


def test_cli_prune_prints_both_summaries_and_saves(tmp_path, capsys):
    source, out = tmp_path / "mlp.npz", tmp_path / "narrow.npz"
    minicnn.zoo.lenet300(seed=0).save(source)
    assert main(["prune", "--model", str(source), "--method", "filters", "--rate", "0.5",
                 "--retrain-epochs", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before pruning" in text and "after pruning" in text and text.count("Total") == 3
    assert "300 -> 150" in text and "100 -> 50" in text
    narrow = minicnn.load(out)
    assert [structured.num_units(narrow.layers[i]) for i in (1, 3)] == [150, 50]
    x, y = minicnn.datasets.load()[2:]
    accuracy = float(text.split("test accuracy ")[-1].split()[0])
    assert abs(minicnn.evaluate(narrow, x, y) - accuracy) <= 5e-5
    assert main(["prune", "--model", str(source), "--method", "filters", "--max-drop", "0.5", "--retrain-epochs", "0"]) == 0
    assert "sensitivity" in capsys.readouterr().out
    assert main(["prune", "--model", str(source), "--method", "filters", "--rate", "1.0"]) == 2
    assert "[0, 1)" in capsys.readouterr().err


def test_compare_reports_the_reduction():
    model = minicnn.zoo.lenet5()
    text = structured.compare(model, structured.prune(model, 0.5))
    assert "20 -> 10" in text and "2,293,000 ->" in text and "fewer MACs" in text


# --------------------------------------------------------------------------
# Bad input: a clear error, and the model unchanged


@pytest.mark.parametrize("call, message", [
    (lambda m: structured.remove_units(m, 0, list(range(20))), "all 20 units"),
    (lambda m: structured.remove_units(m, 0, [20]), "cannot remove units"),
    (lambda m: structured.remove_units(m, 0, [1, 1]), "repeat"),
    (lambda m: structured.remove_units(m, 1, [0]), "MaxPool2D"),
    (lambda m: structured.remove_units(m, 7, [0]), "output layer"),
    (lambda m: structured.remove_units(m, 99, [0]), "out of range"),
    (lambda m: structured.prune(m, 1.0), r"\[0, 1\)"),
    (lambda m: structured.prune(m, -0.1), r"\[0, 1\)"),
    (lambda m: structured.prune(m, {2: 1.5}), r"\[0, 1\)"),
    (lambda m: structured.prune(m, {4: 0.5}), "Flatten"),
    (lambda m: structured.prune(m, 0.5, "l3"), "unknown criterion"),
    (lambda m: structured.prune(m, 0.5, "taylor"), "needs images"),
    (lambda m: structured.remove_lowest(m, {0: -1}), "integer >= 0"),
])
def test_bad_requests_raise_and_leave_the_model_unchanged(call, message):
    assert_rejected_unchanged(minicnn.zoo.lenet5(seed=0), call, ValueError, message)


def test_non_integer_layer_index_is_a_type_error():
    with pytest.raises(TypeError, match="integer"):
        structured.remove_units(minicnn.zoo.lenet5(), "conv1", [0])
