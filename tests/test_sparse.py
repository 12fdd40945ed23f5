"""The sparse format and kernels: relative-index stream, CSR kernels, sparse layers, model files."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minicnn
from minicnn import Conv2D, Dense, Flatten, ReLU, Sequential, kernels, parallel
from minicnn.simd import HAS_PERMUTE
from optim import sparse
from optim.sparse import SparseConv2D, SparseDense, csr_layer, vector
from optim.sparse import kernels as sparse_kernels
from optim.sparse.format import (best_index_bits, csr_from_dense, csr_from_positions, decode_relative,
                                 encode_relative, filler_count, stream_bytes)

from gradcheck import check_layer_gradients
from strategies import conv_geometry


@st.composite
def sparse_matrix(draw, max_rows=12, max_cols=40):
    """A float32 matrix with a random mask: empty rows and long gaps are common."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    density = draw(st.sampled_from([0.0, 0.02, 0.1, 0.5, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    M = rng.standard_normal((rows, cols)).astype(np.float32)
    M[rng.random((rows, cols)) >= density] = 0
    if rows > 1 and draw(st.booleans()):
        M[rng.integers(rows)] = 0  # an empty row
    return M


# --------------------------------------------------------------------------
# The relative-index stream


def test_hand_computed_stream_with_fillers():
    # 2-bit codes: gaps of up to 4. Gap 9 (from 0 to 9) needs fillers at 4 and 8.
    codes, slots = encode_relative(np.array([0, 9, 10]), 2)
    np.testing.assert_array_equal(codes, [0, 3, 3, 0, 0])
    np.testing.assert_array_equal(slots, [0, 4, 8, 9, 10])
    assert filler_count(np.array([0, 9, 10]), 2) == 2
    # A first nonzero far from the start also needs fillers: position 5 at 1 bit (gaps <= 2).
    codes, slots = encode_relative(np.array([5]), 1)
    np.testing.assert_array_equal(slots, [1, 3, 5])
    np.testing.assert_array_equal(codes, [1, 1, 1])


@given(st.lists(st.integers(0, 5000), unique=True, max_size=200), st.integers(1, 12))
def test_stream_round_trip(positions, bits):
    positions = np.array(sorted(positions), dtype=np.int64)
    codes, slots = encode_relative(positions, bits)
    assert codes.dtype == np.uint32 and (codes < 2**bits).all()
    np.testing.assert_array_equal(decode_relative(codes), slots)
    assert np.isin(positions, slots).all(), "every nonzero is in the stream"
    fillers = slots[~np.isin(slots, positions)]
    assert fillers.size == filler_count(positions, bits) == slots.size - positions.size
    # A filler is only ever needed where the gap is wider than the codes reach.
    assert fillers.size == 0 or np.diff(np.concatenate([[-1], slots])).max() == 2**bits


@given(st.lists(st.integers(0, 3000), unique=True, max_size=100))
def test_best_index_bits_is_the_smallest_stream(positions):
    positions = np.array(sorted(positions), dtype=np.int64)
    best = best_index_bits(positions)
    sizes = [stream_bytes(positions, b) for b in range(1, 17)]
    assert stream_bytes(positions, best) == min(sizes), (best, sizes)


@pytest.mark.parametrize("positions,bits,message", [
    (np.array([3, 2]), 4, "strictly increasing"), (np.array([-1, 2]), 4, "non-negative"),
    (np.array([1.0]), 4, "integer"), (np.array([1]), 0, "1..16"), (np.array([1]), 17, "1..16"),
])
def test_bad_stream_input(positions, bits, message):
    with pytest.raises(ValueError, match=message):
        encode_relative(positions, bits)


# --------------------------------------------------------------------------
# Kernels


