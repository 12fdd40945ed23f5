"""Stage 1: per-layer sensitivity, every technique, measured on the validation split.

Deep Compression (Han, Mao & Dally, ICLR 2016, after Han et al. 2015, Fig. 6)
and Distiller (Zmora et al., 2019, "sensitivity analysis") set each layer's
pruning threshold from a curve: the layer is compressed *alone*, the rest of
the network untouched, no retraining, and the accuracy measured,

    a_l(s) = accuracy(W_1, ..., T_s(W_l), ..., W_L),        drop_l(s) = a_0 - a_l(s)

for each setting s of technique T. A layer whose curve stays flat far out is
redundant; one that falls at once is kept (nearly) intact. Here the curves
are, per layer name (conv1, ..., fc1, ...):

    sparsity  magnitude pruning to s          (optim.pruning.sensitivity)
    bits      k-means sharing with 2**b codes (optim.sharing's SharedDense / SharedConv2D);
              the trials measure this curve again on their pruned layers (fewest_bits)
    filters   the fraction r of units removed (optim.structured.sensitivity, L1 ranking)
    binary    sign(W) * mean|W| per output    (optim.binary.binarize), no retraining
    int8      the whole model post-training quantized (optim.quantization.quantize_model):
              quantize_model has no per-layer switch, so int8 is one point, not a curve

Accuracies are fractions in [0, 1]; the JSON stores them as they are.
"""

import copy
import json

import numpy as np

from minicnn.atomic import save_figure, write_file
from minicnn.model import Sequential
from minicnn.training import evaluate

from .. import binary, pruning, quantization, structured
from ..sharing.layers import SHARED_LAYERS

