"""optim: model-optimization techniques built on minicnn.

Each technique lives in its own module (pruning, sharing, structured,
cutting, quantization, binary, distillation) as the project grows.
`LAYER_KINDS` and `MODEL_KINDS` map the kinds those modules save to the
classes and loaders that read them back, for `minicnn.load`.
"""

LAYER_KINDS = {}
MODEL_KINDS = {}

# pruning (issue 3): magnitude pruning, and the sparse layers a pruned model is saved with
from .pruning import (  # noqa: E402
    clip_masks, cubic_sparsity, global_masks, prune_clip, prune_global, sensitivity,
)
from .sparse import SparseConv2D, SparseDense, to_dense, to_sparse  # noqa: E402

LAYER_KINDS.update({SparseDense.kind: SparseDense, SparseConv2D.kind: SparseConv2D})

# weight sharing and Huffman coding (issue 4): k-means codebooks, the Deep Compression pipeline
from . import huffman  # noqa: E402
from .sharing import SharedConv2D, SharedDense, kmeans, share_weights, unshare  # noqa: E402

LAYER_KINDS.update({SharedDense.kind: SharedDense, SharedConv2D.kind: SharedConv2D})