@given(sparse_matrix(), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_csr_kernels_agree_with_dense_product(M, batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, M.shape[1])).astype(np.float32)
    bias = rng.standard_normal(M.shape[0]).astype(np.float32)
    expected = x.astype(np.float64) @ M.T + bias
    csr = csr_from_dense(M)
    ours = {"reference": sparse_kernels.csr_matmul_ref(*csr, x, bias), "matvec": sparse_kernels.csr_matvec(*csr, x[0], bias)[None]}
    for build in ("threaded", "serial"):
        with parallel.forced(build):
            ours[f"numba ({build})"] = sparse_kernels.csr_matmul(*csr, x, bias)
    for name, y in ours.items():
        assert y.shape == (1 if name == "matvec" else batch, M.shape[0]), f"{name}: shape {y.shape}"
        np.testing.assert_allclose(y, expected[: y.shape[0]], rtol=1e-5, atol=1e-5, err_msg=name)


def test_csr_kernels_hand_computed():
    M = np.array([[0, 2, 0], [0, 0, 0], [1, 0, -1]], np.float32)  # an empty middle row
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    bias = np.array([0.5, 1, 0], np.float32)
    expected = np.array([[4.5, 1, -2], [10.5, 1, -2]], np.float32)  # x @ M.T + bias
    csr = csr_from_dense(M)
    for name, y in [("reference", sparse_kernels.csr_matmul_ref(*csr, x, bias)), ("numba", sparse_kernels.csr_matmul(*csr, x, bias)),
                    ("matvec", np.stack([sparse_kernels.csr_matvec(*csr, row, bias) for row in x]))]:
        np.testing.assert_array_equal(y, expected, err_msg=f"{name}: ours {y}, expected {expected}")


@given(sparse_matrix(max_rows=40, max_cols=100), st.integers(0, 70), st.sampled_from([1, 7, 32, 128]),
       st.integers(0, 2**32 - 1))
def test_blocked_matmul_agrees_with_dense_product(M, batch, block, seed):
    # Batches around the 16-lane vectors and 64-lane tiles, blocks of columns down to one.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, M.shape[1])).astype(np.float32)
    bias = rng.standard_normal(M.shape[0]).astype(np.float32)
    values, indices, indptr = csr_from_dense(M)
    order, block_indices, block_ptr = vector.column_blocks(indices, indptr, M.shape[1], block)
    assert sorted(order) == list(range(values.size)) and (block_indices == indices[order]).all()
    y = vector.blocked_matmul(values[order], block_indices, block_ptr, x, bias)
    np.testing.assert_allclose(y, x.astype(np.float64) @ M.T + bias, rtol=1e-5, atol=1e-5)


