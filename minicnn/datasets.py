"""Data sets: the IDX file format, checksummed downloads, and `load`.

MNIST and Fashion-MNIST are distributed as IDX files: a 4-byte magic number
(two zero bytes, a data type code, the number of dimensions), one big-endian
uint32 per dimension, then the values in C order, big-endian. `read_idx` and
`write_idx` handle that format, `fetch` downloads a file and verifies its
published checksum, and `load` returns a data set ready for training:

    x_train, y_train, x_test, y_test = load("mnist10k")
    # x: float32 (N, 1, 28, 28) in [0, 1]; y: int64 (N,) in 0..9

Only the small "mnist10k" set ships with the package; the full sets are read
from a local folder or downloaded once into a cache folder.
"""

import gzip
import hashlib
import math
import os
import shutil
import struct
import sys
import urllib.request
import zlib

import numpy as np

from .atomic import atomic_path
from .checks import check_array, check_labels, check_positive_int

DATASETS = {
    "mnist10k": "10,000 MNIST digits bundled with minicnn (8,000 train / 2,000 test), no download",
    "mnist": "MNIST handwritten digits (60,000 train / 10,000 test), downloaded on first use",
    "fashion-mnist": "Zalando Fashion-MNIST clothing images (60,000 train / 10,000 test); "
    "read from the Debian package dataset-fashion-mnist if installed, else downloaded",
}

# IDX data type code -> dtype of the values as stored (big-endian).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Keyed by kind and size ("i2", "f4"...) so that arrays of either byte order map to a code.
_IDX_CODES = {dtype.str[1:]: code for code, dtype in IDX_DTYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"

# The files of the full data sets and the md5 checksums published with them
# (the ones torchvision checks). The same four names are used by both sets.
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SOURCES = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
}

# Folders where a system package may already have installed a data set.
SYSTEM_FOLDERS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

MNIST10K_PATH = os.path.join(os.path.dirname(__file__), "data", "mnist10k.npz")
MNIST10K_SHA256 = "a344d93dcaeff051093d6c5ed52e3f2ec6cb92c1b4ca9845d5c459c29e0f57a9"

DOWNLOAD_TIMEOUT = 60  # seconds without data before a download gives up


def read_idx(path):
    """Read an IDX file, gzip-compressed or raw, into a native-endian ndarray.

    The array has the file's shape and the dtype given by its type code
    (uint8, int8, int16, int32, float32 or float64). Raises ValueError, naming
    the file, for corrupt gzip data, a bad header, or a payload whose length
    does not match the header.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    # Sniff the content rather than trust the name: a .gz may have been
    # unpacked, or a raw file saved with the wrong extension. A gzip stream is
    # inflated only as far as the header, then only as far as the header says:
    # a small file cannot claim gigabytes and get them allocated.
    read = _gunzip_reader(data, path) if data.startswith(_GZIP_MAGIC) else _raw_reader(data)
    head = read(4)
    if len(head) < 4:
        raise ValueError(f"{path}: truncated IDX header: {len(head)} bytes")
    zero0, zero1, code, ndim = head
    if zero0 != 0 or zero1 != 0:
        raise ValueError(f"{path}: not an IDX file: magic number {head.hex()} "
                         "does not start with two zero bytes")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02X} (known: {known})")
    if ndim < 1:
        raise ValueError(f"{path}: IDX file has 0 dimensions, need at least 1")
    dims = read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need "
                         f"{4 + 4 * ndim} bytes, got {4 + len(dims)}")
    shape = struct.unpack(f">{ndim}I", dims)
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    data = read(expected + 1)
    if len(data) != expected:
        problem = "truncated IDX file" if len(data) < expected else "trailing bytes after IDX data"
        got = len(data) if len(data) < expected else f"more than {expected}"  # not inflated further
        raise ValueError(f"{path}: {problem}: expected {expected} bytes of data "
                         f"for shape {shape}, got {got}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    # astype copies, so the result is also writable (frombuffer's view is not).
    return array.astype(dtype.newbyteorder("="))


def _raw_reader(data):
    """read(n): the next n bytes of `data`, as views (the payload is not copied)."""
    data, position = memoryview(data), 0

    def read(n):
        nonlocal position
        chunk, position = data[position : position + n], min(position + n, len(data))
        return chunk

    return read


def _gunzip_reader(data, path):
    """read(n): the next n bytes of the gzip stream `data`, inflated no further than asked."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # 16: a gzip header and trailer
    pending = data

    def read(n):
        nonlocal pending
        try:
            chunk = inflate.decompress(pending, n)
        except zlib.error as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from None
        pending = inflate.unconsumed_tail
        if len(chunk) < n and not inflate.eof:
            raise ValueError(f"{path}: corrupt gzip data (the stream ends early)")
        return chunk

    return read


