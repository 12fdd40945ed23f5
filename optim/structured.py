"""Structured pruning: remove whole filters of a Conv2D and whole neurons of a Dense.

Unit j of a weighted layer l (filter j of a Conv2D, neuron j of a Dense)
produces channel j of l's output, and the next weighted layer l' is the only
one that reads it. Removing the unit deletes everything that writes or reads
that channel:

    Conv2D -> Conv2D:            W_l[j], b_l[j]     and  W_l'[:, j]
    Conv2D -> Flatten -> Dense:  W_l[j], b_l[j]     and  rows j*H*W .. (j+1)*H*W - 1 of W_l'
    Dense  -> Dense:             W_l[:, j], b_l[j]  and  row j of W_l'

(Flatten orders features C, H, W, so channel j is one contiguous block of
rows.) ReLU, MaxPool2D and Flatten act on each channel separately and pass
through unchanged. The pruned network computes exactly what the original
computes with channel j held at zero at the input of l'; it is an ordinary,
smaller `Sequential` whose every dense kernel does less work.

Which units go: the lowest scores first, by one of

    l1          s_j = sum |W_l[j]|        (Li et al., "Pruning Filters for
                                            Efficient ConvNets", ICLR 2017)
    l2          s_j = ||W_l[j]||_2
    activation  s_j = E_n mean_p |a_nj[p]|  (a = the input of l', what l' reads)
    taylor      s_j = E_n |mean_p a_nj[p] dL/da_nj[p]|   (Molchanov et al.,
                "Pruning Convolutional Neural Networks for Resource Efficient
                Inference", ICLR 2017): the first-order change of the loss when
                channel j is set to zero, which is exactly what removing it does.

E_n averages over images, mean_p over the positions of the channel. How many
go: one rate per layer, one rate for every layer, or rates chosen by a
sensitivity analysis (Li et al., section 3.2: prune each layer alone at
several rates, watch validation accuracy, prune fragile layers less). Then
fine-tune, and repeat in steps (prune, fine-tune, prune more, ...).
"""

import numpy as np

from minicnn.checks import check_array, check_labels, check_positive_int
from minicnn.layers import WEIGHTED, Conv2D, Dense, Flatten, MaxPool2D, ReLU, weight_layers
from minicnn.losses import cross_entropy
from minicnn.model import Sequential, check_sequential
from minicnn.optimizers import Adam
from minicnn.training import evaluate, fit

PASS_THROUGH = (ReLU, MaxPool2D, Flatten)  # per-channel maps: channel j out depends on channel j in
CRITERIA = ("l1", "l2", "activation", "taylor")


# --------------------------------------------------------------------------
# Counting


def num_units(layer):
    """Filters of a Conv2D, neurons of a Dense."""
    return layer.params["W"].shape[0] if type(layer) is Conv2D else layer.params["W"].shape[1]


def layer_macs(model):
    """Multiply-accumulates per image of each layer of `model`: a list of ints."""
    shapes = [model.input_shape] + model.output_shapes()
    return [layer.macs(shape) for layer, shape in zip(model.layers, shapes)]


def total_macs(model):
    return sum(layer_macs(model))


def num_params(model):
    return sum(p.size for layer in model.layers for p in layer.params.values())


# --------------------------------------------------------------------------
# Which layers can lose units


def check_layer_index(model, index):
    """`index` as an int, after checking that model is a Sequential and has such a layer."""
    check_sequential(model, "structured pruning")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"layer index must be an integer, got {index!r}")
    if not 0 <= index < len(model.layers):
        raise ValueError(f"layer index {index} is out of range: the model has {len(model.layers)} layers")
    return int(index)


def consumer(model, index):
    """Index of the weighted layer that reads layer `index`'s output channels.

    Raises ValueError if layer `index` is not a plain Conv2D or Dense, if it is
    the output layer (its units are the classes), or if something other than
    ReLU / MaxPool2D / Flatten sits between it and the next weighted layer.
    """
    index = check_layer_index(model, index)
    layer = model.layers[index]
    if type(layer) not in WEIGHTED:
        raise ValueError(
            f"layer {index} is a {type(layer).__name__}: structured pruning removes units of "
            f"plain Conv2D and Dense layers only"
        )
    for j in range(index + 1, len(model.layers)):
        nxt = model.layers[j]
        if type(nxt) in WEIGHTED:
            return j
        if type(nxt) not in PASS_THROUGH:
            raise ValueError(
                f"layer {index}'s output reaches layer {j} ({type(nxt).__name__}), which does not act "
                f"on each channel separately; cannot remove its units"
            )
    raise ValueError(f"layer {index} is the output layer: its units are the classes and cannot be removed")


