"""Model files: one .npz holding a JSON description and the arrays.

Layout of a file written by `save`:

    meta              uint8 array: UTF-8 JSON {"format": "minicnn", "version": 1,
                      "model": "sequential", "input_shape": [...],
                      "layers": [{"kind": "conv2d", "config": {...}}, ...]}
    layers.<i>.<name> the arrays of layer i, as returned by `layer.state()`

Nothing is pickled: the file is read with allow_pickle=False, so loading a
model file never runs code. Compressed layers from `optim` (pruned, shared,
quantized, binary) store their own arrays under their own kinds, which
`optim` registers here when it is imported (`register_layer`,
`register_model`); `load` imports optim only when a file holds a kind that
is not registered yet.
The file is uncompressed on purpose: its size on disk is the honest size of
the format, not of zlib's work.
"""

import json
import math
import os
import zipfile

import numpy as np

from . import layers
from .atomic import atomic_path
from .model import Sequential

FORMAT, VERSION = "minicnn", 1

# Saved kind -> the layer class (with from_state, or built from config and params), and
# saved model kind -> a loader(meta, arrays). minicnn's own layers, and what optim registers.
LAYER_KINDS = dict(layers.LAYER_KINDS)
MODEL_KINDS = {}


def register_layer(cls):
    """Let `load` read layers of `cls.kind` back as `cls`."""
    LAYER_KINDS[cls.kind] = cls


def register_model(kind, loader):
    """Let `load` read files whose model kind is `kind` with loader(meta, arrays)."""
    MODEL_KINDS[kind] = loader


def _registered(table, kind):
    """table[kind], or None; a kind not registered yet may be one of optim's, so import it once."""
    if kind not in table:
        import optim  # noqa: F401  the one place minicnn meets optim: it registers its kinds on import
    return table.get(kind)


def save(model, path):
    """Write `model` (a Sequential) to `path` atomically: a failed save leaves the old file intact."""
    meta = {
        "model": "sequential",
        "input_shape": list(model.input_shape),
        "layers": [{"kind": layer.kind, "config": layer.config()} for layer in model.layers],
    }
    arrays = {}
    for i, layer in enumerate(model.layers):
        for name, value in state_of(layer).items():
            arrays[f"layers.{i}.{name}"] = value
    write_npz(path, meta, arrays)


def write_npz(path, meta, arrays):
    """Write the JSON-able `meta` dict and the arrays to `path`: a temporary file, then a rename.

    meta is stored as UTF-8 bytes; a numpy string array would be UTF-32, four
    bytes a character, a real cost in a 30 KB compressed model.
    """
    meta = {"format": FORMAT, "version": VERSION, **meta}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez(f, **arrays)


class ModelFileError(ValueError):
    """A model file that cannot be read: the message names the file, the entry and the problem."""


MAX_META_BYTES = 1 << 20  # a model's description takes a few KB
_STORED_KINDS = "biuf"  # bool, integers, floats: no objects, strings or records


def read_npz(path):
    """(meta dict, {name: array}) from a file written by `write_npz`.

    Nothing in the file is trusted before it is checked, and nothing is allocated
    from what it says before that: every zip entry must be an .npy array stored
    uncompressed (so an array costs what the file holds) and unencrypted, with
    a plain numeric dtype and a header whose shape matches the entry's bytes;
    the description must be UTF-8 JSON of at most MAX_META_BYTES, without NaN
    or Infinity. Anything else raises ModelFileError naming the file and the entry.
    """
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {}
            for info in archive.infolist():
                name = _check_entry(info)
                with archive.open(info) as f:
                    arrays[name] = _read_npy(f, info.file_size, name)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError) as e:
        # zipfile's NotImplementedError and RuntimeError: features (patched data, passwords) no model uses
        raise ModelFileError(f"{path}: not a readable model file (corrupt or truncated .npz: {e})") from None
    if "meta" not in arrays:
        raise ModelFileError(f"{path}: not a minicnn model file (no 'meta' entry)")
    meta = _parse_meta(arrays.pop("meta"), path)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a minicnn model file")
    if meta.get("version") != VERSION:
        raise ModelFileError(f"{path}: unsupported model file version {meta.get('version')!r}")
    return meta, arrays