def write_idx(path, array):
    """Write `array` (rank >= 1, dtype uint8, int8, int16, int32, float32 or
    float64) as an IDX file; gzip-compressed when `path` ends in ".gz".

    The file is replaced atomically, so a failed write leaves no partial file.
    """
    path = os.fspath(path)
    check_array(array, "array", kind=None, finite=False)
    if array.ndim < 1:
        raise ValueError("array must have rank >= 1 for IDX, got a scalar")
    code = _IDX_CODES.get(array.dtype.str[1:])
    if code is None:
        raise TypeError(f"array dtype {array.dtype} has no IDX type code; use one of "
                        + ", ".join(str(d.newbyteorder("=")) for d in IDX_DTYPES.values()))
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(IDX_DTYPES[code]).tobytes()
    if path.endswith(".gz"):
        # mtime=0 makes the output depend on the data only, not on the clock.
        data = gzip.compress(data, mtime=0)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def file_hash(path, algorithm="md5"):
    """Return the hex digest of a file's contents ("md5", "sha256", ...)."""
    # md5 here detects corrupt or wrong files, it is not a security check;
    # saying so keeps it usable on FIPS-restricted Pythons.
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(url, dest, md5, opener=urllib.request.urlopen):
    """Download `url` to `dest` unless `dest` already has the md5 `md5`.

    The data go to a temporary file that is checked before it is renamed onto
    `dest`, so `dest` only ever holds a verified file. A checksum mismatch
    raises ValueError and leaves nothing behind. `opener(url, timeout=...)`
    must return a readable context manager (tests pass file:// URLs or a stub).
    Returns `dest`.
    """
    dest = os.fspath(dest)
    if os.path.exists(dest) and file_hash(dest) == md5:
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    with atomic_path(dest) as tmp:
        with opener(url, timeout=DOWNLOAD_TIMEOUT) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        got = file_hash(tmp)
        if got != md5:
            raise ValueError(f"{url}: checksum mismatch: expected md5 {md5}, got {got}")
    return dest


