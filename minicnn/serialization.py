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


def read_npz(path):
    """(meta dict, {name: array}) from a file written by `write_npz`; ValueError if it is not ours."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable model file (corrupt or truncated .npz: {e})") from None
    if "meta" not in arrays:
        raise ValueError(f"{path}: not a minicnn model file (no 'meta' entry)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt model description: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a minicnn model file")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported model file version {meta.get('version')!r}")
    return meta, arrays


def state_of(layer):
    """The arrays a layer stores: `layer.state()` if it defines one, else its params."""
    return layer.state() if hasattr(layer, "state") else layer.params


def layer_from_state(kind, config, arrays):
    """Rebuild one layer from its kind, config and stored arrays."""
    cls = _registered(LAYER_KINDS, kind)
    if cls is None:
        raise ValueError(f"unknown layer kind {kind!r}")
    if hasattr(cls, "from_state"):
        return cls.from_state(config, arrays)
    layer = cls(**config)
    for name, p in layer.params.items():
        if name not in arrays:
            raise ValueError(f"{kind} layer is missing its {name!r} array")
        a = arrays[name]
        if a.shape != p.shape or a.dtype.kind != "f":
            raise ValueError(f"{kind} layer {name!r}: expected float {p.shape}, got {a.dtype} {a.shape}")
        layer.params[name] = a
        layer.grads[name] = np.zeros_like(a)
    return layer


def load(path):
    """Load any model file this project writes; the result has predict(x) and summary()."""
    meta, arrays = read_npz(path)
    kind = meta.get("model")
    if kind != "sequential":
        loader = _registered(MODEL_KINDS, kind)
        if loader is None:
            raise ValueError(f"{path}: unknown model kind {kind!r}")
        return loader(meta, arrays)
    try:
        layers = []
        for i, spec in enumerate(meta["layers"]):
            prefix = f"layers.{i}."
            own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            layers.append(layer_from_state(spec["kind"], spec["config"], own))
        return Sequential(layers, input_shape=meta["input_shape"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid model file: {e}") from None