def _check_entry(info):
    """The array name of a zip entry, after checking that it is a plain stored .npy file."""
    if not info.filename.endswith(".npy"):
        raise ModelFileError(f"entry {info.filename!r} is not an .npy array")
    if info.flag_bits & 0x1:
        raise ModelFileError(f"entry {info.filename!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ModelFileError(f"entry {info.filename!r} is compressed (method {info.compress_type}); "
                             "model files are written uncompressed")
    return info.filename[:-4]


def _read_npy(f, size, name):
    """The array of an .npy entry of `size` bytes, its header checked before its data are read."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, fortran_order, dtype = read_header(f)
    except Exception as e:  # numpy's header parser raises many kinds of error on malformed bytes
        raise ModelFileError(f"entry {name!r}: corrupt .npy header ({type(e).__name__}: {e})") from None
    if dtype.kind not in _STORED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ModelFileError(f"entry {name!r}: unsupported dtype {dtype}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != size - f.tell():
        raise ModelFileError(f"entry {name!r}: its header says {shape} {dtype} ({nbytes} bytes) "
                             f"but it holds {size - f.tell()} bytes")
    raw = f.read(nbytes)
    if len(raw) != nbytes:  # the zip directory claimed more than the entry holds
        raise ModelFileError(f"entry {name!r}: truncated: {len(raw)} of its {nbytes} bytes")
    data = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    return np.array(data, dtype=dtype.newbyteorder("="), order="C")  # a writable copy, in native byte order


def _parse_meta(raw, path):
    """The description dict from the 'meta' entry's UTF-8 JSON bytes."""
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_META_BYTES:
        raise ModelFileError(f"{path}: entry 'meta' must be at most {MAX_META_BYTES} UTF-8 bytes, "
                             f"got {raw.dtype} {raw.shape}")

    def reject(constant):
        raise ValueError(f"{constant} is not a number a model file may hold")

    try:
        meta = json.loads(raw.tobytes().decode(), parse_constant=reject)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFileError(f"{path}: entry 'meta': corrupt model description ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: entry 'meta': not a minicnn model description")
    return meta


FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# The largest magnitude a stored float may have: a trained weight is far smaller, and a few
# layers of values past it overflow float32 (a finite 3e38 in a file gives inf logits).
MAX_ABS = 1e6


def stored_array(arrays, name, shape=None, dtypes=FLOATS, finite=True):
    """arrays[name], checked: present, of one of `dtypes`, of `shape` (None: any), finite
    and within +-MAX_ABS (floats). What every loader uses before it builds anything from an array."""
    if name not in arrays:
        raise ValueError(f"missing its {name!r} array")
    a = arrays[name]
    if a.dtype not in dtypes:
        raise ValueError(f"array {name!r} must be {' or '.join(map(str, dtypes))}, got {a.dtype}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"array {name!r} must have shape {tuple(shape)}, got {a.shape}")
    if finite and a.dtype.kind == "f" and not (np.abs(a) <= MAX_ABS).all():  # NaN fails the comparison too
        raise ValueError(f"array {name!r} has non-finite values or values beyond +-{MAX_ABS:g}")
    return a


MAX_INPUT_SIZE = 1 << 24  # values per sample, of the input and of every layer's output


def check_input_shape(shape):
    """A model's per-sample input shape from a file: 1 to 3 positive ints, at most MAX_INPUT_SIZE values."""
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
            or math.prod(shape) > MAX_INPUT_SIZE):
        raise ValueError(f"input_shape must be 1 to 3 positive integers, at most {MAX_INPUT_SIZE} values, "
                         f"got {shape!r:.80}")
    return tuple(shape)


