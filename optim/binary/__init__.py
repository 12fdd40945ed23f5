"""Binary networks: weights (and optionally activations) reduced to their signs.

BinaryConnect (Courbariaux et al., NeurIPS 2015), BNN (Hubara et al.,
NeurIPS 2016) and XNOR-Net (Rastegari et al., ECCV 2016): a layer computes
with alpha * sign(W) (and beta * sign(x)), trained through latent float
weights with the straight-through estimator, and runs on one bit per
weight. The workflow: `binarize` a float model, train it with
minicnn.fit(..., constraint=clip_latent), `pack` it, save it; `LAYER_KINDS`
maps the saved kinds to their classes for `minicnn.load`.

Modules:
    layers   training: sign, its straight-through gradients, BinaryDense,
             BinaryConv2D, binarize (float model -> binarized copy), clip_latent.
    packed   inference: PackedBinaryDense, PackedBinaryConv2D (signs stored one
             bit each, alpha and bias in float32), pack (trained -> packed copy).
    xnor     bit kernels: signs packed into words, the XNOR-popcount matrix
             product, and a binary-input layer's whole output (scales, ReLU, 2x2
             pool), each with its NumPy reference.
    windows  a binary-input conv's operand: its input's window lines' signs packed
             once (and beta), its windows then read in place; NumPy references.
    lanes    16 (or 8) popcounts in one register: the XNOR kernels' register tile.
    addsub   real inputs times binary weights: 16 outputs' signs to a uint16,
             masked adds where a float kernel multiply-adds; its NumPy reference.
    chain    a small batch of a packed network in one compiled call: the
             stages' serial kernels back to back (predict's, via minicnn.inference).
"""

from .layers import BinaryConv2D, BinaryDense, binarize, clip_latent
from .packed import PackedBinaryConv2D, PackedBinaryDense, pack

__all__ = [
    "LAYER_KINDS", "BinaryConv2D", "BinaryDense", "PackedBinaryConv2D", "PackedBinaryDense",
    "binarize", "clip_latent", "pack",
]

LAYER_KINDS = {cls.kind: cls for cls in (BinaryDense, BinaryConv2D, PackedBinaryDense, PackedBinaryConv2D)}
