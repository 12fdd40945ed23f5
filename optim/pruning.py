"""Magnitude pruning: remove the smallest weights, retrain the rest, repeat.

Every Conv2D and Dense weight tensor W (biases are kept, as in the papers)
gets a boolean mask K of the same shape (True = kept); the pruned network
computes with W * K. Masks only grow: a weight once removed stays removed.

Weight clipping, per layer (Han, Pool, Tran & Dally, "Learning both Weights
and Connections for Efficient Neural Networks", NeurIPS 2015):

    K <- K and |W| >= q * std(W)        (std over the layer's whole tensor)

with a quality parameter q. Iterative pruning raises q in T steps,
q_t = q t / T, retraining after each step.

Global magnitude pruning: one threshold for all the chosen layers, set so
that exactly k = round(s n) of their n weights are removed: sort the
magnitudes (already-removed weights first), remove the first k. Ties are
broken by position (layer order, then row-major), so the result is
deterministic. Reached gradually while training, with the cubic schedule of
Zhu & Gupta, "To prune, or not to prune" (ICLR workshop 2018, arXiv 2017):

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt}

which prunes fast while many redundant weights remain and slowly near s_f.
The first conv and the last dense layer are usually more sensitive: with
`ends_scale < 1` each of them is pruned to ends_scale * s on its own, and
the global threshold takes the rest from the layers between.

Retraining runs `minicnn.fit` with a `constraint` that re-applies the masks
after every optimizer step and clears the optimizer's state (momentum,
Adam's moments) at removed positions, so a removed weight stays exactly 0
and its stale statistics never leak into later steps.

Sensitivity analysis (Han et al. 2015, Fig. 6): each layer pruned alone to
a range of sparsities, without retraining, and the accuracy measured.

Layers are named by type and order: conv1, conv2, ..., fc1, fc2, ...
"""

import math
from dataclasses import dataclass, field

import numpy as np

from minicnn.checks import check_number, check_positive_int
from minicnn.layers import Conv2D, Dense, weight_layers
from minicnn.model import check_sequential
from minicnn.optimizers import Adam
from minicnn.training import evaluate, fit

PREFIX = {Conv2D: "conv", Dense: "fc"}


# --------------------------------------------------------------------------
# Which layers


def layer_names(model):
    """{name: layer index} of the model's weight layers, in order, named conv1, ..., fc1, ..."""
    names, counts = {}, {}
    for i in weight_layers(model.layers):
        prefix = PREFIX[type(model.layers[i])]
        counts[prefix] = counts.get(prefix, 0) + 1
        names[f"{prefix}{counts[prefix]}"] = i
    return names


def select_layers(model, layers=None):
    """[(name, index)] for the named layers (None: every prunable layer); ValueError if none or unknown."""
    available = layer_names(check_sequential(model, "pruning"))
    if not available:
        raise ValueError("the model has no prunable layer (Conv2D or Dense)")
    if layers is None:
        return list(available.items())
    if isinstance(layers, str):
        layers = [layers]
    unknown = [name for name in layers if name not in available]
    if unknown:
        raise ValueError(f"unknown layer name(s) {unknown}; prunable layers are {list(available)}")
    return [(name, available[name]) for name in available if name in layers]