def removable_layers(model):
    """Indices of the layers whose units can be removed: every plain Conv2D and
    Dense that feeds another one through per-channel layers only."""
    found = []
    for i in weight_layers(model.layers):
        try:
            consumer(model, i)
        except ValueError:
            continue
        found.append(i)
    return found


# --------------------------------------------------------------------------
# Surgery


def _conv_with(layer, W, b):
    new = Conv2D(W.shape[1], W.shape[0], layer.kernel_size, layer.stride, layer.padding, rng=0)
    new.params = {"W": np.ascontiguousarray(W), "b": np.ascontiguousarray(b)}
    new.grads = {name: np.zeros_like(p) for name, p in new.params.items()}
    return new


def _dense_with(W, b):
    new = Dense(W.shape[0], W.shape[1], rng=0)
    new.params = {"W": np.ascontiguousarray(W), "b": np.ascontiguousarray(b)}
    new.grads = {name: np.zeros_like(p) for name, p in new.params.items()}
    return new


def _keep_outputs(layer, keep):
    W, b = layer.params["W"], layer.params["b"]
    if type(layer) is Conv2D:
        return _conv_with(layer, W[keep], b[keep])
    return _dense_with(W[:, keep], b[keep])


def _keep_inputs(layer, keep, channels):
    """`layer` reading only channels `keep` of the `channels` it read before."""
    W, b = layer.params["W"], layer.params["b"]
    if type(layer) is Conv2D:
        return _conv_with(layer, W[:, keep], b)
    per_channel = W.shape[0] // channels  # H*W after a Flatten, 1 after a Dense
    rows = W.reshape(channels, per_channel, W.shape[1])[keep].reshape(-1, W.shape[1])
    return _dense_with(rows, b)


def _check_units(units, n, index):
    units = np.asarray(units)
    if units.size == 0:
        return np.zeros(0, np.int64)
    if units.ndim != 1 or units.dtype.kind not in "iu":
        raise TypeError(f"units to remove must be a 1-D sequence of integers, got {units!r}")
    if units.min() < 0 or units.max() >= n:
        raise ValueError(f"layer {index} has {n} units; cannot remove units {units.tolist()}")
    if len(np.unique(units)) != len(units):
        raise ValueError(f"units to remove from layer {index} repeat: {units.tolist()}")
    if len(units) == n:
        raise ValueError(f"cannot remove all {n} units of layer {index}: the network would be cut in two")
    return units.astype(np.int64)


def remove_units(model, index, units):
    """A new Sequential without units `units` (indices) of layer `index`.

    model: a Sequential; it is not changed. Removes the units' weights and
    biases and the weights of the next weighted layer that read them (see the
    module docstring); every other layer is a copy.
    """
    reader = consumer(model, index)
    layer = model.layers[index]
    n = num_units(layer)
    units = _check_units(units, n, index)
    keep = np.setdiff1d(np.arange(n), units)
    layers = model.copy().layers
    layers[index] = _keep_outputs(layer, keep)
    layers[reader] = _keep_inputs(model.layers[reader], keep, n)
    return Sequential(layers, model.input_shape)


# --------------------------------------------------------------------------
# Ranking


