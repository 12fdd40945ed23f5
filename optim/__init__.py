"""optim: model-optimization techniques built on minicnn.

One technique per module, each opening with its math and its paper:
pruning (weight clipping, Han et al. 2015; global magnitude pruning on a
schedule, Zhu & Gupta 2017) with sparse storage and kernels (sparse, whose
vector kernels simd makes possible), sharing (k-means weight sharing) with
huffman and deep_compression (Han, Mao & Dally 2016), structured (filter
and neuron pruning, Li et al. 2017), cutting (layer removal), quantization
(int8, Jacob et al. 2018), binary (BinaryConnect, BNN, XNOR-Net),
distillation (Hinton et al. 2015).
`LAYER_KINDS` and `MODEL_KINDS` map the kinds those modules save to the
classes and loaders that read them back, for `minicnn.load`.
"""

from . import binary, cutting, deep_compression, huffman, pruning, sharing, sparse, structured
from .binary import binarize, pack
from .distillation import distill, distillation_loss
from .pruning import clip_masks, cubic_sparsity, global_masks, prune_clip, prune_global
from .quantization import (
    QuantizedModel, calibrate, convert, format_ranges, load_quantized, quantization_aware_training,
    quantize_model,
)
from .sharing import SharedConv2D, SharedDense, kmeans, share_weights, unshare
from .sparse import SparseConv2D, SparseDense, to_dense, to_sparse

LAYER_KINDS = {
    **binary.LAYER_KINDS,
    SparseDense.kind: SparseDense, SparseConv2D.kind: SparseConv2D,
    SharedDense.kind: SharedDense, SharedConv2D.kind: SharedConv2D,
}
MODEL_KINDS = {QuantizedModel.kind: load_quantized}
