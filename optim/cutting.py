"""Model cutting: remove whole layers, or cut the network short and train a new head.

1. Layer removal. A block is a weighted layer f whose output has the shape of
   its input (a Conv2D with in = out channels, stride 1 and 'same' padding, a
   square Dense), together with the ReLU that follows it, if any:
   y = relu(f(x)). Deleting the block replaces y by x, and every later layer
   still fits. If the block is close to the identity, the network barely
   changes. Each block is scored, alone, by

       accuracy drop   acc(network) - acc(network without the block), on validation data
       distance        ||y - x|| / ||x|| over the same data: a forward pass only,
                       no evaluation per block (a residual-style proxy: a block
                       that hardly moves its input does little)

   and the k least important blocks, or those scoring below a threshold, are
   removed together, then the network is fine-tuned. Both scores are measured
   one block at a time, on the full network: a first-order, independent
   estimate in the spirit of Li et al.'s layer sensitivity and of the
   block-dropping experiments of Veit et al., "Residual Networks Behave Like
   Ensembles of Relatively Shallow Networks" (NeurIPS 2016).

2. Truncation. Keep layers 0..i, flatten, and train a new Dense head on the
   features they compute (the features of a trained network transfer:
   Yosinski et al., "How transferable are features in deep neural
   networks?", NeurIPS 2014). Only the head is trained, on features computed
   once, so it costs one pass of the body over the data.
"""

import numpy as np

from minicnn.checks import check_array, check_labels, check_positive_int
from minicnn.layers import WEIGHTED, Conv2D, Dense, Flatten, ReLU, weight_layers
from minicnn.model import Sequential, check_sequential
from minicnn.optimizers import Adam
from minicnn.training import evaluate, fit

from .structured import check_layer_index, num_params

CRITERIA = ("accuracy", "distance")


def block_at(model, index):
    """The layer indices of the removable block that starts at layer `index`:
    (index,) or (index, index + 1) when a ReLU follows. ValueError if layer
    `index` is not a Conv2D / Dense whose output shape equals its input shape."""
    index = check_layer_index(model, index)
    layer = model.layers[index]
    if type(layer) not in WEIGHTED:
        raise ValueError(f"layer {index} is a {type(layer).__name__}: only a Conv2D or Dense block can be cut")
    shapes = [model.input_shape] + model.output_shapes()
    if shapes[index] != shapes[index + 1]:
        raise ValueError(
            f"layer {index} maps shape {shapes[index]} to {shapes[index + 1]}: removing it would break "
            f"the shapes of the layers after it"
        )
    if index + 1 < len(model.layers) and type(model.layers[index + 1]) is ReLU:
        return (index, index + 1)
    return (index,)


def removable_blocks(model):
    """Every removable block of `model`, in order: a list of tuples of layer indices."""
    blocks = []
    for i in range(len(model.layers)):
        try:
            blocks.append(block_at(model, i))
        except ValueError:
            continue
    return blocks


def remove_blocks(model, starts):
    """A new Sequential without the blocks starting at layer indices `starts`.

    Each start is validated against the given model (see `block_at`), so a bad
    index raises before anything is built; the model is not changed.
    """
    starts = list(starts)
    if len(set(starts)) != len(starts):
        raise ValueError(f"blocks to remove repeat: {starts}")
    gone = {i for start in starts for i in block_at(model, start)}
    layers = [layer for i, layer in enumerate(model.copy().layers) if i not in gone]
    if not layers:
        raise ValueError("removing these blocks leaves no layer")
    return Sequential(layers, model.input_shape)


def _relative_distances(model, blocks, x, batch_size):
    """||y - x|| / ||x|| of each block over the images x, from one forward pass per batch."""
    starts = {block[0]: k for k, block in enumerate(blocks)}
    ends = {block[-1]: k for k, block in enumerate(blocks)}
    diff, norm = np.zeros(len(blocks)), np.zeros(len(blocks))
    inputs = {}
    for begin in range(0, len(x), batch_size):
        a = x[begin : begin + batch_size]
        for i, layer in enumerate(model.layers):
            if i in starts:
                inputs[starts[i]] = a
            a = layer.forward(a)
            if i in ends:
                k = ends[i]
                diff[k] += float(((a.astype(np.float64) - inputs[k]) ** 2).sum())
                norm[k] += float((inputs[k].astype(np.float64) ** 2).sum())
    for layer in model.layers:
        layer.cache = None
    return np.sqrt(diff) / np.maximum(np.sqrt(norm), np.finfo(np.float64).tiny)


def score_blocks(model, x_val, y_val, batch_size=256):
    """Score every removable block, each removed alone.

    x_val (N, C, H, W) float, y_val (N,) int. Returns a list of dicts, one per
    block in layer order: {"block": (indices), "accuracy": validation accuracy
    without it, "accuracy_drop": baseline - that, "distance": ||y - x|| / ||x||}.
    """
    check_array(x_val, "x_val", ndim=1 + len(model.input_shape))
    check_labels(y_val, len(x_val), model.num_classes, "y_val")
    batch_size = check_positive_int(batch_size, "batch_size")
    blocks = removable_blocks(model)
    if not blocks:
        return []
    baseline = evaluate(model, x_val, y_val, batch_size)
    distances = _relative_distances(model.copy(), blocks, x_val, batch_size)
    scores = []
    for block, distance in zip(blocks, distances):
        accuracy = evaluate(remove_blocks(model, [block[0]]), x_val, y_val, batch_size)
        scores.append({"block": block, "accuracy": accuracy, "accuracy_drop": baseline - accuracy,
                       "distance": float(distance)})
    return scores