def _channel_scores(model, index, x, y, criterion, batch_size):
    """activation / taylor scores (see the module docstring), float64 (units,).

    Works on a copy: the forward and backward passes write caches and grads.
    """
    check_array(x, "x", ndim=1 + len(model.input_shape))
    check_labels(y, len(x), model.num_classes)
    if len(x) == 0:
        raise ValueError(f"the {criterion} criterion needs at least one image")
    net = model.copy()
    reader = consumer(net, index)
    n = num_units(net.layers[index])
    head, tail = net.layers[:reader], net.layers[reader:]
    total = np.zeros(n)
    for start in range(0, len(x), batch_size):
        a = x[start : start + batch_size]
        for layer in head:
            a = layer.forward(a)
        per_channel = a.reshape(len(a), n, -1)
        if criterion == "activation":
            total += np.abs(per_channel).mean(axis=2).sum(axis=0)
            continue
        z = a
        for layer in tail:
            z = layer.forward(z)
        _, g = cross_entropy(z, y[start : start + batch_size])
        g = g * len(a)  # cross_entropy averages over the batch; we want each image's own gradient
        for layer in reversed(tail):
            g = layer.backward(g)
        total += np.abs((per_channel * g.reshape(per_channel.shape)).mean(axis=2)).sum(axis=0)
    return total / len(x)


def unit_scores(model, index, criterion="l1", x=None, y=None, batch_size=256):
    """Importance of each unit of layer `index`: float64 (units,), lowest goes first.

    l1 / l2 look at the weights only; activation and taylor need images
    x (N, C, H, W) float and, for taylor, labels y (N,) int.
    """
    consumer(model, index)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    layer = model.layers[index]
    W = layer.params["W"].astype(np.float64)
    units = W.reshape(W.shape[0], -1) if type(layer) is Conv2D else W.T
    if criterion == "l1":
        return np.abs(units).sum(axis=1)
    if criterion == "l2":
        return np.sqrt((units**2).sum(axis=1))
    if x is None or y is None:
        raise ValueError(f"the {criterion} criterion needs images x and labels y")
    return _channel_scores(model, index, x, y, criterion, check_positive_int(batch_size, "batch_size"))


def _check_rate(rate, index):
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)):
        raise TypeError(f"pruning rate for layer {index} must be a number, got {rate!r}")
    if not 0 <= rate < 1:
        raise ValueError(f"pruning rate for layer {index} must be in [0, 1), got {rate}")
    return float(rate)


def rates_per_layer(model, rates):
    """{layer index: rate} from one rate for every prunable layer or a dict; validated."""
    if isinstance(rates, dict):
        for index in rates:
            consumer(model, index)
        return {int(i): _check_rate(r, i) for i, r in rates.items()}
    return {i: _check_rate(rates, i) for i in removable_layers(model)}


def remove_lowest(model, counts, criterion="l1", x=None, y=None, batch_size=256):
    """A new Sequential without the `counts[i]` lowest-scoring units of each layer i.

    counts: {layer index: number of units to remove}. All scores are computed
    on the given model before any removal (Li et al.'s "independent"
    strategy), so the order of the layers does not matter. The model is not changed.
    """
    removals = {}
    for index, count in counts.items():
        count = check_positive_int(count, f"number of units to remove from layer {index}", minimum=0)
        scores = unit_scores(model, index, criterion, x, y, batch_size)
        removals[index] = np.argsort(scores, kind="stable")[:count]
    pruned = model.copy()
    for index, units in removals.items():
        pruned = remove_units(pruned, index, units)
    return pruned


def prune(model, rates, criterion="l1", x=None, y=None, batch_size=256):
    """A new, narrower Sequential: floor(rate * units) lowest-scoring units of each layer removed.

    rates: one float in [0, 1) for every prunable layer, or {layer index: rate}.
    x, y: images and labels for the data-driven criteria. The model is not changed.
    """
    rates = rates_per_layer(model, rates)
    # floor: a rate below 1 always leaves at least one unit
    counts = {i: int(np.floor(r * num_units(model.layers[i]))) for i, r in rates.items()}
    return remove_lowest(model, counts, criterion, x, y, batch_size)


def sensitivity(model, x_val, y_val, rates=(0.25, 0.5, 0.75, 0.9), criterion="l1", layers=None):
    """Validation accuracy with each prunable layer pruned alone at each rate (no fine-tuning).

    Returns {"baseline": accuracy, "rates": [...], "accuracy": {layer index: [accuracy per rate]}}.
    """
    layers = removable_layers(model) if layers is None else list(layers)
    rates = [_check_rate(r, "sensitivity") for r in rates]
    table = {"baseline": evaluate(model, x_val, y_val), "rates": rates, "accuracy": {}}
    for index in layers:
        table["accuracy"][index] = [
            evaluate(prune(model, {index: r}, criterion, x_val, y_val), x_val, y_val) for r in rates
        ]
    return table


