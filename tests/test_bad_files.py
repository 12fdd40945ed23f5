"""Broken and hostile model files: every saved kind, mutated (bytes flipped, the file cut,
the description's values and the arrays edited), must either load and predict finite
logits of the right shape, or raise ModelFileError; nothing else, and never more memory
than a bound on the file's size. MINICNN_FUZZ_CASES sets the number of cases per kind
(CI's default keeps the run short; thousands take a few minutes)."""

import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from minicnn.serialization import ModelFileError, read_npz, write_npz
from optim import binary, quantization, sharing, sparse
from optim.app.cli import main

CASES = int(os.environ.get("MINICNN_FUZZ_CASES", "40"))
X = np.random.default_rng(0).standard_normal((3, 1, 12, 12)).astype(np.float32)


def small_cnn(seed=0):
    return Sequential([Conv2D(1, 4, 3, rng=seed), ReLU(), MaxPool2D(2), Conv2D(4, 6, 3, padding=1, rng=seed + 1),
                       ReLU(), Flatten(), Dense(150, 16, rng=seed + 2), ReLU(), Dense(16, 10, rng=seed + 3)],
                      input_shape=(1, 12, 12))


def pruned(model, density=0.3):
    model = model.copy()
    for layer in model.layers:
        if "W" in layer.params:
            W = layer.params["W"]
            W[np.abs(W) < np.quantile(np.abs(W), 1 - density)] = 0
    return model


