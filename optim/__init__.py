"""optim: model-optimization techniques built on minicnn.

Each technique lives in its own module (pruning, sharing, structured,
cutting, quantization, binary, distillation) as the project grows.
`LAYER_KINDS` and `MODEL_KINDS` map the kinds those modules save to the
classes and loaders that read them back, for `minicnn.load`.
"""

LAYER_KINDS = {}
MODEL_KINDS = {}

# Binary networks (BinaryConnect, BNN, XNOR-Net): optim/binary.py, optim/xnor.py
from .binary import (  # noqa: E402
    LAYER_KINDS as _BINARY_KINDS, BinaryConv2D, BinaryDense, PackedBinaryConv2D, PackedBinaryDense, binarize,
    clip_latent, pack,
)

LAYER_KINDS.update(_BINARY_KINDS)
