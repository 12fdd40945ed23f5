"""A minicnn model to an ONNX model: each layer's converter in turn, the checked model, the file.

The exported graph has one input, "input", float32 (N, *input_shape) NCHW as minicnn's
predict takes it, and one output, "logits", float32 (N, classes). A Sequential is its layers'
converters in order (layers.py: float, pruned, weight-shared; binary.py), the last one's
result renamed "logits" by an Identity; a QuantizedModel is the integer graph of int8.py.
With intermediates=True, every layer's (op's) result follows "logits" as an extra output,
in order: float32 for a Sequential; int8 codes NCHW (int32 sums for a last compute op)
for an int8 model. A layer without a converter is a ValueError naming it.
"""

import os

import numpy as np

from minicnn.model import Sequential
from minicnn.serialization import load

from ..quantization import QuantizedModel
from . import binary, int8, layers
from .graph import Graph, check_opset, write

DEFAULT_OPSET = 13
CONVERTERS = {**layers.CONVERTERS, **binary.CONVERTERS}


def sequential_graph(g, model, x):
    """Add the layers of the Sequential `model` reading the tensor named x.

    Returns ([(name, float32, per-sample shape) of each layer's output], the logits' name)."""
    outputs = []
    for i, (layer, shape) in enumerate(zip(model.layers, model.output_shapes())):
        convert = CONVERTERS.get(type(layer))
        if convert is None:
            supported = ", ".join(sorted(cls.__name__ for cls in CONVERTERS))
            raise ValueError(f"layer {i} ({type(layer).__name__}) has no ONNX export; supported layers: {supported}")
        x = convert(g, layer, x, f"layer{i}")
        outputs.append((x, np.float32, shape))
    return outputs, g.node("Identity", [x], "logits")


def to_onnx(model, opset=DEFAULT_OPSET, sparse=True, intermediates=False):
    """The onnx.ModelProto computing `model`'s logits, checked by onnx.checker.

    model: a minicnn Sequential (float, pruned, weight-shared or binary layers) or an int8
    QuantizedModel. opset: the ai.onnx version, MIN_OPSET..MAX_OPSET (13..27, graph.py).
    sparse: store a weight as a sparse initializer where that is smaller (graph.py).
    intermediates: also output every layer's result after the logits (module docstring).
    """
    check_opset(opset)  # before the work, not after it
    g = Graph(sparse)
    if isinstance(model, QuantizedModel):
        outputs, logits = int8.build(g, model, "input")
        kind = "int8 QuantizedModel"
    elif isinstance(model, Sequential):
        outputs, logits = sequential_graph(g, model, "input")
        kind = "Sequential of " + ", ".join(type(layer).__name__ for layer in model.layers)
    else:
        raise ValueError(f"cannot export a {type(model).__name__} to ONNX: expected a minicnn Sequential "
                         "or an int8 QuantizedModel")
    _, _, out_shape = outputs[-1]
    graph_outputs = [(logits, np.float32, out_shape)] + (outputs if intermediates else [])
    return g.model([("input", np.float32, model.input_shape)], graph_outputs, opset,
                   doc=f"exported by minicnn (optim.export) from a {kind}")


def export(model, path, opset=DEFAULT_OPSET, sparse=True):
    """Write `model` (a minicnn model, or the path of a model file) to `path` as ONNX, atomically.

    Returns the bytes written. See `to_onnx` for the arguments.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load(model)
    return write(to_onnx(model, opset, sparse), path)
