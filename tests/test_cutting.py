"""Model cutting (optim.cutting): removing whole layers, truncating with a new head.

Invariants: removing a block that computes the identity on its inputs
leaves the output unchanged, exactly, and its scores say so (no accuracy
drop, distance 0); any removal keeps the shapes valid; a layer whose removal
would break shapes, or an unknown layer, raises and leaves the model as it was.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from optim.app.cli import main
from optim import cutting
from snapshots import assert_rejected_unchanged


def identity_conv(channels, k, rng):
    """Conv channels->channels, k x k (k odd), 'same' padding, kernel a centred delta
    on the matching channel, zero bias: on nonnegative inputs relu(conv(x)) = x."""
    conv = Conv2D(channels, channels, k, padding=k // 2, rng=rng)
    W = np.zeros_like(conv.params["W"])
    W[np.arange(channels), np.arange(channels), k // 2, k // 2] = 1
    conv.params = {"W": W, "b": np.zeros_like(conv.params["b"])}
    return conv


def identity_dense(width, rng):
    dense = Dense(width, width, rng=rng)
    dense.params = {"W": np.eye(width, dtype=np.float32), "b": np.zeros(width, np.float32)}
    return dense


@st.composite
def network_with_identity(draw):
    """(model, start index of an identity block): conv + ReLU (the input of the
    identity is nonnegative), then an identity conv or Dense block, among other
    random shape-preserving blocks."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels, size = draw(st.integers(1, 3)), draw(st.integers(4, 7))
    filters = draw(st.integers(1, 4))
    layers = [Conv2D(channels, filters, 3, padding=1, rng=rng), ReLU()]
    identity_at = None
    where = draw(st.sampled_from(["conv", "dense"]))
    if where == "conv":
        if draw(st.booleans()):
            layers += [Conv2D(filters, filters, 3, padding=1, rng=rng), ReLU()]
        identity_at = len(layers)
        layers += [identity_conv(filters, draw(st.sampled_from([1, 3, 5])), rng), ReLU()]
    spatial = size
    if draw(st.booleans()):
        layers.append(MaxPool2D(2))
        spatial //= 2
    width = filters * spatial * spatial
    hidden = draw(st.integers(2, 6))
    layers += [Flatten(), Dense(width, hidden, rng=rng), ReLU()]
    if where == "dense":
        identity_at = len(layers)
        layers += [identity_dense(hidden, rng), ReLU()]
    if draw(st.booleans()):
        layers += [Dense(hidden, hidden, rng=rng), ReLU()]
    layers.append(Dense(hidden, 3, rng=rng))
    return Sequential(layers, input_shape=(channels, size, size)), identity_at


def images(model, n=5, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *model.input_shape)).astype(np.float32)


# --------------------------------------------------------------------------
# Candidates


def test_removable_blocks_of_the_zoo():
    assert cutting.removable_blocks(minicnn.zoo.deep_cnn()) == [(3, 4), (5, 6), (7, 8), (15, 16)]
    assert cutting.removable_blocks(minicnn.zoo.lenet5()) == []
    square_last = Sequential([Flatten(), Dense(4, 4, rng=0)], input_shape=(1, 2, 2))
    assert cutting.removable_blocks(square_last) == [(1,)]  # no ReLU after it: the block is the layer alone


def test_a_strided_or_unpadded_square_conv_is_not_removable():
    layers = [Conv2D(2, 2, 3, stride=1, padding=0, rng=0), Conv2D(2, 2, 1, stride=2, rng=0),
              Conv2D(2, 2, 3, padding=1, rng=0), Flatten(), Dense(2 * 2 * 2, 3, rng=0)]
    model = Sequential(layers, input_shape=(2, 6, 6))
    assert cutting.removable_blocks(model) == [(2,)]


# --------------------------------------------------------------------------
# Invariants


@given(network_with_identity())
def test_removing_an_identity_block_leaves_the_output_unchanged_exactly(case):
    model, start = case
    x = images(model)
    expected = model.forward(x)
    cut = cutting.remove_blocks(model, [start])
    assert len(cut.layers) == len(model.layers) - 2
    ours = cut.forward(x)
    assert np.array_equal(ours, expected), f"ours {ours} vs expected {expected}"


@given(network_with_identity())
def test_an_identity_block_scores_no_drop_and_zero_distance(case):
    model, start = case
    x = images(model, n=20)
    y = model.predict(x).argmax(axis=1)
    scores = {s["block"][0]: s for s in cutting.score_blocks(model, x, y, batch_size=8)}
    assert scores[start]["accuracy_drop"] == 0 and scores[start]["accuracy"] == 1
    assert scores[start]["distance"] == 0, f"distance {scores[start]['distance']}"
    assert cutting.choose_blocks(list(scores.values()), "distance", remove=1) == [start]