def choose_rates(table, max_drop):
    """From a `sensitivity` table: each layer's largest rate whose accuracy drop is <= max_drop (0 if none)."""
    if not 0 <= max_drop <= 1:
        raise ValueError(f"max_drop is an accuracy drop in [0, 1], got {max_drop}")
    chosen = {}
    for index, accuracies in table["accuracy"].items():
        ok = [r for r, a in zip(table["rates"], accuracies) if table["baseline"] - a <= max_drop]
        chosen[index] = max(ok, default=0.0)
    return chosen


def format_sensitivity(table):
    """A `sensitivity` table as text: one row per layer, validation accuracy per rate."""
    rates = table["rates"]
    lines = [f"nothing pruned: {table['baseline']:.4f}",
             f"{'layer':<8}" + "".join(f"{f'rate {r:g}':>11}" for r in rates)]
    for index, accuracies in table["accuracy"].items():
        lines.append(f"{index:<8}" + "".join(f"{a:>11.4f}" for a in accuracies))
    return "\n".join(lines)


def prune_and_finetune(model, rates, x, y, steps=1, epochs=1, criterion="l1", batch_size=64, lr=3e-4,
                       seed=0, score_data=None, validation=None, verbose=True):
    """Prune in `steps` equal steps up to `rates`, fine-tuning `epochs` epochs after each.

    After step s of S, layer i has lost floor(rates[i] * n_i * s / S) of its
    original n_i units. x, y: fine-tuning data; score_data: (x, y) for the
    data-driven criteria (default x, y); validation: (x, y) shown after each
    epoch. Fine-tuning uses a fresh Adam(lr) per step, lower than training's
    1e-3 since the weights are already good. Returns the new model; the given
    one is not changed.
    """
    steps = check_positive_int(steps, "steps")
    epochs = check_positive_int(epochs, "epochs", minimum=0)
    rates = rates_per_layer(model, rates)
    original = {i: num_units(model.layers[i]) for i in rates}
    current = model
    for step in range(1, steps + 1):
        counts = {}
        for i, n0 in original.items():
            target = n0 - int(np.floor(rates[i] * n0 * step / steps))
            counts[i] = num_units(current.layers[i]) - target
        current = remove_lowest(current, counts, criterion, *(score_data or (x, y)))
        if verbose:
            print(f"step {step}/{steps}: units {[num_units(current.layers[i]) for i in original]}, "
                  f"{total_macs(current):,} MACs")
        fit(current, x, y, epochs=epochs, batch_size=batch_size, optimizer=Adam(lr), seed=seed + step,
            validation=validation, verbose=verbose)
    return current


# --------------------------------------------------------------------------
# Reporting


def compare(before, after):
    """Per-layer table of units, parameters and MACs before -> after structured pruning
    (the two models have the same layers, narrower or not)."""
    if len(before.layers) != len(after.layers):
        raise ValueError(f"compare needs models with the same layers, got {len(before.layers)} and {len(after.layers)}")
    macs_b, macs_a = layer_macs(before), layer_macs(after)
    rows = [("Layer", "Units", "Params", "MACs")]
    for i, (lb, la) in enumerate(zip(before.layers, after.layers)):
        if type(lb) not in WEIGHTED:
            continue
        pb = sum(p.size for p in lb.params.values())
        pa = sum(p.size for p in la.params.values())
        rows.append((f"{i}: {type(lb).__name__}", f"{num_units(lb)} -> {num_units(la)}",
                     f"{pb:,} -> {pa:,}", f"{macs_b[i]:,} -> {macs_a[i]:,}"))
    tb, ta = total_macs(before), total_macs(after)
    rows.append(("Total", "", f"{num_params(before):,} -> {num_params(after):,}", f"{tb:,} -> {ta:,}"))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    lines = ["  ".join(v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{tb / ta:.2f}x fewer MACs, {num_params(before) / num_params(after):.2f}x fewer parameters")
    return "\n".join(lines)