@given(sparse_matrix(max_rows=40, max_cols=100), st.integers(0, 3), st.integers(0, 2**32 - 1))
def test_lane_layout_holds_every_nonzero_once(M, batch, seed):
    values, indices, indptr = csr_from_dense(M)
    slots, lane_columns, layer_ptr = vector.lane_layout(indices, indptr, M.shape[1])
    S, Q = -(-M.shape[0] // 16), -(-M.shape[1] // 32)
    assert layer_ptr.size == S * Q + 1 and lane_columns.size == 16 * layer_ptr[-1]
    assert np.unique(slots).size == slots.size, "two nonzeros share a slot"
    # Each nonzero sits in its own row's lane, in a layer of its own (slice, chunk), at its column in the chunk.
    rows = np.repeat(np.arange(M.shape[0]), np.diff(indptr))
    layer = slots // 16
    block = np.searchsorted(layer_ptr, layer, side="right") - 1
    np.testing.assert_array_equal(slots % 16, rows % 16)
    np.testing.assert_array_equal(block, rows // 16 * Q + indices // 32)
    np.testing.assert_array_equal(lane_columns[slots], indices % 32)
    # As few layers as the fullest row of each (slice, chunk) needs.
    full = np.zeros((S * 16, Q), np.int64)
    np.add.at(full, (rows, indices // 32), 1)
    np.testing.assert_array_equal(np.diff(layer_ptr), full.reshape(S, 16, Q).max(axis=1).ravel())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, M.shape[1])).astype(np.float32)
    bias = rng.standard_normal(M.shape[0]).astype(np.float32)
    lanes = vector.lane_values(values, slots, lane_columns.size)
    y = vector.lanes_matmul_ref(lanes, lane_columns, layer_ptr, x, bias)
    np.testing.assert_allclose(y, x.astype(np.float64) @ M.T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_PERMUTE, reason="lanes_matmul needs AVX-512 (vpermi2ps); this CPU has none")
@given(sparse_matrix(max_rows=40, max_cols=100), st.integers(0, csr_layer.LANES_MATMUL_UP_TO), st.integers(0, 2**32 - 1))
def test_lanes_matmul_agrees_with_its_reference(M, batch, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, M.shape[1])).astype(np.float32)
    bias = rng.standard_normal(M.shape[0]).astype(np.float32)
    values, indices, indptr = csr_from_dense(M)
    slots, lane_columns, layer_ptr = vector.lane_layout(indices, indptr, M.shape[1])
    lanes = vector.lane_values(values, slots, lane_columns.size)
    np.testing.assert_allclose(vector.lanes_matmul(lanes, lane_columns, layer_ptr, x, bias),
                               vector.lanes_matmul_ref(lanes, lane_columns, layer_ptr, x, bias), rtol=1e-5, atol=1e-5)


@given(conv_geometry(), st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.sampled_from([np.float32, np.float64]),
       st.integers(0, 2**32 - 1))
def test_sparse_conv_agrees_with_dense_conv(geometry, density, dtype, seed):
    # float32 at stride 1 runs the 16-lane kernel, anything else the plain loops.
    N, C, H, W, F, K, stride, padding = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((F, C, K, K)).astype(dtype)
    w[rng.random(w.shape) >= density] = 0
    bias = rng.standard_normal(F).astype(np.float32)
    expected = kernels.conv2d_forward_ref(x.astype(np.float64), w, bias, stride, padding)
    csr, xp = csr_from_dense(w.reshape(F, -1)), kernels.pad(x, padding)
    values, indices, indptr = csr
    taps = sparse_kernels.conv_taps(indices, K, K)
    np.testing.assert_array_equal(taps @ [K * K, K, 1], indices)
    for name, fn, args in [("reference", sparse_kernels.sparse_conv2d_ref, csr),
                           ("numba", sparse_kernels.sparse_conv2d, (values, taps, indptr))]:
        for build in ("threaded", "serial"):
            with parallel.forced(build):
                ours = fn(*args, xp, bias, K, K, stride)
            np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5, err_msg=f"{name} ({build})")


# --------------------------------------------------------------------------
# Layers


def pruned_dense(M, seed=0):
    layer = Dense(M.shape[1], M.shape[0], rng=seed)
    layer.params["W"] = np.ascontiguousarray(M.T)
    return layer


def pruned_conv(shape, density, seed=0, **kw):
    F, C, K = shape
    layer = Conv2D(C, F, K, rng=seed, **kw)
    layer.params["W"][np.random.default_rng(seed).random(layer.params["W"].shape) >= density] = 0
    return layer


@pytest.mark.parametrize("use_sparse_kernel", [True, False])
def test_layers_compute_what_the_dense_layers_compute(monkeypatch, use_sparse_kernel):
    below = {1: 2.0 if use_sparse_kernel else -1.0}
    monkeypatch.setattr(csr_layer, "SPARSE_BELOW", {"dense": below, "conv2d": below})
    rng = np.random.default_rng(0)
    M = rng.standard_normal((7, 11)).astype(np.float32)
    M[rng.random(M.shape) < 0.7] = 0
    conv = pruned_conv((4, 3, 3), 0.3, stride=2, padding=1)
    for dense, x in [(pruned_dense(M), rng.standard_normal((5, 11))), (pruned_dense(M), rng.standard_normal((1, 11))),
                     (conv, rng.standard_normal((2, 3, 9, 8)))]:
        x = x.astype(np.float32)
        layer = type(dense) is Dense and SparseDense.from_dense(dense) or SparseConv2D.from_dense(dense)
        assert layer.uses_sparse_kernel(len(x)) == use_sparse_kernel
        np.testing.assert_allclose(layer.forward(x), dense.forward(x), rtol=1e-5, atol=1e-5)