@given(network_with_identity(), st.lists(st.integers(0, 10), max_size=4))
def test_shapes_stay_valid_after_any_removals(case, picks):
    model = case[0]
    for pick in picks:
        blocks = cutting.removable_blocks(model)
        if not blocks:
            break
        n = len(model.layers)
        block = blocks[pick % len(blocks)]
        model = cutting.remove_blocks(model, [block[0]])
        assert len(model.layers) == n - len(block)
        assert model.forward(images(model)).shape == (5, 3)


def test_distance_by_hand():
    """A square Dense that doubles its nonnegative input: ||2x - x|| / ||x|| = 1."""
    dense = Dense(3, 3, rng=0)
    dense.params = {"W": 2 * np.eye(3, dtype=np.float32), "b": np.zeros(3, np.float32)}
    model = Sequential([Flatten(), Dense(4, 3, rng=0), ReLU(), dense, ReLU(), Dense(3, 2, rng=1)],
                       input_shape=(1, 2, 2))
    x = images(model)
    (score,) = cutting.score_blocks(model, x, model.predict(x).argmax(axis=1))
    assert score["block"] == (3, 4) and score["distance"] == pytest.approx(1, rel=1e-6)


def test_choose_blocks_by_count_and_threshold():
    scores = [{"block": (3, 4), "accuracy_drop": 0.02, "distance": 0.5},
              {"block": (5, 6), "accuracy_drop": -0.001, "distance": 0.9},
              {"block": (7, 8), "accuracy_drop": 0.001, "distance": 0.1}]
    assert cutting.choose_blocks(scores, remove=2) == [5, 7]
    assert cutting.choose_blocks(scores, "distance", remove=2) == [7, 3]
    assert cutting.choose_blocks(scores, threshold=0.005) == [5, 7]
    assert cutting.choose_blocks(scores, "distance", threshold=0.05) == []
    assert cutting.choose_blocks(scores, remove=0) == []


# --------------------------------------------------------------------------
# Cut, fine-tune, truncate on real (small) training runs


def test_cut_deep_cnn_and_it_still_trains(tmp_path):
    x, y, *_ = minicnn.datasets.load("mnist10k")
    model = minicnn.zoo.deep_cnn(seed=0)
    cut, scores = cutting.cut(model, x[:50], y[:50], "distance", remove=2)
    assert len(scores) == 4 and len(cut.layers) == len(model.layers) - 4
    minicnn.fit(cut, x[:64], y[:64], epochs=1, batch_size=32, verbose=False)
    cut.save(tmp_path / "cut.npz")
    assert np.array_equal(minicnn.load(tmp_path / "cut.npz").predict(x[:10]), cut.predict(x[:10]))


def test_truncate_keeps_the_body_and_trains_a_head(tmp_path):
    x, y, x_test, y_test = minicnn.datasets.load("mnist10k")
    model = minicnn.zoo.lenet300(seed=0)
    minicnn.fit(model, x[:2000], y[:2000], epochs=1, verbose=False)
    short = cutting.truncate(model, 2, x[:2000], y[:2000], epochs=3, verbose=False)  # Flatten, fc1, ReLU, head
    assert [type(layer) for layer in short.layers] == [Flatten, Dense, ReLU, Dense]
    assert np.array_equal(short.layers[1].params["W"], model.layers[1].params["W"])
    assert short.layers[3].params["W"].shape == (300, 10)
    assert minicnn.evaluate(short, x_test[:500], y_test[:500]) > 0.75  # chance is 0.1
    conv_cut = cutting.truncate(minicnn.zoo.seed_cnn(), 2, x[:64], y[:64], epochs=1, verbose=False)
    assert type(conv_cut.layers[3]) is Flatten and conv_cut.layers[4].params["W"].shape == (32 * 13 * 13, 10)


def test_truncation_points_remove_a_weight_layer():
    assert cutting.truncation_points(minicnn.zoo.seed_cnn()) == [-1]  # only the conv block can go
    assert cutting.truncation_points(minicnn.zoo.lenet5()) == [-1, 0, 1, 2, 3]  # 4 is a Flatten, 5 keeps fc1
    assert cutting.truncation_points(minicnn.zoo.lenet300()) == [-1, 1, 2]  # 0 is a Flatten, 3 keeps fc2