def cache_folder(name):
    """Folder where data set `name` is downloaded: $MINICNN_DATA/<name>,
    or ~/.cache/minicnn/<name> when MINICNN_DATA is not set."""
    base = os.environ.get("MINICNN_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "minicnn")
    return os.path.join(base, name)


def load(name="mnist10k", root=None):
    """Load data set `name` (a key of DATASETS) as (x_train, y_train, x_test, y_test).

    x: float32 (N, 1, 28, 28), pixel values scaled to [0, 1].
    y: int64 (N,), class labels in 0..9.

    For the IDX data sets the four files are read from `root` if given, else
    from the first of the system folder (if any) and the cache folder that
    holds all four; files still missing are downloaded into `root` or the cache
    folder and checked against their published md5.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    if name == "mnist10k":
        source = MNIST10K_PATH
        parts = _load_npz(source)
    else:
        source = _idx_folder(name, root)
        parts = [read_idx(os.path.join(source, f)) for f in IDX_FILES]
    x_train, y_train, x_test, y_test = parts
    return (*_prepare(x_train, y_train, f"{source} (train)"),
            *_prepare(x_test, y_test, f"{source} (test)"))


def _load_npz(path):
    # A bundled file that fails its checksum (e.g. a Git LFS pointer checked
    # out instead of the data) would otherwise fail later with a puzzling error.
    got = file_hash(path, "sha256")
    if got != MNIST10K_SHA256:
        raise ValueError(f"{path}: checksum mismatch: expected sha256 {MNIST10K_SHA256}, got {got}")
    with np.load(path, allow_pickle=False) as f:
        return [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]


def _idx_folder(name, root):
    """Return a folder holding all IDX files of `name`, downloading missing ones."""
    if root is not None:
        candidates = [os.fspath(root)]
    else:
        candidates = [f for f in (SYSTEM_FOLDERS.get(name), cache_folder(name)) if f]
    for folder in candidates:
        if all(os.path.exists(os.path.join(folder, f)) for f in IDX_FILES):
            return folder
    # Files already present are used as they are rather than checked against
    # the published md5: repackaged copies (Debian recompresses the .gz) differ
    # byte for byte yet hold the same data. A damaged file still fails in
    # read_idx or _prepare, with its name in the message.
    folder = candidates[-1]
    source = SOURCES[name]
    for f in IDX_FILES:
        dest = os.path.join(folder, f)
        if not os.path.exists(dest):
            fetch(source["url"] + f, dest, source["md5"][f])
    return folder


def _prepare(x, y, what):
    """Check uint8 images (N, 28, 28) and labels (N,) in 0..9, and convert them
    to float32 (N, 1, 28, 28) in [0, 1] and int64 (N,)."""
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"{what}: images must be uint8 (N, 28, 28), got {x.dtype} {x.shape}")
    check_labels(y, x.shape[0], 10, name=f"{what} labels")
    x = x.astype(np.float32)
    x /= 255  # in place: the full training set is 188 MB as float32
    return x.reshape(-1, 1, 28, 28), y.astype(np.int64)


def split_validation(x, y, fraction=0.1, seed=0):
    """Hold out a random `fraction` of (x, y) for validation: (x_fit, y_fit, x_val, y_val).

    Decisions made while compressing (which layer to cut, how far to prune)
    are taken on this split, so the test split stays untouched for the report.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_val = max(1, int(round(fraction * len(x))))
    val, fit = order[:n_val], order[n_val:]
    return x[fit], y[fit], x[val], y[val]


def shifted_views(x, y, shift=1):
    """Each image of x (N, C, H, W) and its eight translations by `shift` pixels (up, down, left,
    right and diagonally, zeros shifted in): (9 N, C, H, W), view by view, and y repeated (9 N,).

    A model's accuracy on a validation split scored this way counts each image nine times, under
    small displacements of its strokes: a difference between two models of the same network then
    rests on more than one reading of each image (docs/auto.md measured what it changed).
    """
    check_positive_int(shift, "shift")
    if x.ndim != 4 or min(x.shape[2:]) <= shift:
        raise ValueError(f"shifted views need images (N, C, H, W) larger than the shift {shift}, got {x.shape} "
                         "(compress --auto: --plain-validation scores other inputs as they are)")
    if len(y) != len(x):
        raise ValueError(f"one label per image: got {len(y)} labels for {len(x)} images")
    H, W = x.shape[2:]
    views = np.zeros((9, *x.shape), x.dtype)
    for k, (dy, dx) in enumerate((dy, dx) for dy in (-shift, 0, shift) for dx in (-shift, 0, shift)):
        views[k, :, :, max(dy, 0) : H + min(dy, 0), max(dx, 0) : W + min(dx, 0)] = \
            x[:, :, max(-dy, 0) : H + min(-dy, 0), max(-dx, 0) : W + min(-dx, 0)]
    return views.reshape(-1, *x.shape[1:]), np.tile(y, 9)