def test_the_kernel_follows_the_batch_size(monkeypatch):
    # Sparse below 50% density at batches 1-3, below 10% from 4 on: a 30%-dense layer switches at 4.
    monkeypatch.setattr(csr_layer, "SPARSE_BELOW", {"dense": {1: 0.5, 4: 0.1}, "conv2d": {1: 0.5}})
    assert [sparse.sparse_below("dense", n) for n in (0, 1, 3, 4, 1000)] == [0.5, 0.5, 0.5, 0.1, 0.1]
    rng = np.random.default_rng(3)
    M = rng.standard_normal((6, 10)).astype(np.float32)
    M[rng.permutation(M.size).reshape(M.shape) >= 18] = 0  # 18 of 60 kept: 30%
    dense = pruned_dense(M)
    layer = SparseDense.from_dense(dense)
    calls, sparse_kernel = [], SparseDense.sparse_forward

    def spy(self, x):
        calls.append(len(x))
        return sparse_kernel(self, x)

    monkeypatch.setattr(SparseDense, "sparse_forward", spy)
    for n in (1, 3, 4, 9):
        x = rng.standard_normal((n, 10)).astype(np.float32)
        assert layer.uses_sparse_kernel(n) == (n < 4), n
        np.testing.assert_allclose(layer.forward(x), dense.forward(x), rtol=1e-5, atol=1e-5)
    assert calls == [1, 3], f"the sparse kernel ran at batches {calls}, expected [1, 3]"
    assert layer.forward(np.zeros((0, 10), np.float32)).shape == (0, 6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_batch_size_gets_its_kernel(monkeypatch, dtype):
    monkeypatch.setattr(csr_layer, "SPARSE_BELOW", {"dense": {1: 2.0}, "conv2d": {1: 2.0}})  # sparse kernels only
    ran = []
    for name in ("lanes_matmul", "blocked_matmul", "csr_matvec", "csr_matmul"):
        kernel = getattr(csr_layer, name)  # the names the layers call
        monkeypatch.setattr(csr_layer, name, lambda *args, name=name, kernel=kernel: ran.append(name) or kernel(*args))
    rng = np.random.default_rng(4)
    M = rng.standard_normal((20, 40)).astype(np.float32)
    M[rng.random(M.shape) < 0.8] = 0
    layer = SparseDense.from_dense(pruned_dense(M))
    layer.astype(dtype)
    up_to = csr_layer.LANES_MATMUL_UP_TO
    for batch in (1, up_to, up_to + 1, 70):
        x = rng.standard_normal((batch, 40)).astype(dtype)
        np.testing.assert_allclose(layer.forward(x), x @ M.T + layer.params["b"], rtol=1e-5, atol=1e-5)
    if dtype == np.float64:
        expected = ["csr_matvec", "csr_matmul", "csr_matmul", "csr_matmul"]
    elif HAS_PERMUTE:
        expected = ["lanes_matmul", "lanes_matmul", "blocked_matmul", "blocked_matmul"]
    else:
        expected = ["csr_matvec", "blocked_matmul", "blocked_matmul", "blocked_matmul"]
    assert ran == expected


def test_sparse_layer_gradients():
    rng = np.random.default_rng(1)
    M = rng.standard_normal((4, 6))
    M[rng.random(M.shape) < 0.5] = 0
    check_layer_gradients(SparseDense.from_dense(pruned_dense(M.astype(np.float32))), rng.standard_normal((3, 6)))
    conv = SparseConv2D.from_dense(pruned_conv((3, 2, 3), 0.5, stride=2, padding=1))
    check_layer_gradients(conv, rng.standard_normal((2, 2, 5, 5)))


def test_training_a_sparse_layer_only_moves_its_nonzeros(monkeypatch):
    monkeypatch.setattr(csr_layer, "SPARSE_BELOW", {"dense": {1: 2.0}, "conv2d": {1: 2.0}})  # sparse kernels only
    rng = np.random.default_rng(2)
    M = rng.standard_normal((5, 8)).astype(np.float32)
    M[rng.random(M.shape) < 0.6] = 0
    layer = SparseDense.from_dense(pruned_dense(M))
    x1 = rng.standard_normal((1, 8)).astype(np.float32)
    for batch in (1, csr_layer.LANES_MATMUL_UP_TO + 1):  # lays the values out for both vector kernels
        layer.forward(np.repeat(x1, batch, axis=0))
    layer.forward(rng.standard_normal((4, 8)).astype(np.float32))
    layer.backward(rng.standard_normal((4, 5)).astype(np.float32))
    minicnn.SGD(0.1).step([layer])
    W = layer.matrix()
    assert ((W != 0) <= (M != 0)).all(), "a pruned weight grew back"
    assert not np.array_equal(W, M), "the nonzeros did not train"
    # Every kernel sees the trained values, whichever laid them out before.
    for x in (x1, np.repeat(x1, 3, axis=0), np.repeat(x1, csr_layer.LANES_MATMUL_UP_TO + 1, axis=0)):
        np.testing.assert_allclose(layer.forward(x), x @ W.T + layer.params["b"], rtol=1e-5, atol=1e-5)
    layer.params["values"] = layer.params["values"] * 2  # a new array: laid out again
    np.testing.assert_allclose(layer.forward(x1), x1 @ (2 * W.T) + layer.params["b"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_predict_runs_sparse_layers_in_fused_stages_with_the_kernel_for_each_batch(density):
    """Convs with one input channel or from FUSED_CONV_SPARSE_BELOW run in stages on their dense
    weights; dense layers always, on the sparse kernel or the dense weights by density and rows.
    predict is forward, also after a training step changed the weights."""
    from minicnn.inference import Inference
    model = minicnn.zoo.lenet5(seed=0)
    rng = np.random.default_rng(5)
    for layer in model.layers:
        if "W" in getattr(layer, "params", {}):
            layer.params["W"][rng.random(layer.params["W"].shape) >= density] = 0
    twins = {Conv2D: SparseConv2D, Dense: SparseDense}  # every weight layer sparse, even a dense one
    pruned = Sequential([twins[type(layer)].from_dense(layer) if type(layer) in twins else layer
                         for layer in model.layers], input_shape=model.input_shape)
    kinds = [type(stage).__name__ for stage in Inference(pruned.layers).stages]
    conv2_fused = density >= csr_layer.FUSED_CONV_SPARSE_BELOW
    fused, conv2_alone = ["_Conv", "_Conv", "_Dense", "_Dense"], ["_Conv", "_Layer", "_Layer", "_Dense", "_Dense"]
    assert kinds == (fused if conv2_fused else conv2_alone), kinds
    x = rng.random((70, 1, 28, 28), dtype=np.float32)
    for batch in (1, 5, 64, 70):  # the classifier's sparse kernel up to 63 rows, never from 64
        np.testing.assert_allclose(pruned.predict(x, batch_size=batch), pruned.forward(x), rtol=0, atol=2e-5)
    y = rng.integers(0, 10, 16)
    pruned.backward(minicnn.losses.cross_entropy(pruned.forward(x[:16]), y)[1])
    minicnn.SGD(0.5).step(pruned.layers)
    for batch in (1, 64):
        np.testing.assert_allclose(pruned.predict(x, batch_size=batch), pruned.forward(x), rtol=0, atol=2e-5)


def test_stats_report_nonzeros_density_and_bytes():
    M = np.zeros((10, 100), np.float32)
    M[np.arange(10), np.arange(10) * 7] = 1.5  # one nonzero per row, gaps of 107
    layer = SparseDense.from_dense(pruned_dense(M), index_bits=5)
    s = layer.stats()
    positions = np.flatnonzero(M)
    assert s["params"] == 1010 and s["density"] == 0.01
    assert s["nonzero"] == 10 + np.count_nonzero(layer.params["b"])
    assert s["bytes"] == stream_bytes(positions, 5) + 40
    assert stream_bytes(positions, 5) == (10 + filler_count(positions, 5)) * 4 + -(-(10 + filler_count(positions, 5)) * 5 // 8)


# --------------------------------------------------------------------------
# Files


def bits_of(a):
    return a.view(np.uint32) if a.dtype == np.float32 else a


def assert_same_sparse_layer(a, b):
    assert type(a) is type(b) and a.config() == b.config()
    for name in a.params:
        assert a.params[name].dtype == b.params[name].dtype
        np.testing.assert_array_equal(bits_of(a.params[name]), bits_of(b.params[name]), err_msg=name)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.indptr, b.indptr)


@given(sparse_matrix(max_rows=10, max_cols=30), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_file_round_trip_is_bit_exact_for_any_mask(tmp_path_factory, M, index_bits, seed):
    rng = np.random.default_rng(seed)
    cols = M.shape[1]
    conv_w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    conv_w[rng.random(conv_w.shape) < 0.8] = 0
    conv = Conv2D(2, 3, 3, rng=seed)
    conv.params["W"] = conv_w
    model = Sequential([
        SparseConv2D.from_dense(conv, index_bits=index_bits), Flatten(), Dense(3 * 4 * 4, cols, rng=seed), ReLU(),
        SparseDense.from_dense(pruned_dense(M, seed), index_bits=index_bits),
    ], input_shape=(2, 6, 6))
    path = tmp_path_factory.mktemp("sparse") / "model.npz"
    model.save(path)
    loaded = minicnn.load(path)
    for a, b in zip(model.layers, loaded.layers):
        if isinstance(a, sparse.SparseLayer):
            assert_same_sparse_layer(a, b)
    np.testing.assert_array_equal(loaded.layers[-1].matrix(), M)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_pruned_file_is_smaller_in_proportion(tmp_path):
    rng = np.random.default_rng(3)
    dense = Sequential([Flatten(), Dense(784, 300, rng=0), ReLU(), Dense(300, 10, rng=1)])
    dense.save(tmp_path / "dense.npz")
    W = dense.layers[1].params["W"]
    W[rng.random(W.shape) < 0.95] = 0
    pruned = sparse.to_sparse(dense)
    assert isinstance(pruned.layers[1], SparseDense)
    assert isinstance(pruned.layers[3], Dense), "an unpruned layer would grow if stored sparse"
    pruned.save(tmp_path / "pruned.npz")
    ratio = (tmp_path / "pruned.npz").stat().st_size / (tmp_path / "dense.npz").stat().st_size
    assert ratio < 0.09, f"file ratio {ratio:.3f} for 5% of fc1 kept"
    x = rng.random((4, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(minicnn.load(tmp_path / "pruned.npz").predict(x), dense.predict(x), atol=1e-5)
    back = sparse.to_dense(pruned)
    np.testing.assert_array_equal(back.layers[1].params["W"], W)


def test_corrupt_stream_is_rejected(tmp_path):
    M = np.eye(4, dtype=np.float32)
    model = Sequential([Flatten(), SparseDense.from_dense(pruned_dense(M), index_bits=3)], input_shape=(4,))
    path = tmp_path / "m.npz"
    model.save(path)
    meta, arrays = minicnn.serialization.read_npz(path)
    arrays["layers.1.codes"] = np.full_like(arrays["layers.1.codes"], 255)  # every gap the widest
    minicnn.serialization.write_npz(path, meta, arrays)
    with pytest.raises(ValueError, match="past the end"):
        minicnn.load(path)


def test_bad_layer_input():
    with pytest.raises(ValueError, match="index_bits"):
        SparseDense(3, 4, index_bits=0)
    with pytest.raises(TypeError, match="Sequential"):
        sparse.to_sparse(Dense(3, 4))
