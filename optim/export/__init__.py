"""Export to ONNX: every model file the project saves, as a graph ONNX Runtime runs.

    from optim.export import export, run, to_onnx
    export("lenet5-int8.npz", "lenet5-int8.onnx")    # or a model object; returns the bytes written
    proto = to_onnx(model, opset=13)                  # an onnx.ModelProto, checked; MIN_OPSET..MAX_OPSET
    logits = run(proto, x)[0]                         # in ONNX Runtime; session(proto): its InferenceSession

The mapping of each kind of model, with its math, is in its module:
    graph.py    Graph: named tensors, initializers (dense or sparse, whichever is smaller),
                nodes, the checked model; the opsets (13..27); write (atomic); onnx imported
                only when used
    layers.py   float layers (Conv, Gemm, MaxPool, Relu, Flatten); pruned layers (their
                weights, sparse initializers below 1/3 density); weight-shared layers
                (codebook and indices decoded in the graph by Gather)
    int8.py     the int8 model: QuantizeLinear, QLinearConv with per-channel int8 weights and
                int32 biases, Clip for fused ReLUs, MaxPool on int8 codes, the last layer's
                int32 sums by MatMulInteger / ConvInteger, DequantizeLinear
    binary.py   binary layers: Conv / Gemm with +-alpha weights unpacked in the graph from
                one bit each, sign(x) and XNOR-Net's beta for binary inputs
    convert.py  to_onnx and export: one converter per layer, the graph's input and outputs
    runtime.py  running an exported model in ONNX Runtime, and how closely it agrees with minicnn

onnx and onnxruntime are optional: `pip install -e '.[onnx]'`. Importing optim never imports them.
"""

from .convert import DEFAULT_OPSET, export, to_onnx
from .graph import MAX_OPSET, MIN_OPSET
from .runtime import agreement, run, session

__all__ = ["DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "agreement", "export", "run", "session", "to_onnx"]