def entries(arrays, prefix):
    """{name: array} of the entries named prefix + name (one layer's arrays)."""
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def check_specs(specs, what):
    """A file's list of {"kind": str, "config": dict} (its layers or ops), checked."""
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"{what} must be a non-empty list, got {specs!r:.80}")
    for i, spec in enumerate(specs):
        if not (isinstance(spec, dict) and isinstance(spec.get("kind"), str) and isinstance(spec.get("config"), dict)):
            raise ValueError(f"{what} {i} must be {{'kind': str, 'config': {{...}}}}, got {spec!r:.80}")
    return specs


def check_all_used(arrays, used):
    """ValueError if the file holds arrays that no layer read (a damaged or foreign file)."""
    extra = sorted(set(arrays) - set(used))
    if extra:
        raise ValueError(f"unexpected arrays {extra[:5]}")


def state_of(layer):
    """The arrays a layer stores: `layer.state()` if it defines one, else its params."""
    return layer.state() if hasattr(layer, "state") else layer.params


def layer_from_state(kind, config, arrays):
    """Rebuild one layer from its kind, config and stored arrays, the arrays checked against
    the config before the layer is built (a layer allocates what its config says)."""
    cls = _registered(LAYER_KINDS, kind)
    if cls is None:
        raise ValueError(f"unknown layer kind {kind!r}")
    if hasattr(cls, "from_state"):
        return cls.from_state(config, arrays)
    shapes = cls.param_shapes(**config)  # checks the config; allocates nothing
    params = {name: stored_array(arrays, name, shape) for name, shape in shapes.items()}
    layer = cls(**config)
    for name, a in params.items():
        layer.params[name] = a
        layer.grads[name] = np.zeros_like(a)
    return layer


# Errors a damaged description can raise while a model is rebuilt from it.
_DAMAGE = (ValueError, TypeError, KeyError, IndexError, OverflowError, ZeroDivisionError)


def load(path):
    """Load any model file this project writes; the result has predict(x) and summary().

    Raises ModelFileError (a ValueError) naming the file, the entry and the problem for
    any file that is not a valid model, before allocating anything from what it says.
    """
    meta, arrays = read_npz(path)
    kind = meta.get("model")
    try:
        if not isinstance(kind, str):
            raise ValueError(f"'model' must name the model kind, got {kind!r:.80}")
        if kind == "sequential":
            return _load_sequential(meta, arrays)
        loader = _registered(MODEL_KINDS, kind)
        if loader is None:
            raise ValueError(f"unknown model kind {kind!r}")
        return loader(meta, arrays)
    except _DAMAGE as e:
        raise ModelFileError(f"{os.fspath(path)}: invalid model file: {_describe(e)}") from None


def _describe(error):
    return f"missing entry {error}" if isinstance(error, KeyError) else str(error)


def _load_sequential(meta, arrays):
    input_shape = check_input_shape(meta.get("input_shape"))
    layers, used = [], []
    for i, spec in enumerate(check_specs(meta.get("layers"), "layer")):
        try:
            layers.append(layer_from_state(spec["kind"], spec["config"], entries(arrays, f"layers.{i}.")))
        except _DAMAGE as e:
            raise ValueError(f"layer {i} ({spec['kind']}): {_describe(e)}") from None
        used += [f"layers.{i}.{name}" for name in state_of(layers[-1])]
    check_all_used(arrays, used)
    model = Sequential(layers, input_shape=input_shape)
    check_output_shapes(model.output_shapes())
    return model


def check_output_shapes(shapes):
    """A model's per-sample output shapes from a file: none above MAX_INPUT_SIZE values (predict
    would allocate them), the last one a vector of logits."""
    for i, shape in enumerate(shapes):
        if math.prod(shape) > MAX_INPUT_SIZE:
            raise ValueError(f"layer {i} outputs {shape} per sample, more than {MAX_INPUT_SIZE} values")
    if len(shapes[-1]) != 1:
        raise ValueError(f"the last layer's output {shapes[-1]} is not a vector of logits")
