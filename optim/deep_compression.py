"""Deep Compression: prune, retrain, share weights, fine-tune the centroids, Huffman code.

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with
Pruning, Trained Quantization and Huffman Coding" (ICLR 2016). The three
stages multiply:

    pruning (P)       keep the largest weights (optim.pruning, global magnitude, retrained)
                      and store their positions as relative indices (optim.sparse)
    quantization (Q)  k-means weight sharing, 2**bits centroids per layer (optim.sharing),
                      the centroids fine-tuned by gradient descent
    Huffman (H)       both index streams entropy coded (optim.sharing.huffman)

The size accounting follows the paper's Tables 2 and 3: per layer, the
weights kept, bits per stored weight index and per relative index with
fixed-width codes (P+Q) and after Huffman coding (P+Q+H), and the
compression rate against float32, codebook, biases and stream headers
included. The total is the real size of the saved file next to the real size
of the original file.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from minicnn.checks import check_positive_int
from minicnn.optimizers import Adam
from minicnn.training import fit

from .pruning import check_sparsity, layer_names, layer_sparsity, prune_global
from .sharing import SharedLayer, bits_for, check_bits, share_weights, unshare
from .sparse import to_dense


@dataclass
class Compressed:
    """The result of `deep_compression`: the shared model and what each stage did."""

    model: object
    bits: dict  # layer name -> index bits used
    sparsity: dict = field(default_factory=dict)  # layer name -> (zeros, size) after pruning
    rounds: dict = field(default_factory=dict)  # layer name -> rounds k-means took (to convergence)
    history: dict = field(default_factory=dict)  # stage -> fit history


def capped_bits(model, bits):
    """{layer name: bits} with each layer's 2**bits clusters capped at its nonzero weights."""
    out = {}
    for name, index in layer_names(model).items():
        nonzero = int(np.count_nonzero(model.layers[index].params["W"]))
        b = check_bits(bits_for(name, bits))
        out[name] = min(b, int(math.log2(nonzero))) if nonzero >= 2 else b
    return out


def deep_compression(model, x, y, sparsity=0.0, bits=None, retrain_epochs=4, finetune_epochs=2,
                     prune_iterations=8, prune_lr=1e-4, finetune_lr=1e-4, batch_size=64, init="linear",
                     ends_scale=1.0, seed=0, verbose=True):
    """Compress a Sequential model; the given one is not changed.

    sparsity: the fraction of weights pruned (global magnitude, `prune_iterations` steps on the
    cubic schedule while retraining for retrain_epochs with Adam(prune_lr)); 0 skips pruning.
    bits: index bits per layer as in sharing.share_weights (default {"conv": 8, "fc": 5}, the
    paper's), capped so that no layer has more clusters than nonzero weights.
    k-means runs to convergence per layer (sharing.kmeans), its rounds in `rounds`. The
    centroids are then fine-tuned for finetune_epochs with Adam(finetune_lr).
    """
    bits = {"conv": 8, "fc": 5} if bits is None else bits
    for b in bits.values() if isinstance(bits, dict) else [bits]:
        check_bits(b)  # before hours of pruning, not after
    sparsity = check_sparsity(sparsity)
    for value, name in ((retrain_epochs, "retrain_epochs"), (finetune_epochs, "finetune_epochs")):
        check_positive_int(value, name, minimum=0)
    dense = to_dense(unshare(model))
    result = Compressed(model=None, bits={})
    if sparsity > 0:
        pruned = prune_global(dense, x, y, sparsity, iterations=prune_iterations, retrain_epochs=retrain_epochs,
                              lr=prune_lr, batch_size=batch_size, seed=seed, ends_scale=ends_scale,
                              verbose=verbose)
        dense = pruned.model
    result.sparsity = layer_sparsity(dense)
    result.bits = capped_bits(dense, bits)
    shared = share_weights(dense, result.bits, init=init, seed=seed)
    result.rounds = {name: shared.layers[index].kmeans_rounds for name, index in layer_names(dense).items()}
    if verbose:
        print(f"k-means rounds to convergence per layer: {result.rounds}")
    if finetune_epochs:
        result.history["finetune"] = fit(shared, x, y, epochs=finetune_epochs, batch_size=batch_size,
                                         optimizer=Adam(finetune_lr), seed=seed + 1, verbose=verbose)
    result.model = shared
    return result


# --------------------------------------------------------------------------
# Size accounting


def layer_table(model):
    """One dict per shared layer (name, and `storage()`'s figures) plus float32 bytes."""
    rows = []
    for name, index in layer_names(unshare(model)).items():
        layer = model.layers[index]
        if isinstance(layer, SharedLayer):
            row = {"layer": name, **layer.storage(), "float32_bytes": 4 * (layer.shape[0] * (layer.shape[1] + 1))}
            rows.append(row)
    return rows


def format_table(model, original_bytes=None, file_bytes=None):
    """The paper's Table 2/3 for a shared model: per layer and in total.

    original_bytes / file_bytes: the real sizes of the original and compressed files, if known.
    """
    rows = layer_table(model)
    header = ("layer", "weights", "kept", "k", "wbits P+Q", "wbits +H", "ibits P+Q", "ibits +H",
              "bytes P+Q", "bytes +H", "rate P+Q", "rate +H")
    lines = []
    for r in rows:
        ibits = (f"{r['index_bits_packed']:.2f}", f"{r['index_bits_huffman']:.2f}") if r["index_bits"] else ("-", "-")
        lines.append((r["layer"], f"{r['weights']:,}", f"{r['nonzero'] / r['weights']:.1%}", str(r["clusters"]),
                      f"{r['weight_bits_packed']:.2f}", f"{r['weight_bits_huffman']:.2f}", *ibits,
                      f"{r['bytes_packed']:,}", f"{r['bytes_huffman']:,}",
                      f"{r['float32_bytes'] / r['bytes_packed']:.1f}x",
                      f"{r['float32_bytes'] / r['bytes_huffman']:.1f}x"))
    total = {key: sum(r[key] for r in rows) for key in ("weights", "nonzero", "bytes_packed", "bytes_huffman",
                                                        "float32_bytes")}
    lines.append(("total", f"{total['weights']:,}", f"{total['nonzero'] / max(total['weights'], 1):.1%}", "",
                  "", "", "", "", f"{total['bytes_packed']:,}", f"{total['bytes_huffman']:,}",
                  f"{total['float32_bytes'] / max(total['bytes_packed'], 1):.1f}x",
                  f"{total['float32_bytes'] / max(total['bytes_huffman'], 1):.1f}x"))
    stored = sum(r[f"bytes_{r['coding']}"] for r in rows)
    widths = [max(len(str(v)) for v in col) for col in zip(header, *lines)]

    def fmt(values):
        return "  ".join(str(v).ljust(w) if c == 0 else str(v).rjust(w) for c, (v, w) in enumerate(zip(values, widths)))

    out = [fmt(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(v) for v in lines]
    out.append("wbits / ibits: bits per stream entry (fillers and stream headers included) of the weight "
               "indices and of the relative indices; bytes include codebook (4k) and biases; rate: float32 W+b / bytes")
    if original_bytes and file_bytes:
        out.append(f"file on disk: {original_bytes:,} -> {file_bytes:,} bytes = {original_bytes / file_bytes:.1f}x "
                   f"smaller (container and model description: {file_bytes - stored:,} bytes)")
    return "\n".join(out)
