"""Running an exported model in ONNX Runtime, and how closely it agrees with minicnn.

    run(proto_or_path, x)           every graph output for the float32 inputs x, batch by batch
    agreement(model, proto, x)      the logits of both, compared:
        max_relative_error = max |logits_onnx - logits_minicnn| / max |logits_minicnn|
        argmax_agreement   = the fraction of inputs given the same class

onnxruntime is optional (`pip install -e '.[onnx]'`) and imported when a session is made.
"""

import numpy as np

from minicnn.checks import check_positive_int

from .graph import INSTALL_HINT


def session(onnx_model, threads=None):
    """An onnxruntime.InferenceSession on the CPU for a ModelProto, its bytes, or a file path.

    threads: intra-op threads (None: ONNX Runtime's default, one per core)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"running ONNX models needs the onnxruntime package: {INSTALL_HINT}") from None
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = check_positive_int(threads, "threads")
    if hasattr(onnx_model, "SerializeToString"):
        onnx_model = onnx_model.SerializeToString()
    return onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])


def run(onnx_model, x, batch_size=256, threads=None):
    """[one array per graph output] for x (N, ...) float32, run `batch_size` inputs at a time.

    onnx_model: a ModelProto, its bytes, a path, or an InferenceSession."""
    batch_size = check_positive_int(batch_size, "batch_size")
    runner = onnx_model if hasattr(onnx_model, "get_inputs") else session(onnx_model, threads)
    name = runner.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    batches = [runner.run(None, {name: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)]
    return [np.concatenate(outputs) for outputs in zip(*batches)]


def agreement(model, onnx_model, x, batch_size=256):
    """How the first output of `onnx_model` (the logits) agrees with model.predict(x):
    {"max_relative_error", "argmax_agreement", "images"} (see the module docstring)."""
    if len(x) == 0:
        raise ValueError("agreement needs at least one image, got none")
    expected = model.predict(x, batch_size=batch_size)
    logits = run(onnx_model, x, batch_size)[0]
    if logits.shape != expected.shape:
        raise ValueError(f"the ONNX model's logits have shape {logits.shape}, minicnn's {expected.shape}")
    scale = float(np.abs(expected).max(initial=0)) or 1.0
    error = float(np.abs(logits.astype(np.float64) - expected).max(initial=0)) / scale
    same = logits.reshape(len(x), -1).argmax(axis=1) == expected.reshape(len(x), -1).argmax(axis=1)
    return {"max_relative_error": error, "argmax_agreement": float(same.mean()), "images": len(x)}
