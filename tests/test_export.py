"""ONNX export (optim.export): every kind of model file runs in ONNX Runtime and agrees with minicnn
on the 2,000 mnist10k test images; the files are checked, written atomically, and no larger than
they need to be.

The models are small and quick to make: LeNet-5 and the seed CNN trained one epoch on 2,000
images, then pruned, shared, quantized or binarized with optim's own functions; for the rarer
paths, small untrained models built layer by layer. The same checks on the demo's artifacts:
MINICNN_EXPORT_DEMO=folder (e.g. /tmp/demo_base) runs test_demo_artifacts.
"""

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

import minicnn  # noqa: E402
import minicnn.atomic  # noqa: E402  (its open, made to fail mid-write)
from minicnn import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, Sequential, zoo  # noqa: E402
from optim import binary, cutting, pruning, quantization, sharing, sparse, structured  # noqa: E402
from optim.app.cli import main  # noqa: E402
from optim.export import MAX_OPSET, MIN_OPSET, agreement, export, run, to_onnx  # noqa: E402
from optim.export import int8 as int8_export  # noqa: E402  (its converter table, against optim's op kinds)
from optim.quantization.ops import OP_KINDS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The newest opset the export writes: MAX_OPSET unless the installed onnx is older. ONNX Runtime
# 1.32 runs every opset up to MAX_OPSET; 1.19, the oldest the onnx extra allows, up to 21.
NEWEST_OPSET = min(MAX_OPSET, onnx.defs.onnx_opset_version())
OLDEST_RUNTIME_OPSET = 21
RUNTIME_RUNS_NEWEST = tuple(map(int, onnxruntime.__version__.split(".")[:2])) >= (1, 32)


@pytest.fixture(scope="module")
def data():
    return minicnn.datasets.load("mnist10k")


def trained(build, data):
    """A zoo network trained one epoch on 2,000 images: weights that look trained, in a second."""
    x_train, y_train, _, _ = data
    model = build(seed=0)
    minicnn.fit(model, x_train[:2000], y_train[:2000], epochs=1, batch_size=64, seed=0, verbose=False)
    return model


@pytest.fixture(scope="module")
def lenet5(data):
    return trained(zoo.lenet5, data)


@pytest.fixture(scope="module")
def seed_cnn(data):
    return trained(zoo.seed_cnn, data)


def check_float(model, data, **options):
    """The ONNX logits of a float model within 1e-4 of minicnn's (relative), the same classes but where
    minicnn's two top logits tie within the two's difference (the sums' order decides a tie: a random
    shared layer's, 5.5e-7 apart, once flipped one image of 2,000 in CI); the proto."""
    proto = to_onnx(model, **options)
    result = agreement(model, proto, data[2])
    assert result["images"] == 2000
    assert result["max_relative_error"] <= 1e-4, result
    if result["argmax_agreement"] < 1.0:
        expected, logits = model.predict(data[2]), run(proto, data[2])[0]
        differ = expected.argmax(axis=1) != logits.argmax(axis=1)
        top_two = np.sort(expected[differ], axis=1)[:, -2:]
        assert (top_two[:, 1] - top_two[:, 0] <= 2 * np.abs(logits - expected).max()).all(), result
    return proto


def sparse_names(proto):
    return {s.values.name for s in proto.graph.sparse_initializer}


# --------------------------------------------------------------------------
# Float networks, and the float outputs of network pruning, cutting and distillation (a zoo student)


def test_float_networks(lenet5, seed_cnn, data):
    for model in (lenet5, seed_cnn, zoo.lenet300(seed=1), zoo.small_cnn(seed=2), zoo.small_mlp(seed=3)):
        proto = check_float(model, data)
        assert not proto.graph.sparse_initializer  # nothing pruned: every weight dense


def test_structured_pruning_and_cutting_give_float_networks_that_export(lenet5, data):
    narrow = structured.prune(lenet5, 0.6)
    assert narrow.layers[0].out_channels < lenet5.layers[0].out_channels
    check_float(narrow, data)
    x_train, y_train, _, _ = data
    head = cutting.truncate(lenet5, 3, x_train[:1000], y_train[:1000], epochs=1, verbose=False)
    assert [type(layer).__name__ for layer in head.layers][-2:] == ["Flatten", "Dense"]
    check_float(head, data)