def every_kind():
    """{name: model} for each kind of file the project writes."""
    base = small_cnn()
    binarized = binary.binarize(base)
    return {
        "float": base,
        "sparse": sparse.to_sparse(pruned(base)),
        "shared": sharing.share_weights(base, 3),
        "shared_pruned": sharing.share_weights(pruned(base), 2, coding="packed"),
        "int8": quantization.quantize_model(base, X),
        "binary_training": binarized,
        "binary_packed": binary.pack(binarized),
        "binary_packed_inputs": binary.pack(binary.binarize(base, binary_activations=True)),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    paths = {}
    for name, model in every_kind().items():
        paths[name] = folder / f"{name}.npz"
        model.save(paths[name])
    return paths


def check_outcome(path):
    """Load `path`: ModelFileError, or a model that predicts finite logits (N, 10); memory bounded."""
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        model = minicnn.load(path)
    except ModelFileError:
        return "rejected"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= 10 * size + (64 << 20), f"{path.name}: loading took {peak:,} bytes for a {size:,}-byte file"
    logits = model.predict(X)
    assert logits.shape == (len(X), 10) and np.isfinite(logits).all(), f"{path.name}: logits {logits.shape}"
    return "loaded"


HOSTILE = [-5, -1, 0, 1, 2, 0.5, 1e12, 2**40, -(2**63), True, False, None, "no", "", [], {}, [1], [1, 2, 3, 4],
           {"a": 1}, "x" * 300]


def json_paths(value, path=()):
    """Every path to a value inside the description (dict keys, list indices)."""
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from json_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from json_paths(v, (*path, i))


def set_at(meta, path, value):
    target = meta
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def edit_array(rng, a):
    """A hostile version of array `a`: another dtype or byte order, another shape, NaN, huge values."""
    choice = rng.integers(8)
    if choice == 0:
        return a.astype(rng.choice([np.float16, np.float64, np.int64, np.uint8, np.int8, bool]))
    if choice == 1:
        return a.astype(a.dtype.newbyteorder(">"))
    if choice == 2:
        return a.reshape(-1)[: rng.integers(0, max(a.size, 1))]
    if choice == 3:
        return np.concatenate([a.reshape(-1), a.reshape(-1)[:7]])
    if choice == 4 and a.dtype.kind == "f" and a.size:
        b = a.copy()
        b.reshape(-1)[rng.integers(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return b
    if choice == 5 and a.size:
        b = a.copy()
        b.reshape(-1)[rng.integers(a.size)] = 3e38 if a.dtype.kind == "f" else np.iinfo(a.dtype).max
        return b
    if choice == 6:
        return a.reshape(a.shape[::-1]) if a.ndim > 1 else a.reshape(-1, 1)
    b = a.copy()
    b.reshape(-1).view(np.uint8)[rng.integers(max(a.nbytes, 1))] ^= 0xFF if a.nbytes else 0
    return b


def mutate(rng, src, dst):
    """Write to dst a mutated copy of the model file src; returns the mutation's class."""
    data = bytearray(src.read_bytes())
    kind = ["flip", "truncate", "json", "array", "drop"][rng.integers(5)]
    if kind == "flip":
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] ^= 1 << rng.integers(8)
        dst.write_bytes(bytes(data))
    elif kind == "truncate":
        dst.write_bytes(bytes(data[: rng.integers(len(data))]))
    else:
        meta, arrays = read_npz(src)
        if kind == "json":
            paths = [p for p in json_paths(meta) if p and p[0] not in ("format", "version")]
            set_at(meta, paths[rng.integers(len(paths))], HOSTILE[rng.integers(len(HOSTILE))])
        elif kind == "array":
            name = sorted(arrays)[rng.integers(len(arrays))]
            arrays[name] = edit_array(rng, arrays[name])
        else:
            arrays.pop(sorted(arrays)[rng.integers(len(arrays))])
        meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
        write_npz(dst, meta, arrays)
    return kind


@pytest.mark.parametrize("kind", ["float", "sparse", "shared", "shared_pruned", "int8", "binary_training",
                                  "binary_packed", "binary_packed_inputs"])
def test_mutated_files_load_cleanly_or_are_rejected(files, tmp_path, kind):
    assert check_outcome(files[kind]) == "loaded"  # the unmutated file is good
    rng = np.random.default_rng(sum(map(ord, kind)))
    outcomes = {}
    for case in range(CASES):
        path = tmp_path / f"{kind}-{case}.npz"
        how = mutate(rng, files[kind], path)
        outcomes.setdefault(how, []).append(check_outcome(path))
        path.unlink()
    rejected = sum(o.count("rejected") for o in outcomes.values())
    assert rejected > 0, f"{kind}: no mutation was ever rejected: {outcomes}"


# --------------------------------------------------------------------------
# One regression test for each class of problem the hostile probes found


def rewrite(src, dst, edit_meta=None, edit_arrays=None):
    meta, arrays = read_npz(src)
    if edit_meta:
        edit_meta(meta)
    if edit_arrays:
        edit_arrays(arrays)
    write_npz(dst, {k: v for k, v in meta.items() if k not in ("format", "version")}, arrays)
    return dst


def zip_with(tmp_path, src, transform):
    """A copy of the .npz src whose entries pass through transform(ZipInfo, bytes) -> (ZipInfo, bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            info, data = transform(info, zin.read(info))
            zout.writestr(info, data)
    path = tmp_path / "zipped.npz"
    path.write_bytes(out.getvalue())
    return path


@pytest.mark.parametrize("transform, message", [
    (lambda i, d: (i, d), None),  # a faithful copy loads
    (lambda i, d: (_compressed(i), d), "compressed"),
    (lambda i, d: (zipfile.ZipInfo(i.filename[:-4] + ".txt"), d), "not an .npy array"),
    (lambda i, d: (i, d[:8] + b"\xff" * 10 + d[18:]), "corrupt .npy header"),
    (lambda i, d: (i, d.replace(b"'descr': '<f4'", b"'descr': '|O8'", 1)), "corrupt .npy header|unsupported dtype"),
])
def test_a_zip_entries_are_checked(files, tmp_path, transform, message):
    """A: whatever the zip holds, the error is a ModelFileError that names the entry."""
    path = zip_with(tmp_path, files["float"], transform)
    if message is None:
        assert check_outcome(path) == "loaded"
        return
    with pytest.raises(ModelFileError, match=message):
        minicnn.load(path)


def _compressed(info):
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def test_a_encrypted_entries_are_rejected(files, tmp_path):
    data = bytearray(files["float"].read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        start = data.find(signature)
        while start != -1:
            data[start + flag_at] |= 0x1  # the "encrypted" bit of the general purpose flags
            start = data.find(signature, start + 4)
    path = tmp_path / "encrypted.npz"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="encrypted"):
        minicnn.load(path)


def test_a_deep_json_and_plain_npy_files_are_model_file_errors(files, tmp_path):
    text = '{"format": "minicnn", "version": 1, "model": ' + "[" * 100_000 + "]" * 100_000 + "}"
    deep = tmp_path / "deep.npz"
    np.savez(deep, meta=np.frombuffer(text.encode(), np.uint8))
    with pytest.raises(ModelFileError, match="entry 'meta': corrupt model description"):
        minicnn.load(deep)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros(3))
    with pytest.raises(ModelFileError, match="not a readable model file"):
        minicnn.load(plain)


@pytest.mark.parametrize("kind, edit, message", [
    ("float", lambda m: m.update(model=[1]), "'model' must name the model kind"),
    ("int8", lambda m: m.update(input_shape=[12, 12]), "op 0|cannot take inputs"),
    ("int8", lambda m: m["ops"][0]["config"].update(out_zero_point=1e300), "out_zero_point"),
    ("float", lambda m: m["layers"][0]["config"].update(kernel_size=10**12), "layer 0 .*array 'W' must have shape"),
    ("binary_packed", lambda m: m["layers"][3]["config"].update(stride=0), "stride must be an integer >= 1"),
    ("binary_packed", lambda m: m["layers"][3]["config"].update(padding=0.5), "padding must be an integer"),
    ("binary_packed", lambda m: m["layers"][3]["config"].update(kernel_size=-5), "kernel_size must be an integer"),
    ("binary_packed", lambda m: m["layers"][3]["config"].update(binary_input="no"), "binary_input must be true or false"),
])
def test_b_e_metadata_is_validated(files, tmp_path, kind, edit, message):
    with pytest.raises(ModelFileError, match=message):
        minicnn.load(rewrite(files[kind], tmp_path / "bad.npz", edit))


def test_c_dtypes_the_kernels_reject_are_rejected_or_converted(files, tmp_path):
    half = rewrite(files["float"], tmp_path / "half.npz",
                   edit_arrays=lambda a: a.update({"layers.0.W": a["layers.0.W"].astype(np.float16)}))
    with pytest.raises(ModelFileError, match="array 'W' must be float32 or float64, got float16"):
        minicnn.load(half)
    big = rewrite(files["sparse"], tmp_path / "big.npz",
                  edit_arrays=lambda a: a.update({k: v.astype(v.dtype.newbyteorder(">")) for k, v in a.items()}))
    np.testing.assert_array_equal(minicnn.load(big).predict(X), minicnn.load(files["sparse"]).predict(X))
    assert MaxPool2D(2).forward(X.astype(np.float16)).dtype == np.float32


def test_d_nothing_is_allocated_before_the_shapes_are_checked(files, tmp_path):
    huge = rewrite(files["float"], tmp_path / "huge.npz",
                   lambda m: m["layers"][6]["config"].update(in_features=5408, out_features=40000))
    tracemalloc.start()
    with pytest.raises(ModelFileError, match="array 'W' must have shape \\(5408, 40000\\)"):
        minicnn.load(huge)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"{peak:,} bytes"


def test_d_gzip_idx_is_inflated_only_as_far_as_its_header_says(tmp_path):
    import gzip

    header = bytes([0, 0, 8, 1]) + (1000).to_bytes(4, "big")
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip.compress(header + bytes(300 << 20)))  # a 300 MB payload in ~300 KB
    tracemalloc.start()
    with pytest.raises(ValueError, match="trailing bytes"):
        minicnn.datasets.read_idx(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20, f"{peak:,} bytes"


@pytest.mark.parametrize("kind, edit_arrays, message", [
    ("float", lambda a: a["layers.8.b"].__setitem__(0, np.nan), "array 'b' has non-finite values"),
    ("int8", lambda a: a["ops.5.w_scale"].__setitem__(0, 3e38), "overflow|multipliers"),
])
def test_e_silently_wrong_files_are_rejected(files, tmp_path, kind, edit_arrays, message):
    with pytest.raises(ModelFileError, match=message):
        minicnn.load(rewrite(files[kind], tmp_path / "bad.npz", edit_arrays=edit_arrays))


@pytest.mark.parametrize("argv, message", [
    (["compress", "--sparsity", "-0.5", "--retrain-epochs", "0"], "sparsity must be in"),
    (["cut", "--truncate-after", "-1"], "must be an integer >= 0"),
    (["quantize", "--bits", "8", "--calibration", "-5"], "must be an integer >= 1"),
    (["prune", "--method", "global", "--sparsity", "0.5"], "needs a minicnn Sequential model"),
    (["quantize", "--bits", "8"], "needs a minicnn Sequential model"),
])
def test_f_hyperparameters_and_wrong_kinds_get_one_line(tmp_path, capsys, argv, message):
    float_model = minicnn.zoo.lenet300(seed=0)
    x = minicnn.datasets.load()[0][:16]
    int8 = argv[0] in ("prune", "quantize") and "--calibration" not in argv
    model = tmp_path / "model.npz"
    (quantization.quantize_model(float_model, x) if int8 else float_model).save(model)
    try:
        status = main([*argv, "--model", str(model), "--out", str(tmp_path / "out.npz")])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err


def test_f_training_on_no_images_is_an_error():
    model = small_cnn()
    with pytest.raises(ValueError, match="no training images"):
        minicnn.fit(model, X[:0], np.zeros(0, np.int64), epochs=1, verbose=False)
    with pytest.raises(ValueError, match="no images to evaluate"):
        minicnn.evaluate(model, X[:0], np.zeros(0, np.int64))


def test_g_long_names_and_permissions_survive_a_save(tmp_path):
    path = tmp_path / ("m" * 246 + ".npz")  # 250 characters, the longest names most file systems take
    small_cnn().save(path)
    os.chmod(path, 0o600)
    small_cnn(seed=1).save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600 and os.listdir(tmp_path) == [path.name]


def test_h_pack_weights_rejects_minus_128():
    from optim.quantization.kernels import pack_weights

    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        pack_weights(np.full((2, 8), -128, np.int8))
