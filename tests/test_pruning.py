"""Magnitude pruning: exact counts, masks through training, the schedule, the drivers, the CLI."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from optim.app.cli import main
from optim import pruning
from optim.pruning import apply_masks, clip_masks, cubic_sparsity, global_masks, layer_sparsity
from snapshots import params_of


def small_cnn(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Conv2D(1, 4, 3, rng=rng), ReLU(), MaxPool2D(2), Flatten(),
                       Dense(4 * 3 * 3, 16, rng=rng), ReLU(), Dense(16, 3, rng=rng)], input_shape=(1, 8, 8))


def with_ties(model, seed):
    """Weights drawn from a few values, so magnitudes tie everywhere."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if "W" in layer.params:
            layer.params["W"][...] = rng.integers(-3, 4, layer.params["W"].shape) / 4
    return model




def tiny_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    return x, (x[:, 0, :4].sum(axis=(1, 2)) > x[:, 0, 4:].sum(axis=(1, 2))).astype(np.int64) + (x[:, 0, 0, 0] > 0.9)


# --------------------------------------------------------------------------
# Which weights go


@given(st.integers(0, 2**16), st.floats(0, 0.999))
def test_global_removes_exactly_the_requested_count_deterministically(seed, s):
    model = with_ties(small_cnn(), seed)
    masks = global_masks(model, s)
    n = sum(m.size for m in masks.values())
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == int(np.floor(s * n + 0.5)), f"removed {removed}, expected round({s} * {n})"
    again = global_masks(model, s)
    assert all(np.array_equal(masks[i], again[i]) for i in masks), "tie-breaking is not deterministic"
    # Every removed weight is no larger than every kept one.
    W = np.concatenate([np.abs(model.layers[i].params["W"]).ravel() for i in masks])
    keep = np.concatenate([masks[i].ravel() for i in masks])
    if 0 < removed < n:
        assert W[~keep].max() <= W[keep].min()


def test_ties_go_in_layer_then_row_major_order():
    model = small_cnn()
    for layer in model.layers:
        if "W" in layer.params:
            layer.params["W"][...] = 1.0
    masks = global_masks(model, 0.1)  # 10% of 36 + 576 + 48 = 660 -> 66: conv1's 36, then fc1's first 30
    assert not masks[0].any()
    np.testing.assert_array_equal(~masks[4].reshape(-1), np.arange(576) < 30)
    assert masks[6].all()


def test_masks_only_grow():
    model = small_cnn()
    first = global_masks(model, 0.5)
    apply_masks(model, first)
    for layer in model.layers:  # retraining moves the survivors around
        if "W" in layer.params:
            layer.params["W"] *= np.random.default_rng(1).random(layer.params["W"].shape).astype(np.float32)
    second = global_masks(model, 0.7, masks=first)
    assert all((second[i] <= first[i]).all() for i in first)
    assert sum(int((~m).sum()) for m in second.values()) == round(0.7 * 660)


def test_ends_scale_prunes_first_and_last_less():
    model = small_cnn()
    masks = global_masks(model, 0.8, ends_scale=0.5)
    assert int((~masks[0]).sum()) == round(0.4 * 36) and int((~masks[6]).sum()) == round(0.4 * 48)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * 660)


def test_clip_hand_computed():
    model = Sequential([Dense(4, 1)], input_shape=(4,))
    model.layers[0].params["W"][:, 0] = [1.0, -1.0, 3.0, -3.0]  # std = sqrt(5) = 2.236
    masks = clip_masks(model, 1.0)
    np.testing.assert_array_equal(masks[0][:, 0], [False, False, True, True])
    assert clip_masks(model, 0.0)[0].all()
    assert not clip_masks(model, 1.5)[0].any()  # 1.5 * 2.236 = 3.35 > 3


def test_layer_selection_by_name():
    model = small_cnn()
    assert pruning.layer_names(model) == {"conv1": 0, "fc1": 4, "fc2": 6}
    masks = global_masks(model, 0.5, layers=["fc1"])
    assert list(masks) == [4] and int((~masks[4]).sum()) == 288


# --------------------------------------------------------------------------
# Masks through training


@pytest.mark.parametrize("optimizer", [minicnn.SGD(0.1, momentum=0.9), minicnn.Adam(1e-2)], ids=["sgd", "adam"])
def test_masks_survive_optimizer_steps(optimizer):
    model = small_cnn()
    x, y = tiny_data()
    masks = global_masks(model, 0.75)
    apply_masks(model, masks, optimizer)
    before = params_of(model)
    minicnn.fit(model, x, y, epochs=2, batch_size=16, optimizer=optimizer, seed=0,
                constraint=pruning.MaskConstraint(masks, optimizer), verbose=False)
    for index, keep in masks.items():
        layer = model.layers[index]
        W = layer.params["W"]
        assert (W[~keep] == 0).all() and not np.signbit(W[~keep]).any(), f"layer {index}: a removed weight moved"
        for slot in optimizer.state[(id(layer), "W")]:  # momentum, or Adam's m and v
            assert (slot[~keep] == 0).all(), f"layer {index}: optimizer state kept at removed weights"
        assert not np.array_equal(W[keep], before[index]["W"][keep]), "the kept weights did not train"