def check_every_layer_output(model, x):
    """The export with intermediates=True gives the logits, then each layer's forward in order."""
    outputs = run(to_onnx(model, intermediates=True), x)
    assert len(outputs) == 1 + len(model.layers)
    for layer, got in zip(model.layers, outputs[1:]):
        x = layer.forward(x)
        np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
    return outputs


def test_intermediates_are_every_layer_in_order(seed_cnn, data):
    outputs = check_every_layer_output(seed_cnn, data[2][:50])
    np.testing.assert_array_equal(outputs[0], outputs[-1])


# --------------------------------------------------------------------------
# Pruned networks: sparse initializers where smaller


def test_pruned_network_stores_sparse_initializers_and_agrees(lenet5, data):
    x_train, y_train, _, _ = data
    pruned = sparse.to_sparse(pruning.prune_global(lenet5, x_train, y_train, 0.9, verbose=False).model)
    assert {type(layer).__name__ for layer in pruned.layers} >= {"SparseConv2D", "SparseDense"}
    proto = check_float(pruned, data)
    dense = check_float(pruned, data, sparse=False)
    assert sparse_names(proto) == {"layer2_W", "layer5_M", "layer7_M"}  # conv1 (500 weights) stays dense
    assert not dense.graph.sparse_initializer
    assert proto.ByteSize() < 0.35 * dense.ByteSize()


# --------------------------------------------------------------------------
# Weight-shared networks: indices decoded in the graph by Gather


def test_shared_network_is_decoded_by_gather_on_uint8_indices(lenet5, data):
    shared = sharing.share_weights(lenet5, {"conv": 4, "fc": 4}, iterations=10)
    proto = check_float(shared, data)
    initializers = {t.name: t for t in proto.graph.initializer}
    assert initializers["layer5_indices"].data_type == onnx.TensorProto.UINT8
    assert list(initializers["layer5_indices"].dims) == [500, 800]  # M = W^T (out, in)
    assert list(initializers["layer5_codebook"].dims) == [16]
    assert sum(node.op_type == "Gather" for node in proto.graph.node) == 4
    float_bytes = to_onnx(lenet5).ByteSize()
    assert proto.ByteSize() < 0.3 * float_bytes  # one byte a weight, not four


def test_deep_compression_shares_a_pruned_network(lenet5, data):
    x_train, y_train, _, _ = data
    pruned = pruning.prune_global(lenet5, x_train, y_train, 0.5, verbose=False).model
    # conv2 with 2**8 clusters: its index tensor needs 257 values (0 = pruned), so uint16
    shared = sharing.share_weights(sparse.to_sparse(pruned), {"conv1": 4, "conv2": 8, "fc": 5}, iterations=10)
    proto = check_float(shared, data)
    types = {t.name: t.data_type for t in proto.graph.initializer}
    types.update({s.values.name: s.values.data_type for s in proto.graph.sparse_initializer})
    assert types["layer2_indices"] == onnx.TensorProto.UINT16
    assert types["layer5_indices"] == onnx.TensorProto.UINT8
    very_sparse = sharing.share_weights(
        sparse.to_sparse(pruning.prune_global(lenet5, x_train, y_train, 0.95, verbose=False).model),
        {"conv": 4, "fc": 4}, iterations=10)
    proto = check_float(very_sparse, data)
    assert "layer5_indices" in sparse_names(proto)  # 5% density: 9 bytes a nonzero beat 1 byte a weight
    assert proto.ByteSize() < check_float(very_sparse, data, sparse=False).ByteSize()


def test_pruned_layer_with_65536_clusters_gets_uint32_indices(data):
    """k = 2**16 clusters (optim.sharing's most) in a pruned layer: 65,537 table entries with the
    pruned 0, so the indices are uint32 (uint16 would wrap cluster 65,535 onto the pruned 0)."""
    rng = np.random.default_rng(7)
    k = 2**16
    values = ((2 * np.arange(k) - (k - 1)) / k).astype(np.float32)  # k distinct nonzeros, exact in float32
    W = np.zeros((784, 100), np.float32)  # 78,400 weights, 12,864 of them pruned
    W.reshape(-1)[rng.choice(W.size, k, replace=False)] = rng.permutation(values)
    i, j = np.argwhere(W == values[-1])[0]
    centre = 14 * 28 + 14  # the largest weight (cluster 65,535) swapped onto a pixel most digits cover
    W[i, j], W[centre, 0] = W[centre, 0], values[-1]
    dense = Dense(784, 100)
    dense.params["W"] = W
    # k-means from evenly spaced centroids on k evenly spaced values: each weight its own cluster at once
    shared = sharing.SharedDense.from_layer(dense, 16, iterations=3, coding="packed")
    assert shared.clusters == k and np.array_equal(shared.values(), W.T.reshape(-1)[shared.positions])
    model = Sequential([Flatten(), shared])
    proto = check_float(model, data)
    initializers = {t.name: t for t in proto.graph.initializer}
    assert initializers["layer1_indices"].data_type == onnx.TensorProto.UINT32
    assert list(initializers["layer1_codebook"].dims) == [k + 1]