SPARSITIES = (0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
BITS = (2, 3, 4, 5, 6, 8)
FILTER_RATES = (0.25, 0.5, 0.75)
CALIBRATION = 512  # images for int8 calibration: the ranges settle long before that


def _share_one(model, index, bits, seed):
    """A copy of `model` whose layer `index` alone shares its weights among 2**bits centroids."""
    layers = [copy.deepcopy(layer) for layer in model.layers]
    layers[index] = SHARED_LAYERS[type(model.layers[index])].from_layer(model.layers[index], bits, seed=seed)
    return Sequential(layers, input_shape=model.input_shape)


def _bits_curve(model, index, x_val, y_val, bits, seed):
    """(bits, accuracy) of layer `index` shared alone, for each width of `bits` with fewer codes
    than the layer has nonzero weights; lazily, so a reader may stop early."""
    nonzero = int(np.count_nonzero(model.layers[index].params["W"]))
    return ((b, evaluate(_share_one(model, index, b, seed), x_val, y_val)) for b in bits if 2**b <= nonzero)


def bits_sensitivity(model, x_val, y_val, bits=BITS, seed=0):
    """{layer name: [(bits, accuracy)]}: each layer shared alone, no fine-tuning."""
    return {name: list(_bits_curve(model, index, x_val, y_val, bits, seed))
            for name, index in pruning.layer_names(model).items()}


def fewest_bits(model, tolerance, x_val, y_val, seed=0):
    """{layer name: the fewest index bits whose sharing, of that layer alone, loses at most
    `tolerance` (a fraction) of the model's validation accuracy}; 8 where none does. The curve
    of bits_sensitivity read from its low end, each layer's reading stopping at the first width
    within the tolerance: the same answer, without scoring the wider ones."""
    base = evaluate(model, x_val, y_val)
    return {name: next((b for b, a in _bits_curve(model, index, x_val, y_val, BITS, seed) if base - a <= tolerance), 8)
            for name, index in pruning.layer_names(model).items()}


def binary_layers(model):
    """The indices of the weight layers that go binary: every one but the first and the last, which
    stay float in BinaryConnect and XNOR-Net; a network of only two takes the larger, which holds
    nearly all the weights (the seed CNN's dense layer, as in the demo)."""
    weights = list(pruning.layer_names(model).values())
    if len(weights) == 2:
        return [max(weights, key=lambda i: model.layers[i].params["W"].size)]
    return weights[1:-1]  # [] for a single weight layer: nothing goes binary


def binary_sensitivity(model, x_val, y_val):
    """{layer name: accuracy} with that layer's weights binarized alone (the layers of binary_layers)."""
    chosen = binary_layers(model)
    return {name: evaluate(binary.binarize(model, layers=[index]), x_val, y_val)
            for name, index in pruning.layer_names(model).items() if index in chosen}


def filter_sensitivity(model, x_val, y_val, rates=FILTER_RATES):
    """{layer name: [(rate, accuracy)]} for the layers whose units can be removed."""
    index_to_name = {index: name for name, index in pruning.layer_names(model).items()}
    table = structured.sensitivity(model, x_val, y_val, rates)
    return {index_to_name[i]: list(zip(table["rates"], accs)) for i, accs in table["accuracy"].items()}


def analyse(model, x_fit, x_val, y_val, techniques, seed=0):
    """Stage 1 on the validation split: a JSON-ready dict of every curve for `techniques`.

    x_fit (N, C, H, W) float32 is used only to calibrate int8 ranges (training images, as
    a deployed model would be calibrated); every accuracy is measured on (x_val, y_val).
    """
    names = pruning.layer_names(model)
    table = {"baseline": evaluate(model, x_val, y_val), "layers": list(names),
             "weights": {name: int(model.layers[index].params["W"].size) for name, index in names.items()}}
    if "prune" in techniques:
        table["sparsity"] = {name: [list(p) for p in curve]
                             for name, curve in pruning.sensitivity(model, x_val, y_val, SPARSITIES).items()}
    if "share" in techniques:
        table["bits"] = {name: [list(p) for p in curve]
                         for name, curve in bits_sensitivity(model, x_val, y_val, seed=seed).items()}
    if "filters" in techniques:
        table["filters"] = {name: [list(p) for p in curve]
                            for name, curve in filter_sensitivity(model, x_val, y_val).items()}
    if "binary" in techniques and binary_layers(model):
        table["binary"] = binary_sensitivity(model, x_val, y_val)
    if "int8" in techniques:
        table["int8"] = evaluate(quantization.quantize_model(model, x_fit[:CALIBRATION]), x_val, y_val)
    return table


def largest_within(curve, baseline, tolerance):
    """The largest setting x whose drop stays within `tolerance`, the piecewise-linear curve
    [(x, accuracy)] (x increasing) followed up to its first crossing: the tolerance then picks
    settings between the grid points, so a finer tolerance gives a new candidate. 0 if none."""
    best, previous = 0.0, (0.0, 0.0)
    for x, accuracy in curve:
        drop = baseline - accuracy
        if drop > tolerance:
            x0, d0 = previous
            best = x0 + (x - x0) * (tolerance - d0) / (drop - d0) if drop > d0 else x0
            break
        best, previous = x, (x, max(drop, 0.0))
    return round(best, 3)  # a stable key for the trial log


def settings_within(table, tolerance):
    """Per-layer settings whose one-shot drop is at most `tolerance` (a fraction, 0.01 = 1 point).

    filters: `largest_within` each layer's curve at `tolerance`. sparsity: at the tolerance
    scaled by the layer's weights against the largest layer's, t_l = t * n_l / max n, since
    pruning a layer buys bytes in proportion to its weights (the seed CNN's conv1 has 320,
    its dense layer 54,080). Keeping the fewest weights, sum n_l (1 - s_l), under a summed
    drop sum d_l(s_l) gives n_l = lambda d_l'(s_l); for drops that grow like a power of the
    sparsity, d_l proportional to n_l s_l: roughly to n_l, the rule here. Bits are not read
    here: a trial reads them off the curve of its pruned layers (fewest_bits), since the
    dense layer's curve says little about a pruned one.
    """
    a0, out = table["baseline"], {}
    if "sparsity" in table:
        largest = max(table["weights"].values())
        out["sparsity"] = {name: largest_within(curve, a0, tolerance * table["weights"][name] / largest)
                           for name, curve in table["sparsity"].items()}
    if "filters" in table:
        out["filters"] = {name: largest_within(curve, a0, tolerance) for name, curve in table["filters"].items()}
    return out


def save(table, path):
    write_file(path, json.dumps(table, indent=1))


def plot(table, path):
    """Accuracy against each setting, one panel per technique, one line per layer; returns a
    message when matplotlib (the `plot` extra) is missing instead of failing the run."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend
    except ImportError:
        return "matplotlib is not installed (pip install 'minicnn[plot]'): sensitivity plot skipped"
    panels = [(key, label) for key, label in (("sparsity", "sparsity"), ("bits", "index bits (sharing)"),
                                              ("filters", "fraction of units removed")) if key in table]
    fig = Figure(figsize=(4.5 * max(len(panels), 1), 3.5))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for name, curve in table[key].items():
            ax.plot([p[0] for p in curve], [100 * p[1] for p in curve], marker="o", label=name)
        ax.axhline(100 * table["baseline"], color="gray", lw=0.8, ls="--")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return None