def test_truncate_to_nothing_is_a_linear_classifier():
    x, y, *_ = minicnn.datasets.load("mnist10k")
    linear = cutting.truncate(minicnn.zoo.seed_cnn(), -1, x[:256], y[:256], epochs=1, verbose=False)
    assert [type(layer) for layer in linear.layers] == [Flatten, Dense]
    assert linear.layers[1].params["W"].shape == (784, 10)


@pytest.mark.parametrize("max_drop", [0.0, 0.05, 1.0])
def test_choose_truncation_keeps_the_smallest_good_enough_cut(max_drop):
    x, y, *_ = minicnn.datasets.load("mnist10k")
    model = minicnn.zoo.lenet300(seed=0)
    minicnn.fit(model, x[:1000], y[:1000], epochs=5, verbose=False)  # far ahead of heads trained 1 epoch
    cut, table = cutting.choose_truncation(model, x[:1000], y[:1000], x[1000:1400], y[1000:1400],
                                           max_drop=max_drop, epochs=1, verbose=False)
    assert [row["after"] for row in table] == [-1, 1, 2]
    chosen = [row for row in table if row["chosen"]]
    assert len(chosen) == 1
    good = [row for row in table if row["accuracy_drop"] <= max_drop]
    if good:
        assert chosen[0]["params"] == min(row["params"] for row in good)
    else:
        assert chosen[0]["accuracy"] == max(row["accuracy"] for row in table)
    assert sum(p.size for layer in cut.layers for p in layer.params.values()) == chosen[0]["params"]
    if max_drop == 1.0:
        assert chosen[0]["after"] == -1  # everything is good enough: the smallest is the linear classifier
    else:
        assert not good, "the fallback should be exercised here: every head trails the 5-epoch model by > 0.1"


def test_choose_truncation_checks_max_drop():
    x = np.zeros((4, 1, 28, 28), np.float32)
    y = np.zeros(4, np.int64)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="max_drop"):
            cutting.choose_truncation(minicnn.zoo.lenet300(), x, y, x, y, max_drop=bad)


def test_cli_cut_prints_both_summaries_and_saves(tmp_path, capsys):
    rng = np.random.default_rng(0)
    model = Sequential([Flatten(), Dense(784, 32, rng=rng), ReLU(), Dense(32, 32, rng=rng), ReLU(),
                        Dense(32, 32, rng=rng), ReLU(), Dense(32, 10, rng=rng)])
    source, out = tmp_path / "mlp.npz", tmp_path / "cut.npz"
    model.save(source)
    assert main(["cut", "--model", str(source), "--remove", "2", "--retrain-epochs", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before cutting" in text and "after cutting" in text and "removed 4 layers" in text
    assert len(minicnn.load(out).layers) == len(model.layers) - 4
    assert main(["cut", "--model", str(source), "--truncate-after", "2", "--out", str(out)]) == 0
    assert len(minicnn.load(out).layers) == 4
    assert main(["cut", "--model", str(source), "--remove", "3"]) == 2
    assert "cannot remove 3 blocks" in capsys.readouterr().err


# --------------------------------------------------------------------------
# Bad input: a clear error, and the model unchanged


@pytest.mark.parametrize("call, error, message", [
    (lambda m: cutting.remove_blocks(m, [0]), ValueError, "would break"),
    (lambda m: cutting.remove_blocks(m, [10]), ValueError, "would break"),
    (lambda m: cutting.remove_blocks(m, [13]), ValueError, "would break"),
    (lambda m: cutting.remove_blocks(m, [4]), ValueError, "ReLU"),
    (lambda m: cutting.remove_blocks(m, [3, 99]), ValueError, "out of range"),
    (lambda m: cutting.remove_blocks(m, [3, 3]), ValueError, "repeat"),
    (lambda m: cutting.remove_blocks(m, ["conv"]), TypeError, "integer"),
    (lambda m: cutting.choose_blocks([], remove=1), ValueError, "cannot remove 1"),
    (lambda m: cutting.choose_blocks([], remove=1, threshold=0.1), ValueError, "exactly one"),
    (lambda m: cutting.choose_blocks([], "size", remove=1), ValueError, "unknown criterion"),
    (lambda m: cutting.truncate(m, 17, np.zeros((1, 1, 28, 28), np.float32), np.zeros(1, np.int64)),
     ValueError, "last layer"),
    (lambda m: cutting.truncate(m, -2, np.zeros((1, 1, 28, 28), np.float32), np.zeros(1, np.int64)),
     ValueError, "out of range"),
])
def test_bad_requests_raise_and_leave_the_model_unchanged(call, error, message):
    assert_rejected_unchanged(minicnn.zoo.deep_cnn(seed=0), call, error, message)