# --------------------------------------------------------------------------
# Int8 networks: every layer's codes within one of minicnn's


def int8_differences(qmodel, x, **options):
    """max |code difference| of each op's output, ONNX Runtime against minicnn, and the ONNX logits."""
    outputs = run(to_onnx(qmodel, intermediates=True, **options), x)
    q, worst, inputs_equal = qmodel.quantize_input(x), [], np.ones(len(x), bool)
    for op, got in zip(qmodel.layers, outputs[1:]):
        previous_equal = inputs_equal.copy()
        q = op.forward(q)
        expected = q.transpose(0, 3, 1, 2) if q.ndim == 4 else q
        assert got.dtype == expected.dtype and got.shape == expected.shape
        difference = np.abs(got.astype(np.int64) - expected).reshape(len(x), -1).max(axis=1)
        worst.append(int(difference.max()))
        inputs_equal &= difference == 0
    if got.dtype == np.int32:  # the last layer's sums: exact wherever its input codes were the same
        assert previous_equal.any() and np.array_equal(got[previous_equal], expected[previous_equal])
    return worst, outputs[0]


@pytest.mark.parametrize("network", ["lenet5", "seed_cnn"])
def test_int8_network_codes_within_one_and_same_classes(network, request, data):
    model = request.getfixturevalue(network)
    x_train, _, x_test, _ = data
    qmodel = quantization.quantize_model(model, x_train[:500], per_channel=True)
    worst, logits = int8_differences(qmodel, x_test)
    assert max(worst[:-1]) <= 1, worst  # every int8 layer; the last one's int32 sums follow their inputs
    same = logits.argmax(1) == qmodel.predict(x_test).argmax(1)
    assert same.mean() >= 0.999
    ops = [node.op_type for node in to_onnx(qmodel).graph.node]
    assert {"QuantizeLinear", "QLinearConv", "MaxPool", "MatMulInteger", "DequantizeLinear"} <= set(ops)
    assert not {"Conv", "Gemm", "MatMul"} & set(ops)  # integer operators only


def test_int8_ends_in_a_padded_conv_with_loose_relu_per_tensor(data):
    """ConvInteger (the last layer, padded, strided, ReLU fused), an IntReLU of its own, per-tensor scales."""
    x_train, y_train, x_test, _ = data
    rng = np.random.default_rng(3)
    model = Sequential([Conv2D(1, 4, 3, padding=1, rng=rng), MaxPool2D(2), ReLU(),
                        Conv2D(4, 3, 3, stride=2, padding=1, rng=rng), ReLU()])
    qmodel = quantization.quantize_model(model, x_train[:200], per_channel=False)
    assert [type(op).__name__ for op in qmodel.layers] == ["IntConv2D", "IntMaxPool2D", "IntReLU", "IntConv2D"]
    worst, logits = int8_differences(qmodel, x_test[:500])
    assert max(worst[:-1]) <= 1, worst
    assert "ConvInteger" in [node.op_type for node in to_onnx(qmodel).graph.node]
    expected = qmodel.predict(x_test[:500])
    assert np.abs(logits - expected).max() <= 0.05 * np.abs(expected).max()


