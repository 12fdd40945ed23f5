"""Tests for minicnn.datasets: IDX reading/writing, fetch, load.

Everything runs offline: downloads use file:// URLs to files made here.
"""

import gzip
import os
import re
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minicnn import datasets

NATIVE_DTYPES = [d.newbyteorder("=") for d in datasets.IDX_DTYPES.values()]
FASHION_DIR = datasets.SYSTEM_FOLDERS["fashion-mnist"]


def sample_array(dtype, shape=(3, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def raises_for(path, words):
    """pytest.raises(ValueError) whose message must name `path` and contain `words`."""
    return pytest.raises(ValueError, match=re.escape(str(path)) + r".*" + words)


def idx_bytes(code, shape, payload_len):
    header = bytes([0, 0, code, len(shape)]) + b"".join(d.to_bytes(4, "big") for d in shape)
    return header + bytes(payload_len)


# --- IDX round trip --------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", NATIVE_DTYPES, ids=str)
def test_round_trip_every_dtype(tmp_path, dtype, suffix):
    a = sample_array(dtype)
    path = tmp_path / f"a.idx{suffix}"
    datasets.write_idx(path, a)
    b = datasets.read_idx(path)
    assert b.dtype == dtype and b.dtype.isnative
    assert b.shape == a.shape
    assert b.tobytes() == a.tobytes()
    assert b.flags.writeable


@settings(max_examples=60, deadline=None)
@given(
    a=hnp.arrays(
        dtype=st.sampled_from(NATIVE_DTYPES + [d.newbyteorder(">") for d in NATIVE_DTYPES]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
    ),
    suffix=st.sampled_from(["", ".gz"]),
)
def test_round_trip_property(tmp_path_factory, a, suffix):
    path = tmp_path_factory.mktemp("idx") / f"a.idx{suffix}"
    datasets.write_idx(path, a)
    b = datasets.read_idx(path)
    assert b.dtype.isnative and b.dtype == a.dtype.newbyteorder("=")
    assert b.shape == a.shape
    # Compare bytes in one byte order: exact, and NaN payloads compare equal.
    assert b.tobytes() == a.astype(b.dtype).tobytes()


def test_write_gz_is_gzip_and_raw_is_not(tmp_path):
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    datasets.write_idx(tmp_path / "a.gz", a)
    datasets.write_idx(tmp_path / "a.idx", a)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "a.idx").read_bytes() == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])


def test_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(12, dtype=np.int16).reshape(3, 4)
    datasets.write_idx(tmp_path / "a.gz", a)
    datasets.write_idx(tmp_path / "b", a)
    os.replace(tmp_path / "a.gz", tmp_path / "gzipped-without-extension")
    os.replace(tmp_path / "b", tmp_path / "raw-with-extension.gz")
    for name in ("gzipped-without-extension", "raw-with-extension.gz"):
        np.testing.assert_array_equal(datasets.read_idx(tmp_path / name), a)


def test_write_idx_rejects_unsupported_arrays(tmp_path):
    with pytest.raises(TypeError, match="int64 has no IDX type code"):
        datasets.write_idx(tmp_path / "a", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="rank >= 1"):
        datasets.write_idx(tmp_path / "a", np.array(3, dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        datasets.write_idx(tmp_path / "a", [1, 2, 3])
    assert os.listdir(tmp_path) == []


# --- IDX errors -------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_payload(tmp_path, gz):
    data = idx_bytes(0x08, (60000, 28, 28), 1000)
    path = tmp_path / "short"
    path.write_bytes(gzip.compress(data) if gz else data)
    with raises_for(path, "truncated IDX file: expected 47040000 bytes of data .* got 1000"):
        datasets.read_idx(path)


def test_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    datasets.write_idx(path, np.zeros((2, 3), dtype=np.float32))
    path.write_bytes(path.read_bytes() + b"\x00")
    with raises_for(path, "trailing bytes.*expected 24 bytes of data .* got more than 24"):
        datasets.read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "hdr"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 5]))
    with raises_for(path, "truncated IDX header: 3 dimensions need 16 bytes, got 8"):
        datasets.read_idx(path)
    path.write_bytes(b"\x00\x00")
    with raises_for(path, "truncated IDX header"):
        datasets.read_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with raises_for(path, "not an IDX file: magic number 89504e47"):
        datasets.read_idx(path)