def test_gradual_pruning_reaches_the_target_on_schedule():
    model = small_cnn()
    x, y = tiny_data()
    result = pruning.prune_global(model, x, y, 0.9, iterations=4, retrain_epochs=2, lr=1e-3, verbose=False)
    steps = [h["step"] for h in result.history]
    sparsities = [h["sparsity"] for h in result.history]
    assert steps == [0, 1, 2, 3]  # 12 steps, ramp 0.5 -> every 6 // 4 = 1
    assert sparsities == sorted(sparsities) and sparsities[-1] == 0.9
    zeros = sum(z for z, _ in layer_sparsity(result.model).values())
    assert zeros == round(0.9 * 660)


# --------------------------------------------------------------------------
# The schedule


@given(st.floats(0, 0.99), st.floats(0, 0.99), st.integers(-50, 50), st.integers(1, 20), st.integers(1, 30))
def test_schedule_is_monotone_and_reaches_final(final, initial, start, count, every):
    initial = min(initial, final)
    steps = range(start - 5, start + count * every + 5)
    s = [cubic_sparsity(t, final, initial, start, count, every) for t in steps]
    assert all(a <= b + 1e-12 for a, b in zip(s, s[1:])), "not monotone"
    assert cubic_sparsity(start, final, initial, start, count, every) == pytest.approx(initial)
    assert cubic_sparsity(start + count * every, final, initial, start, count, every) == final
    assert s[-1] == final


def test_schedule_hand_computed():
    # Half way: s_f + (s_i - s_f) (1 - 1/2)^3 = 0.8 - 0.8 / 8 = 0.7.
    assert cubic_sparsity(5, 0.8, 0.0, 0, 10, 1) == pytest.approx(0.7)


# --------------------------------------------------------------------------
# Bad input, and the original model


@pytest.mark.parametrize("call,message", [
    (lambda m: global_masks(m, 1.0), r"sparsity must be in \[0, 1\)"),
    (lambda m: global_masks(m, -0.1), r"sparsity must be in \[0, 1\)"),
    (lambda m: clip_masks(m, -0.5), "quality must be"),
    (lambda m: global_masks(m, 0.5, layers=["conv9"]), r"unknown layer name.*'conv9'.*conv1"),
    (lambda m: global_masks(m, 0.5, ends_scale=2), "ends_scale"),
    (lambda m: pruning.prune_clip(m, *tiny_data(), quality=-1), "quality"),
    (lambda m: pruning.prune_global(m, *tiny_data(), sparsity=1.5), "sparsity"),
    (lambda m: cubic_sparsity(3, 1.0), "sparsity"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call(small_cnn())


def test_model_without_prunable_layer():
    with pytest.raises(ValueError, match="no prunable layer"):
        global_masks(Sequential([Flatten(), ReLU()], input_shape=(1, 4, 4)), 0.5)


@pytest.mark.parametrize("method", ["clip", "global", "sensitivity"])
def test_the_original_model_is_unchanged(method):
    model = small_cnn()
    x, y = tiny_data()
    before = params_of(model)
    if method == "clip":
        result = pruning.prune_clip(model, x, y, 1.0, iterations=2, retrain_epochs=1, verbose=False)
    elif method == "global":
        result = pruning.prune_global(model, x, y, 0.8, retrain_epochs=1, verbose=False)
    else:
        curves = pruning.sensitivity(model, x, y, sparsities=(0.0, 0.5, 0.9))
        assert list(curves) == ["conv1", "fc1", "fc2"]
        assert all(curve[0] == (0.0, minicnn.evaluate(model, x, y)) for curve in curves.values())
    if method != "sensitivity":
        assert result.model is not model
        assert sum(z for z, _ in layer_sparsity(result.model).values()) > 0
    for a, b in zip(before, params_of(model)):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_in_place_prunes_the_given_model():
    model = small_cnn()
    result = pruning.prune_global(model, *tiny_data(), 0.5, in_place=True, verbose=False)
    assert result.model is model and layer_sparsity(model)["fc1"][0] > 0


# --------------------------------------------------------------------------
# Command line


def test_cli_prune_saves_a_smaller_model_that_loads(tmp_path, capsys):
    src, out = tmp_path / "mlp.npz", tmp_path / "pruned.npz"
    minicnn.zoo.lenet300(seed=0).save(src)
    assert main(["prune", "--model", str(src), "--method", "global", "--sparsity", "0.9",
                 "--retrain-epochs", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before pruning" in text and "SparseDense" in text and "90.0%" in text
    assert out.stat().st_size < src.stat().st_size / 7
    x = minicnn.datasets.load()[2][:8]
    assert minicnn.load(out).predict(x).shape == (8, 10)


def test_cli_prune_clip_and_errors(tmp_path, capsys):
    src, out = tmp_path / "mlp.npz", tmp_path / "pruned.npz"
    minicnn.zoo.lenet300(seed=0).save(src)
    assert main(["prune", "--model", str(src), "--method", "clip", "--quality", "1.0", "--sensitivity",
                 "--retrain-epochs", "0", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sensitivity" in text and "fc3" in text.split("sensitivity")[1]
    assert main(["prune", "--model", str(out), "--method", "clip", "--retrain-epochs", "0"]) == 2
    assert "needs --quality" in capsys.readouterr().err
    assert main(["prune", "--model", str(out), "--sparsity", "0.5", "--layers", "conv1",
                 "--retrain-epochs", "0"]) == 2
    assert "unknown layer name" in capsys.readouterr().err