def check_sparsity(sparsity):
    if not isinstance(sparsity, (int, float, np.floating)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_quality(quality):
    return check_number(quality, "quality", low=0)


# --------------------------------------------------------------------------
# Masks: {layer index: bool array shaped like W, True = kept}


def _keep(model, masks, index):
    W = model.layers[index].params["W"]
    if index in masks:
        if masks[index].shape != W.shape:
            raise ValueError(f"mask of layer {index} has shape {masks[index].shape}, its W has {W.shape}")
        return masks[index]
    return np.ones(W.shape, dtype=bool)


def apply_masks(model, masks, optimizer=None):
    """Zero the removed weights in place, and the optimizer's state at the same positions."""
    for index, keep in masks.items():
        layer = model.layers[index]
        layer.params["W"][~keep] = 0  # assignment, not W * keep, which would leave -0.0
        slots = optimizer.state.get((id(layer), "W"), ()) if optimizer is not None else ()
        for slot in slots:
            slot[~keep] = 0


def clip_masks(model, quality, layers=None, masks=None):
    """Masks removing, in each chosen layer, the weights with |w| < quality * std(W); masks only grow."""
    quality = _check_quality(quality)
    masks = dict(masks or {})
    for _, index in select_layers(model, layers):
        W = model.layers[index].params["W"]
        masks[index] = _keep(model, masks, index) & (np.abs(W) >= quality * W.std())
    return masks


def _remove_smallest(model, masks, indices, count):
    """Masks for layers `indices` with exactly `count` of their weights removed, smallest |w| first."""
    keeps = [_keep(model, masks, i) for i in indices]
    # Removed weights score -1 so they stay removed; the stable sort breaks ties by position.
    scores = np.concatenate([
        np.where(keep, np.abs(model.layers[i].params["W"]), -1.0).reshape(-1)
        for i, keep in zip(indices, keeps)
    ])
    count = max(count, int((scores < 0).sum()))
    flat_keep = np.ones(scores.size, dtype=bool)
    flat_keep[np.argsort(scores, kind="stable")[:count]] = False
    out, start = {}, 0
    for i, keep in zip(indices, keeps):
        out[i] = flat_keep[start : start + keep.size].reshape(keep.shape)
        start += keep.size
    return out


def _count(sparsity, n):
    return int(math.floor(sparsity * n + 0.5))


def global_masks(model, sparsity, layers=None, masks=None, ends_scale=1.0):
    """Masks removing exactly round(sparsity * n) of the n weights of the chosen layers, by one
    global magnitude threshold. ends_scale < 1: the first and last chosen layers are pruned to
    ends_scale * sparsity each, and the layers between make up the rest. Masks only grow."""
    sparsity = check_sparsity(sparsity)
    if not 0 <= ends_scale <= 1:
        raise ValueError(f"ends_scale must be in [0, 1], got {ends_scale!r}")
    chosen = [index for _, index in select_layers(model, layers)]
    masks = dict(masks or {})
    sizes = {i: model.layers[i].params["W"].size for i in chosen}
    total = _count(sparsity, sum(sizes.values()))
    if ends_scale == 1:
        masks.update(_remove_smallest(model, masks, chosen, total))
        return masks
    if len(chosen) < 3:
        raise ValueError(f"ends_scale needs at least three chosen layers (first, middle, last), got {len(chosen)}")
    ends, middle = [chosen[0], chosen[-1]], chosen[1:-1]
    rest = total
    for i in ends:
        count = _count(ends_scale * sparsity, sizes[i])
        masks.update(_remove_smallest(model, masks, [i], count))
        rest -= int((~masks[i]).sum())
    if rest > sum(sizes[i] for i in middle):
        raise ValueError(f"sparsity {sparsity} with ends_scale {ends_scale} asks the middle layers for more "
                         "weights than they have")
    masks.update(_remove_smallest(model, masks, middle, max(rest, 0)))
    return masks


def layer_sparsity(model, layers=None):
    """{name: (zeros, size)} of each chosen layer's W, counted on the weights themselves."""
    table = {}
    for name, index in select_layers(model, layers):
        W = model.layers[index].params["W"]
        table[name] = (int(W.size - np.count_nonzero(W)), int(W.size))
    return table


def format_sparsity(model, layers=None):
    """A small per-layer table: zeros / size and sparsity, then the total."""
    table = layer_sparsity(model, layers)
    zeros, size = sum(z for z, _ in table.values()), sum(n for _, n in table.values())
    lines = [f"  {name:<6} {z:>9,} / {n:>9,} removed  ({z / n:6.1%})" for name, (z, n) in table.items()]
    lines.append(f"  {'total':<6} {zeros:>9,} / {size:>9,} removed  ({zeros / size:6.1%})")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The schedule


def cubic_sparsity(step, final, initial=0.0, start=0, count=1, every=1):
    """Zhu & Gupta's s_t at training step t: s_i before t0 = start, s_f after t0 + count * every."""
    check_sparsity(final)
    check_sparsity(initial)
    count = check_positive_int(count, "count")
    every = check_positive_int(every, "every")
    progress = min(max((step - start) / (count * every), 0.0), 1.0)
    return final + (initial - final) * (1 - progress) ** 3


class GradualPruning:
    """The constraint for `fit`: prunes on the cubic schedule, re-applies the masks after every step.

    Pruning step j = 1..count happens after training step (j - 1) * every, to the schedule's
    sparsity at j * every (t0 = -every: the first pruning falls on the first batch).
    """

    def __init__(self, final, count, every, optimizer, layers=None, ends_scale=1.0, masks=None):
        self.final, self.count, self.every = check_sparsity(final), count, every
        self.optimizer, self.layers, self.ends_scale = optimizer, layers, ends_scale
        self.masks, self.step = dict(masks or {}), 0
        self.history = []  # (step, sparsity) of each pruning step

    def prune(self, model):
        s = cubic_sparsity(self.step, self.final, start=-self.every, count=self.count, every=self.every)
        self.masks = global_masks(model, s, self.layers, self.masks, self.ends_scale)
        self.history.append((self.step, s))

    def __call__(self, model):
        if self.step % self.every == 0 and len(self.history) < self.count:
            self.prune(model)
        self.step += 1
        apply_masks(model, self.masks, self.optimizer)


class MaskConstraint:
    """The constraint for `fit` with fixed masks."""

    def __init__(self, masks, optimizer):
        self.masks, self.optimizer = masks, optimizer

    def __call__(self, model):
        apply_masks(model, self.masks, self.optimizer)


# --------------------------------------------------------------------------
# Drivers


@dataclass
class PruneResult:
    """The pruned model (dense layers with exact zeros), its masks and what happened."""

    model: object
    masks: dict
    history: list = field(default_factory=list)  # one dict per pruning step


def _steps_per_epoch(x, batch_size):
    return -(-len(x) // batch_size)


def _split_epochs(epochs, parts):
    return [len(chunk) for chunk in np.array_split(np.arange(epochs), parts)]


def prune_clip(model, x, y, quality, iterations=1, retrain_epochs=0, lr=1e-4, batch_size=64,
               seed=0, layers=None, in_place=False, verbose=True):
    """Iterative weight clipping: T = iterations rounds of (clip at q t / T, retrain), the
    retrain_epochs shared evenly among the rounds. Adam(lr) for retraining. Returns a PruneResult."""
    _check_quality(quality)
    iterations = check_positive_int(iterations, "iterations")
    retrain_epochs = check_positive_int(retrain_epochs, "retrain_epochs", minimum=0)
    select_layers(model, layers)
    model = model if in_place else model.copy()
    optimizer, masks, history = Adam(lr), {}, []
    for t, epochs in enumerate(_split_epochs(retrain_epochs, iterations), start=1):
        q = quality * t / iterations
        masks = clip_masks(model, q, layers, masks)
        apply_masks(model, masks, optimizer)
        fit(model, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, seed=seed + t,
            constraint=MaskConstraint(masks, optimizer), verbose=verbose)
        history.append({"iteration": t, "quality": q, "epochs": epochs, "layers": layer_sparsity(model, layers)})
    return PruneResult(model, masks, history)


def prune_global(model, x, y, sparsity, iterations=1, retrain_epochs=0, lr=1e-4, batch_size=64,
                 seed=0, layers=None, ends_scale=1.0, ramp=0.5, in_place=False, verbose=True):
    """Gradual global magnitude pruning to `sparsity` while retraining for retrain_epochs (Adam(lr)):
    `iterations` pruning steps on the cubic schedule, spread over the first `ramp` fraction of the
    training steps; the rest fine-tunes at the final sparsity. With retrain_epochs = 0: one shot."""
    sparsity = check_sparsity(sparsity)
    iterations = check_positive_int(iterations, "iterations")
    retrain_epochs = check_positive_int(retrain_epochs, "retrain_epochs", minimum=0)
    batch_size = check_positive_int(batch_size, "batch_size")
    if not 0 < ramp <= 1:
        raise ValueError(f"ramp must be in (0, 1], got {ramp!r}")
    select_layers(model, layers)
    model = model if in_place else model.copy()
    optimizer = Adam(lr)
    if retrain_epochs == 0:
        masks = global_masks(model, sparsity, layers, ends_scale=ends_scale)
        apply_masks(model, masks)
        return PruneResult(model, masks, [{"step": 0, "sparsity": sparsity, "layers": layer_sparsity(model, layers)}])
    steps = retrain_epochs * _steps_per_epoch(x, batch_size)
    if iterations > steps:
        raise ValueError(f"{iterations} pruning steps do not fit in {steps} training steps")
    every = max(1, int(ramp * steps) // iterations)
    pruner = GradualPruning(sparsity, iterations, every, optimizer, layers, ends_scale)
    fit(model, x, y, epochs=retrain_epochs, batch_size=batch_size, optimizer=optimizer, seed=seed,
        constraint=pruner, verbose=verbose)
    history = [{"step": step, "sparsity": s} for step, s in pruner.history]
    history[-1]["layers"] = layer_sparsity(model, layers)
    return PruneResult(model, pruner.masks, history)


def sensitivity(model, x, y, sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98), layers=None):
    """{layer name: [(sparsity, accuracy), ...]}: each layer pruned alone by magnitude, no retraining.

    The model is left as it was (each layer's W is restored after its sweep).
    """
    sparsities = [check_sparsity(s) for s in sparsities]
    curves = {}
    for name, index in select_layers(model, layers):
        W = model.layers[index].params["W"]
        original = W.copy()
        curve = []
        for s in sparsities:
            apply_masks(model, global_masks(model, s, [name]))
            curve.append((s, evaluate(model, x, y)))
            W[...] = original
        curves[name] = curve
    return curves


def format_sensitivity(curves):
    """The sensitivity curves as a table: one row per layer, one column per sparsity."""
    sparsities = [s for s, _ in next(iter(curves.values()))]
    header = "  layer  " + "".join(f"{s:>8.0%}" for s in sparsities)
    rows = [f"  {name:<7}" + "".join(f"{acc:>8.2%}" for _, acc in curve) for name, curve in curves.items()]
    return "\n".join([header, *rows])
