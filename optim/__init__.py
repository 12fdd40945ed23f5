"""optim: model-optimization techniques built on minicnn.

One technique per module, each opening with its math and its paper:
distillation (Hinton et al. 2015), quantization (int8, Jacob et al. 2018),
binary (BinaryConnect, BNN, XNOR-Net), structured (filter and neuron
pruning, Li et al. 2017), cutting (layer removal). `LAYER_KINDS` and
`MODEL_KINDS` map the kinds those modules save to the classes and loaders
that read them back, for `minicnn.load`.
"""

from . import binary, cutting, structured
from .binary import binarize, pack
from .distillation import distill, distillation_loss
from .quantization import (
    QuantizedModel, calibrate, convert, format_ranges, load_quantized, quantization_aware_training,
    quantize_model,
)

LAYER_KINDS = {**binary.LAYER_KINDS}
MODEL_KINDS = {QuantizedModel.kind: load_quantized}
