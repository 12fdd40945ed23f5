"""optim: model-optimization techniques built on minicnn.

One technique per module; a technique with kernels or a codec of its own is a
package (its math, its kernels, its layers side by side). Each opens with its
math and its paper.

    pruning.py           weight clipping (Han et al. 2015) and global magnitude pruning
                         on a schedule (Zhu & Gupta 2017): masks and retraining
    sparse/              sparse storage (the relative-index stream of Deep Compression)
                         and kernels that skip the zeros; the layers pruning saves
    sharing/             k-means weight sharing with Huffman-coded indices (Han, Mao & Dally 2016)
    deep_compression.py  the pipeline: prune, share, Huffman code (Han, Mao & Dally 2016)
    structured.py        filter and neuron pruning (Li et al. 2017)
    cutting.py           removing whole layers, or truncating with a new head
    quantization/        int8 integer-only inference and QAT (Jacob et al. 2018)
    binary/              binary weights and activations, XNOR-popcount (BinaryConnect, BNN, XNOR-Net)
    distillation.py      knowledge distillation (Hinton et al. 2015)
    bitpack.py           fixed-width bit packing, for index streams
    auto/                automatic compression under an accuracy budget (compress --auto)
    export/              ONNX export of every kind of model, checked in ONNX Runtime (optional: onnx)
    app/                 the `minicnn` command line and `minicnn demo` (above the library)

Importing optim registers the kinds of layers and models its modules save, so
that `minicnn.load` reads them back.
"""

from minicnn.serialization import register_layer, register_model

from . import (
    binary, cutting, deep_compression, distillation, export, pruning, quantization, sharing, sparse, structured,
)
from .binary import binarize, pack
from .distillation import distill
from .pruning import prune_clip, prune_global
from .quantization import QuantizedModel, load_quantized, quantize_model
from .sharing import share_weights
from .sparse import to_sparse

__all__ = [
    "binarize", "binary", "cutting", "deep_compression", "distill", "distillation", "export", "pack", "prune_clip",
    "prune_global", "pruning", "quantization", "quantize_model", "share_weights", "sharing", "sparse",
    "structured", "to_sparse",
]


def _register_kinds():
    for kinds in (binary.LAYER_KINDS, sharing.LAYER_KINDS, sparse.LAYER_KINDS):
        for layer_class in kinds.values():
            register_layer(layer_class)
    register_model(QuantizedModel.kind, load_quantized)


_register_kinds()
