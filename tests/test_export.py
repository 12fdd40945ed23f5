"""ONNX export (optim.export): every kind of model file runs in ONNX Runtime and agrees with minicnn
on the 2,000 mnist10k test images; the files are checked, written atomically, and no larger than
they need to be.

The models are small and quick to make: LeNet-5 and the seed CNN trained one epoch on 2,000
images, then pruned, shared, quantized or binarized with optim's own functions. The same checks
on the demo's artifacts: MINICNN_EXPORT_DEMO=folder (e.g. /tmp/demo_base) runs test_demo_artifacts.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import minicnn  # noqa: E402
from minicnn import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU, Sequential, zoo  # noqa: E402
from optim import binary, cutting, pruning, quantization, sharing, sparse, structured  # noqa: E402
from optim.app.cli import main  # noqa: E402
from optim.export import agreement, export, run, to_onnx  # noqa: E402
from optim.export.graph import require_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
    """The ONNX logits of a float model within 1e-4 of minicnn's (relative), the same classes; the proto."""
    proto = to_onnx(model, **options)
    result = agreement(model, proto, data[2])
    assert result["images"] == 2000
    assert result["max_relative_error"] <= 1e-4, result
    assert result["argmax_agreement"] == 1.0, result
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


def test_intermediates_are_every_layer_in_order(seed_cnn, data):
    x = data[2][:50]
    outputs = run(to_onnx(seed_cnn, intermediates=True), x)
    assert len(outputs) == 1 + len(seed_cnn.layers)
    for layer, got in zip(seed_cnn.layers, outputs[1:]):
        x = layer.forward(x)
        np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4 * np.abs(x).max())
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


# --------------------------------------------------------------------------
# Int8 networks: every layer's codes within one of minicnn's


def int8_differences(qmodel, x):
    """max |code difference| of each op's output, ONNX Runtime against minicnn, and the ONNX logits."""
    outputs = run(to_onnx(qmodel, intermediates=True), x)
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


# --------------------------------------------------------------------------
# Binary networks


def binary_model(model, data, binary_activations):
    x_train, y_train, _, _ = data
    trained_model = binary.binarize(model, binary_activations=binary_activations)
    minicnn.fit(trained_model, x_train[:1000], y_train[:1000], epochs=1, seed=0, constraint=binary.clip_latent,
                verbose=False)
    return trained_model


def check_binary(model, data):
    proto = to_onnx(model)
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
    with pytest.raises(ValueError, match="opset must be an integer in 13"):
        to_onnx(zoo.lenet300(), opset=12)
    with pytest.raises(ValueError, match="cannot export a dict"):
        to_onnx({})


def test_opset_is_the_one_asked_for(seed_cnn, data):
    proto = check_float(seed_cnn, data, opset=17)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
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
        require_onnx()


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