def choose_blocks(scores, criterion="accuracy", remove=None, threshold=None):
    """Start indices of the blocks to cut, least important first.

    criterion: "accuracy" (score = accuracy drop) or "distance". Give exactly
    one of remove (the k lowest-scoring blocks) or threshold (every block whose
    score is below it).
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if (remove is None) == (threshold is None):
        raise ValueError("give exactly one of remove (how many blocks) and threshold")
    key = "accuracy_drop" if criterion == "accuracy" else "distance"
    ranked = sorted(scores, key=lambda s: s[key])
    if remove is not None:
        remove = check_positive_int(remove, "remove", minimum=0)
        if remove > len(ranked):
            raise ValueError(f"cannot remove {remove} blocks: the model has {len(ranked)} removable blocks")
        chosen = ranked[:remove]
    else:
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        chosen = [s for s in ranked if s[key] < threshold]
    return [s["block"][0] for s in chosen]


def cut(model, x_val, y_val, criterion="accuracy", remove=None, threshold=None):
    """Score the blocks on (x_val, y_val), remove the chosen ones; returns (new model, scores)."""
    scores = score_blocks(model, x_val, y_val)
    starts = choose_blocks(scores, criterion, remove, threshold)
    return remove_blocks(model, starts), scores


def _check_after(model, after):
    """`after` as an int in -1 .. len(layers) - 2 (-1: keep no layer)."""
    if after == -1:
        check_sequential(model, "model cutting")
        return -1
    after = check_layer_index(model, after)
    if after == len(model.layers) - 1:
        raise ValueError(f"layer {after} is the last layer: there is nothing to cut after it")
    return after


def truncate(model, after, x, y, epochs=5, batch_size=64, optimizer=None, seed=0, verbose=True):
    """Keep layers 0..after, then a new Dense head trained on the features they compute.

    after: the last layer kept, -1 for none (the head is then a linear
    classifier on the raw input). x (N, C, H, W) float, y (N,) int: the
    training data of the head. Returns a new Sequential: copies of layers
    0..after, a Flatten if their output is not flat, and the trained
    Dense(features, num_classes). The model is not changed.
    """
    after = _check_after(model, after)
    check_array(x, "x", ndim=1 + len(model.input_shape))
    num_classes = model.num_classes
    check_labels(y, len(x), num_classes)
    body = model.copy().layers[: after + 1]
    shape = ([model.input_shape] + model.output_shapes())[after + 1]
    if len(shape) > 1:
        body.append(Flatten())
    features = Sequential(body, model.input_shape).predict(x)
    width = features.shape[1]
    head = Sequential([Dense(width, num_classes, rng=seed)], input_shape=(width,))
    fit(head, features, y, epochs=epochs, batch_size=batch_size,
        optimizer=Adam(1e-3) if optimizer is None else optimizer, seed=seed, verbose=verbose)
    return Sequential(body + head.layers, model.input_shape)


def truncation_points(model):
    """The `after` indices (-1 included) at which truncating removes at least
    one weight layer: the body keeps fewer weight layers than the model has,
    less the last one, which the new head replaces. A cut just after a
    Flatten is left out: it is the cut just before it."""
    check_sequential(model, "model cutting")
    keep_below = len(weight_layers(model.layers)) - 1
    return [after for after in range(-1, len(model.layers) - 1)
            if len(weight_layers(model.layers[: after + 1])) < keep_below
            and not (after >= 0 and type(model.layers[after]) is Flatten)]


def choose_truncation(model, x, y, x_val, y_val, max_drop=0.005, epochs=5, batch_size=64, seed=0,
                      verbose=True):
    """Truncate at every one of `truncation_points`, each head trained on (x, y);
    keep the smallest (fewest parameters) whose accuracy on (x_val, y_val) is
    within max_drop (a fraction) of the full model's, or else the most
    accurate. Returns (model, table): one dict per point, {"after", "params",
    "accuracy", "accuracy_drop", "chosen"}; the given model is not changed."""
    if not max_drop >= 0:  # NaN too
        raise ValueError(f"max_drop must be a fraction >= 0, got {max_drop!r}")
    points = truncation_points(model)
    if not points:
        raise ValueError("the model has a single weight layer: truncating would remove nothing")
    baseline = evaluate(model, x_val, y_val)
    table, models = [], []
    for after in points:
        cut = truncate(model, after, x, y, epochs=epochs, batch_size=batch_size, seed=seed, verbose=verbose)
        accuracy = evaluate(cut, x_val, y_val)
        params = num_params(cut)
        table.append({"after": after, "params": params, "accuracy": accuracy, "accuracy_drop": baseline - accuracy})
        models.append(cut)
    good = [k for k, row in enumerate(table) if row["accuracy_drop"] <= max_drop]
    best = (min(good, key=lambda k: table[k]["params"]) if good
            else max(range(len(table)), key=lambda k: table[k]["accuracy"]))
    for k, row in enumerate(table):
        row["chosen"] = k == best
    return models[best], table