@pytest.mark.parametrize("sparse", [True, False])
def test_int8_pruned_dense_network_ending_in_relu(sparse, data):
    """The last layer's int32 sums by MatMulInteger with its ReLU fused (Clip at 0); a pruned
    layer's int8 weights (zero codes) stored sparse, or dense with sparse=False."""
    x_train, _, x_test, _ = data
    rng = np.random.default_rng(5)
    model = Sequential([Flatten(), Dense(784, 64, rng=rng), ReLU(), Dense(64, 10, rng=rng), ReLU()])
    W = model.layers[1].params["W"]
    W[rng.random(W.shape) < 0.95] = 0  # pruned: 5% density
    qmodel = quantization.quantize_model(model, x_train[:200], per_channel=True)
    last = qmodel.layers[-1]
    assert type(last).__name__ == "IntDense" and last.relu and last.out_q is None
    worst, logits = int8_differences(qmodel, x_test[:500], sparse=sparse)
    assert max(worst[:-1]) <= 1, worst
    expected = qmodel.predict(x_test[:500])
    assert logits.min() >= 0 and np.abs(logits - expected).max() <= 0.05 * np.abs(expected).max()
    proto = to_onnx(qmodel, sparse=sparse)
    assert [node.op_type for node in proto.graph.node][-4:] == ["MatMulInteger", "Add", "Clip", "DequantizeLinear"]
    assert sparse_names(proto) == ({"layer1_1x1_W"} if sparse else set())


def test_every_int8_op_kind_has_a_converter():
    assert set(int8_export.OPS) == set(OP_KINDS.values())


# --------------------------------------------------------------------------
# Binary networks


def binary_model(model, data, binary_activations):
    x_train, y_train, _, _ = data
    trained_model = binary.binarize(model, binary_activations=binary_activations)
    minicnn.fit(trained_model, x_train[:1000], y_train[:1000], epochs=1, seed=0, constraint=binary.clip_latent,
                verbose=False)
    return trained_model


def check_binary(model, data, **options):
    proto = to_onnx(model, **options)
    result = agreement(model, proto, data[2])
    assert result["argmax_agreement"] >= 0.999, result
    assert result["max_relative_error"] <= 1e-4, result
    return proto


def test_binary_weights_export_one_bit_each(lenet5, data):
    trained_model = binary_model(lenet5, data, binary_activations=False)
    packed = binary.pack(trained_model)
    proto = check_binary(packed, data)
    check_binary(trained_model, data)  # the training layers export as the layers they pack into
    ops = [node.op_type for node in proto.graph.node]
    assert "BitShift" in ops and "Where" not in ops
    # conv2 and fc1 (425,000 weights) are one bit each: the file is far below LeNet-5's 1.7 MB
    assert proto.ByteSize() < 0.1 * to_onnx(lenet5).ByteSize()