def test_unknown_dtype_code(tmp_path):
    path = tmp_path / "code"
    path.write_bytes(idx_bytes(0x0A, (4,), 4))
    with raises_for(path, "unknown IDX data type code 0x0A"):
        datasets.read_idx(path)


def test_zero_dimensions(tmp_path):
    path = tmp_path / "rank0"
    path.write_bytes(idx_bytes(0x08, (), 1))
    with raises_for(path, "0 dimensions"):
        datasets.read_idx(path)


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_corrupt_gzip(tmp_path, damage):
    path = tmp_path / "a.gz"
    datasets.write_idx(path, sample_array(np.dtype(np.float64), shape=(50, 50)))
    data = bytearray(path.read_bytes())
    if damage == "cut":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with raises_for(path, "corrupt gzip data"):
        datasets.read_idx(path)


# --- fetch ------------------------------------------------------------------


class CountingOpener:
    """urlopen stand-in that records the URLs it opens."""

    def __init__(self):
        self.urls = []

    def __call__(self, url, timeout):
        self.urls.append(url)
        return urllib.request.urlopen(url, timeout=timeout)


@pytest.fixture
def remote(tmp_path):
    """A file to 'download': (file:// URL, its content, its md5)."""
    src = tmp_path / "remote" / "data.bin"
    src.parent.mkdir()
    content = bytes(range(256)) * 100
    src.write_bytes(content)
    return src.as_uri(), content, datasets.file_hash(src)


def test_fetch_downloads_then_uses_cache(tmp_path, remote):
    url, content, md5 = remote
    dest = tmp_path / "cache" / "sub" / "data.bin"
    opener = CountingOpener()
    assert datasets.fetch(url, dest, md5, opener=opener) == str(dest)
    assert dest.read_bytes() == content
    assert opener.urls == [url]
    mtime = dest.stat().st_mtime_ns
    datasets.fetch(url, dest, md5, opener=opener)
    assert opener.urls == [url]
    assert dest.stat().st_mtime_ns == mtime


def test_fetch_with_default_opener(tmp_path, remote):
    url, content, md5 = remote
    dest = tmp_path / "data.bin"
    datasets.fetch(url, dest, md5)
    assert dest.read_bytes() == content


def test_fetch_replaces_a_file_with_wrong_checksum(tmp_path, remote):
    url, content, md5 = remote
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale")
    opener = CountingOpener()
    datasets.fetch(url, dest, md5, opener=opener)
    assert opener.urls == [url]
    assert dest.read_bytes() == content


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path, remote):
    url, _, md5 = remote
    folder = tmp_path / "cache"
    wrong = "0" * 32
    with pytest.raises(ValueError, match=f"checksum mismatch: expected md5 {wrong}, got {md5}"):
        datasets.fetch(url, folder / "data.bin", wrong)
    assert os.listdir(folder) == []  # neither the file nor a temporary file


# --- load ---------------------------------------------------------------------


def test_datasets_table():
    assert set(datasets.DATASETS) == {"mnist10k", "mnist", "fashion-mnist"}
    assert all(isinstance(d, str) and d for d in datasets.DATASETS.values())


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'cifar'; known: mnist10k, mnist, fashion-mnist"):
        datasets.load("cifar")


def check_split(x, y, n):
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert x.flags.c_contiguous
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert 0 <= y.min() and y.max() <= 9


def test_load_mnist10k():
    x_train, y_train, x_test, y_test = datasets.load()
    check_split(x_train, y_train, 8000)
    check_split(x_test, y_test, 2000)
    assert x_train.max() == 1.0  # scaled by 255, not by the data's own maximum
    assert set(np.unique(y_train)) == set(range(10))


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                    reason=f"{FASHION_DIR} missing (install the Debian package dataset-fashion-mnist)")
def test_load_fashion_mnist_system_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path))  # never touch the real cache
    x_train, y_train, x_test, y_test = datasets.load("fashion-mnist")
    check_split(x_train, y_train, 60000)
    check_split(x_test, y_test, 10000)
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert os.listdir(tmp_path) == []


