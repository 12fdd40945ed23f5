"""optim: model-optimization techniques built on minicnn.

Each technique lives in its own module (pruning, sharing, structured,
cutting, quantization, binary, distillation) as the project grows.
`LAYER_KINDS` and `MODEL_KINDS` map the kinds those modules save to the
classes and loaders that read them back, for `minicnn.load`.
"""

LAYER_KINDS = {}
MODEL_KINDS = {}

from . import cutting, structured  # noqa: E402  (structured pruning and layer cutting: plain Sequentials, no new kinds)