def test_binary_inputs_padded_conv(data):
    """XNOR-Net layers: sign(x) with sign(0) = +1, padding that counts as +1, beta per receptive field."""
    rng = np.random.default_rng(4)
    model = Sequential([Conv2D(1, 8, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
                        Conv2D(8, 16, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
                        Flatten(), Dense(16 * 7 * 7, 32, rng=rng), ReLU(), Dense(32, 10, rng=rng)])
    packed = binary.pack(binary_model(model, data, binary_activations=True))
    assert [layer.binary_input for layer in packed.layers if hasattr(layer, "binary_input")] == [True, True]
    proto = check_binary(packed, data)
    ops = [node.op_type for node in proto.graph.node]
    assert "Pad" in ops and "Where" in ops and "Sign" not in ops


def binary_inputs_network(packed):
    """Untrained XNOR-Net layers (the export maps any weights): convs of stride 2, padded and not,
    as the training layers or packed."""
    rng = np.random.default_rng(6)
    model = Sequential([Conv2D(1, 4, 3, padding=1, rng=rng),
                        binary.BinaryConv2D(4, 8, 3, stride=2, padding=1, binary_input=True, rng=rng),
                        binary.BinaryConv2D(8, 8, 3, stride=2, binary_input=True, rng=rng),
                        Flatten(), binary.BinaryDense(8 * 6 * 6, 10, binary_input=True, rng=rng)])
    return binary.pack(model) if packed else model


@pytest.mark.parametrize("packed", [False, True])
def test_binary_inputs_strided_convs_and_every_layer_output(packed, data):
    model = binary_inputs_network(packed)
    check_binary(model, data)
    check_every_layer_output(model, data[2][:200])


# --------------------------------------------------------------------------
# Files, options, errors, the command


class Unknown(Layer):
    kind = "unknown"

    def forward(self, x):
        return x


def test_unsupported_layer_names_it_and_leaves_the_file_alone(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    with pytest.raises(ValueError, match=r"layer 1 \(Unknown\) has no ONNX export"):
        export(Sequential([Flatten(), Unknown(), Dense(784, 10)]), out)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left behind
    for opset in (MIN_OPSET - 1, NEWEST_OPSET + 1):
        with pytest.raises(ValueError, match=f"opset must be an integer in {MIN_OPSET}..{NEWEST_OPSET} "):
            to_onnx(zoo.lenet300(), opset=opset)
    with pytest.raises(ValueError, match="cannot export a dict"):
        to_onnx({})


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"old")
    opened = []

    class DiskFull:
        """The temporary file, opened for real, whose write fails half-way."""

        def __init__(self, path, mode):
            opened.append(Path(path))
            self.file = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(minicnn.atomic, "open", DiskFull, raising=False)  # the open write_file writes through
    with pytest.raises(OSError, match="No space left"):
        export(zoo.lenet300(seed=0), out)
    assert len(opened) == 1 and opened[0].parent == tmp_path and opened[0] != out  # the write began
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize("opset", sorted({OLDEST_RUNTIME_OPSET, NEWEST_OPSET}))
@pytest.mark.parametrize("kind", ["float", "int8", "binary"])
def test_every_kind_runs_at_the_newest_opsets(kind, opset, seed_cnn, data):
    """MAX_OPSET is the newest every kind runs at in ONNX Runtime 1.32 (it has no QuantizeLinear(28));
    21 the newest in 1.19."""
    if opset > OLDEST_RUNTIME_OPSET and not RUNTIME_RUNS_NEWEST:
        pytest.skip(f"ONNX Runtime {onnxruntime.__version__} may not run opset {opset}: 1.32 runs up to {MAX_OPSET}")
    x_train, _, x_test, _ = data
    if kind == "int8":
        qmodel = quantization.quantize_model(seed_cnn, x_train[:200])
        worst, logits = int8_differences(qmodel, x_test[:500], opset=opset)
        assert max(worst[:-1]) <= 1, worst
        assert (logits.argmax(1) == qmodel.predict(x_test[:500]).argmax(1)).mean() >= 0.99
        proto = to_onnx(qmodel, opset=opset)
    elif kind == "binary":
        proto = check_binary(binary_inputs_network(packed=True), data, opset=opset)
    else:
        proto = check_float(seed_cnn, data, opset=opset)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", opset)]
    assert proto.ir_version == onnx.helper.find_min_ir_version_for(list(proto.opset_import))


def test_export_from_a_file_writes_a_checked_model(lenet5, tmp_path):
    npz, out = tmp_path / "lenet5.npz", tmp_path / "lenet5.onnx"
    lenet5.save(npz)
    nbytes = export(npz, out)
    assert nbytes == out.stat().st_size
    onnx.checker.check_model(str(out))


def test_cli_prints_both_sizes_and_checks(seed_cnn, tmp_path, capsys):
    x_train, _, _, _ = minicnn.datasets.load("mnist10k")
    npz, out = tmp_path / "q.npz", tmp_path / "q.onnx"
    quantization.quantize_model(seed_cnn, x_train[:200]).save(npz)
    assert main(["export", "--model", str(npz), "--out", str(out), "--check"]) == 0
    text = capsys.readouterr().out
    assert f"{out.stat().st_size:,} bytes" in text and f"{npz.stat().st_size:,} bytes" in text
    assert "the same class on 100.00%" in text
    assert main(["export", "--model", str(npz), "--out", str(out), "--opset", "9"]) == 2
    assert "minicnn export: error: opset must be" in capsys.readouterr().err


def test_onnx_is_imported_only_when_exporting(monkeypatch):
    code = "import optim, optim.export, sys; print(sorted(m for m in sys.modules if m.startswith('onnx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[onnx\]'"):
        to_onnx(zoo.lenet300())


# --------------------------------------------------------------------------
# The demo's artifacts, when asked for


@pytest.mark.skipif(not os.environ.get("MINICNN_EXPORT_DEMO"), reason="set MINICNN_EXPORT_DEMO=<demo folder>")
def test_demo_artifacts(data):
    files = sorted(Path(os.environ["MINICNN_EXPORT_DEMO"]).glob("*.npz"))
    assert files
    for path in files:
        model = minicnn.load(path)
        if isinstance(model, quantization.QuantizedModel):
            worst, logits = int8_differences(model, data[2])
            assert max(worst[:-1]) <= 1, (path.name, worst)
            assert (logits.argmax(1) == model.predict(data[2]).argmax(1)).mean() >= 0.999, path.name
        elif any(type(layer).__module__.startswith("optim.binary") for layer in model.layers):
            check_binary(model, data)
        else:
            check_float(model, data)
