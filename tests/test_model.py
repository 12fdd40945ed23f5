"""Sequential: wiring checks, backward through the stack, save/load, summary."""

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, zoo
from minicnn.checks import check_array
from minicnn.summary import totals
from gradcheck import numerical_gradient, relative_error


def tiny_cnn(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential([Conv2D(1, 2, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2), Flatten(), Dense(8, 3, rng=rng)],
                      input_shape=(1, 4, 4))


def test_whole_model_gradient():
    model = tiny_cnn().astype(np.float64)
    x = np.random.default_rng(1).standard_normal((2, 1, 4, 4))
    y = np.array([0, 2])
    loss = lambda: np.array(minicnn.losses.cross_entropy(model.forward(x), y)[0])  # noqa: E731
    _, dz = minicnn.losses.cross_entropy(model.forward(x), y)
    model.backward(dz)
    for layer in (model.layers[0], model.layers[4]):
        analytic = layer.grads["W"].copy()
        assert relative_error(analytic, numerical_gradient(loss, layer.params["W"], np.array(1.0))) < 1e-5


@pytest.mark.parametrize("name,params", [("seed_cnn", 320 + 54090), ("lenet5", 431_080), ("lenet300", 266_610),
                                         ("tiny_cnn", 80 + 13_530)])
def test_zoo_sizes(name, params):
    model = zoo.build(name)
    assert sum(p.size for layer in model.layers for p in layer.params.values()) == params
    assert model.predict(np.zeros((3, 1, 28, 28), np.float32)).shape == (3, 10)


def test_miswired_model_is_rejected():
    with pytest.raises(ValueError, match="layer 1 .*Dense"):
        Sequential([Flatten(), Dense(100, 10)])


def test_forward_checks_input():
    model = zoo.lenet300()
    with pytest.raises(ValueError, match=r"shape \(N, 1, 28, 28\)"):
        model.forward(np.zeros((2, 1, 28, 27), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        model.forward(np.full((1, 1, 28, 28), np.inf, np.float32))


@given(st.sampled_from([np.float16, np.float32, np.float64]), st.integers(1, 40), st.integers(0, 39),
       st.sampled_from([0.0, np.inf, -np.inf, np.nan]), st.booleans())
def test_check_array_finds_any_non_finite_value(dtype, n, at, value, strided):
    """Wherever the inf or NaN sits, in any float dtype, in a contiguous array or a strided view."""
    x = np.random.default_rng(n).standard_normal((2, n)).astype(dtype)
    x[1, at % n] = value
    x = x[:, ::2] if strided else x
    if np.isfinite(x).all():
        assert check_array(x, "x") is x
    else:
        with pytest.raises(ValueError, match="x has non-finite values"):
            check_array(x, "x")


def test_save_load_round_trip(tmp_path):
    model = zoo.lenet5(seed=3)
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = minicnn.load(path)
    assert [type(a) for a in loaded.layers] == [type(b) for b in model.layers]
    for a, b in zip(loaded.layers, model.layers):
        assert a.config() == b.config()
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
    x = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    assert "Total" in loaded.summary()


def test_save_without_extension_writes_that_name(tmp_path):
    zoo.lenet300().save(tmp_path / "model")
    assert os.listdir(tmp_path) == ["model"]
    minicnn.load(tmp_path / "model")


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    zoo.lenet300(seed=1).save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        zoo.lenet300(seed=2).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]  # no temporary file left behind


def test_load_rejects_files_that_are_not_ours(tmp_path):
    path = tmp_path / "m.npz"
    zoo.lenet300().save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        minicnn.load(tmp_path / "trunc.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable model file"):
        minicnn.load(tmp_path / "text.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="no 'meta' entry"):
        minicnn.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        minicnn.load(tmp_path / "missing.npz")


def test_load_rejects_wrong_shapes(tmp_path):
    model = zoo.lenet300()
    path = tmp_path / "m.npz"
    model.save(path)
    with np.load(path) as f:
        arrays = dict(f)
    arrays["layers.1.W"] = arrays["layers.1.W"][:-1]
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"layer 1 \(dense\): array 'W' must have shape \(784, 300\)"):
        minicnn.load(path)


def test_summary_columns_and_totals():
    text = zoo.lenet5().summary()
    assert text.splitlines()[0].split() == ["Layer", "Output", "shape", "Params", "Nonzero", "Bits/w", "Bytes", "MACs"]
    assert "(N, 20, 24, 24)" in text and "431,080" in text and "2,293,000" in text
    model = zoo.lenet5()
    model.layers[0].params["W"][:2] = 0  # 50 zeros
    assert totals(model) == {"params": 431_080, "nonzero": 431_030, "bytes": 4 * 431_080, "macs": 2_293_000,
                             "bits_per_weight": 32.0}


def test_copy_is_independent():
    model = zoo.lenet300()
    twin = model.copy()
    twin.layers[1].params["W"][:] = 0
    assert model.layers[1].params["W"].any()