def make_idx_folder(folder, n_train=7, n_test=3, seed=0):
    """Write the four IDX files of a tiny data set; return the uint8/uint8 arrays."""
    rng = np.random.default_rng(seed)
    arrays = []
    for n in (n_train, n_test):
        arrays.append(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        arrays.append(rng.integers(0, 10, size=n, dtype=np.uint8))
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in zip(datasets.IDX_FILES, arrays):
        datasets.write_idx(folder / name, a)
    return arrays


def check_loaded(loaded, arrays):
    for got, want in zip(loaded[0::2], arrays[0::2]):
        np.testing.assert_array_equal(got[:, 0], want.astype(np.float32) / 255)
    for got, want in zip(loaded[1::2], arrays[1::2]):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int64


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_from_root(tmp_path, name):
    arrays = make_idx_folder(tmp_path)
    loaded = datasets.load(name, root=tmp_path)
    check_split(loaded[0], loaded[1], 7)
    check_split(loaded[2], loaded[3], 3)
    check_loaded(loaded, arrays)


def test_load_downloads_missing_files_into_cache(tmp_path, monkeypatch):
    arrays = make_idx_folder(tmp_path / "server")
    md5 = {f: datasets.file_hash(tmp_path / "server" / f) for f in datasets.IDX_FILES}
    monkeypatch.setitem(datasets.SOURCES, "mnist", {"url": (tmp_path / "server").as_uri() + "/", "md5": md5})
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "mnist"
    cached.mkdir(parents=True)
    datasets.write_idx(cached / datasets.IDX_FILES[1], arrays[1])  # one file already there
    check_loaded(datasets.load("mnist"), arrays)
    assert sorted(os.listdir(cached)) == sorted(datasets.IDX_FILES)


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path))
    assert datasets.cache_folder("mnist") == os.path.join(str(tmp_path), "mnist")
    monkeypatch.delenv("MINICNN_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert datasets.cache_folder("mnist") == os.path.join(str(tmp_path), "home", ".cache", "minicnn", "mnist")


def test_load_rejects_count_mismatch(tmp_path):
    make_idx_folder(tmp_path)
    datasets.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(6, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(train\) labels has 6 labels for 7 samples"):
        datasets.load("mnist", root=tmp_path)


def test_load_rejects_bad_labels(tmp_path):
    make_idx_folder(tmp_path)
    datasets.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 10, 3], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\(test\) labels must lie in \[0, 10\)"):
        datasets.load("mnist", root=tmp_path)


def test_load_rejects_bad_images(tmp_path):
    make_idx_folder(tmp_path)
    datasets.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 27), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, 28, 28\), got uint8 \(3, 28, 27\)"):
        datasets.load("mnist", root=tmp_path)


def test_split_validation_is_a_seeded_partition():
    x = np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1)
    y = np.arange(20)
    xf, yf, xv, yv = datasets.split_validation(x, y, 0.25, seed=3)
    assert len(yv) == 5 and len(yf) == 15
    assert sorted(np.concatenate([yf, yv]).tolist()) == list(range(20))
    np.testing.assert_array_equal(xv.ravel(), yv)
    np.testing.assert_array_equal(datasets.split_validation(x, y, 0.25, seed=3)[3], yv)
    with pytest.raises(ValueError, match="fraction"):
        datasets.split_validation(x, y, 1.0)


@given(st.integers(1, 3), st.integers(1, 2), st.integers(2, 7), st.integers(2, 7), st.integers(1, 2), st.integers(0, 9))
def test_shifted_views_are_the_images_translated_with_zeros_shifted_in(N, C, H, W, shift, seed):
    """View k = 3 (dy / s + 1) + (dx / s + 1) holds image n moved dy rows down and dx columns right:
    its pixel (i, j) is the image's (i - dy, j - dx), or 0 outside it; the labels follow the images."""
    if min(H, W) <= shift:
        with pytest.raises(ValueError, match="larger than the shift"):
            datasets.shifted_views(np.zeros((N, C, H, W), np.float32), np.zeros(N), shift)
        return
    x = np.random.default_rng(seed).random((N, C, H, W)).astype(np.float32)
    y = np.arange(N) + 3
    views, labels = datasets.shifted_views(x, y, shift)
    assert views.shape == (9 * N, C, H, W) and views.dtype == x.dtype
    np.testing.assert_array_equal(labels, np.tile(y, 9))
    for k, (dy, dx) in enumerate((dy, dx) for dy in (-shift, 0, shift) for dx in (-shift, 0, shift)):
        for i in range(H):
            for j in range(W):
                inside = 0 <= i - dy < H and 0 <= j - dx < W
                expected = x[:, :, i - dy, j - dx] if inside else 0
                np.testing.assert_array_equal(views[k * N : (k + 1) * N, :, i, j], expected)
    with pytest.raises(ValueError, match="images"):
        datasets.shifted_views(x.reshape(N, -1), y)
