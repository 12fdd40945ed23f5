"""optim: model-optimization techniques built on minicnn.

Each technique lives in its own module (pruning, sharing, structured,
cutting, quantization, binary, distillation) as the project grows.
`LAYER_KINDS` and `MODEL_KINDS` map the kinds those modules save to the
classes and loaders that read them back, for `minicnn.load`.
"""

LAYER_KINDS = {}
MODEL_KINDS = {}

# int8 quantization (Jacob et al., CVPR 2018): integer-only inference
from .quantization import (  # noqa: E402
    QuantizedModel, calibrate, convert, format_ranges, load_quantized, quantization_aware_training,
    quantize_model,
)

MODEL_KINDS[QuantizedModel.kind] = load_quantized
