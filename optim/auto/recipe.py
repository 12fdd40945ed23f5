"""One trial: a candidate's per-layer settings applied to the model, retrained, saved.

A candidate is a JSON-ready dict (the search writes it, the trial log keys on it):

    {"family": "prune" | "filters" | "narrow" | "binary", "epochs": E, "sparsity": {name: s},
     "filters": {name: r}, "bits_tolerance": t (a fraction), "int8": bool, "share": bool}

(a binary candidate has no "sparsity" and no "int8")

and `run` turns it into compressed models with the project's own techniques, in
the order of Deep Compression (Han, Mao & Dally 2016), structured pruning first:

    1. filters (Li et al. 2017): remove floor(r_l * units_l) lowest-L1 units of layer l
       (the "narrow" family stops here: all s_l = 0, the layers stay dense and are retrained)
    2. pruning: per-layer magnitude masks, reached on Zhu & Gupta's cubic schedule
       s_l(t) = s_l (1 - (1 - t/T)^3) over the first half of E epochs of retraining
       (Adam 1e-4; 3e-4 after filter removal, which moves the weights further), with the
       masks re-applied after every step                               -> point "sparse"
    3. sharing: k-means with 2**b_l centroids per layer, centroids fine-tuned 1 epoch,
       Huffman-coded indices (optim.sharing)                            -> point "shared"
       b_l = min{b : a_sparse - a_l(b) <= the candidate's bits tolerance}, the bits curve
       measured again on the pruned, retrained layer (its nonzeros are few and large: the
       curve of the dense layer in stage 1 is far too optimistic for them)
    4. int8: the retrained model post-training quantized (optim.quantization) -> point "int8"

The "binary" family removes the candidate's units (step 1, when it has any),
binarizes the middle weight layers (sensitivity.binary_layers; BinaryConnect
weights, float activations), trains 2E epochs with latent weights clipped to
[-1, 1], and packs them to one bit per weight -> point "binary"; then shares the
layers left float as in step 3 (the binary ones train on through the centroids'
epoch) -> point "binary-shared". Fewer units and one bit per weight multiply:
the seed CNN with half its filters and a binary dense layer is 36x smaller than
its float32 file.

A trial is a pure function of (candidate, context, seed): it reads nothing else
and every random choice comes from `seed`, so a process pool, a Dask worker on
another machine, and the driver itself all return the same bytes.
"""

import os
import tempfile

from minicnn.optimizers import Adam
from minicnn.training import evaluate, fit

from .. import binary, deep_compression, pruning, quantization, sharing, structured
from . import sensitivity
from ..sparse import to_sparse

PRUNE_LR, FILTERS_LR, SHARE_LR = 1e-4, 3e-4, 1e-4
BINARY_EPOCHS = 2  # times the candidate's epochs: a latent weight must cross zero to flip its sign


class PerLayerSchedule:
    """The `constraint` for fit: per-layer targets {layer index: s_l} reached on the cubic schedule
    in `count` pruning steps, one every `every` training steps; masks re-applied after each step."""

    def __init__(self, model, targets, count, every, optimizer):
        self.targets, self.count, self.every, self.optimizer = targets, count, every, optimizer
        self.names = {index: name for name, index in pruning.layer_names(model).items()}
        self.masks, self.step, self.done = {}, 0, 0

    def __call__(self, model):
        if self.step % self.every == 0 and self.done < self.count:
            self.done += 1
            for index, final in self.targets.items():
                s = pruning.cubic_sparsity(self.done, final, count=self.count)
                self.masks = pruning.global_masks(model, s, [self.names[index]], self.masks)
        self.step += 1
        pruning.apply_masks(model, self.masks, self.optimizer)


def model_bytes(model):
    """The model's file, as bytes: what the driver writes into the run's folder."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.npz")
        model.save(path)
        with open(path, "rb") as f:
            return f.read()


def readings(model, context):
    """{"val_accuracy", "plain_accuracy"}: the model's two readings of the validation split
    (pareto.within). Without the shifted views the plain images are the decision images: read once."""
    val = evaluate(model, context["x_val"], context["y_val"])
    if context["x_plain"] is context["x_val"]:
        return {"val_accuracy": val, "plain_accuracy": val}
    return {"val_accuracy": val, "plain_accuracy": evaluate(model, context["x_plain"], context["y_plain"])}


def _point(kind, model, context, **settings):
    data = model_bytes(model)
    return {"kind": kind, **readings(model, context), "bytes": len(data), "file": data, **settings}


def _retrain_pruned(model, candidate, x, y, seed, lr):
    names = pruning.layer_names(model)
    targets = {names[n]: s for n, s in candidate["sparsity"].items() if s > 0}
    optimizer = Adam(lr)
    steps = candidate["epochs"] * -(-len(x) // 64)
    count = max(1, min(8, steps // 2))
    schedule = PerLayerSchedule(model, targets, count, max(1, steps // 2 // count), optimizer)
    # (count - 1) * every < steps: every pruning step runs, the last one at the targets
    fit(model, x, y, epochs=candidate["epochs"], batch_size=64, optimizer=optimizer, seed=seed,
        constraint=schedule, verbose=False)
    return model


def _shared(model, candidate, context, seed, constraint=None):
    """The shared point of a retrained model: each float layer's weights k-means shared with the
    fewest bits its own curve allows, centroids fine-tuned one epoch (`constraint` after each step)."""
    bits = sensitivity.fewest_bits(model, candidate["bits_tolerance"], context["x_val"], context["y_val"], seed)
    bits = deep_compression.capped_bits(model, bits)
    shared = sharing.share_weights(model, bits, seed=seed)
    fit(shared, context["x_fit"], context["y_fit"], epochs=1, batch_size=64, optimizer=Adam(SHARE_LR), seed=seed + 1,
        constraint=constraint, verbose=False)
    return shared, bits


def _binary(model, candidate, context, seed):
    trained = binary.binarize(model, layers=sensitivity.binary_layers(model))
    fit(trained, context["x_fit"], context["y_fit"], epochs=BINARY_EPOCHS * candidate["epochs"], batch_size=64,
        optimizer=Adam(1e-3), seed=seed, constraint=binary.clip_latent, verbose=False)
    points = [_point("binary", binary.pack(trained), context)]
    if candidate.get("share"):
        shared, bits = _shared(trained, candidate, context, seed, constraint=binary.clip_latent)
        # layer_names counts the float layers alone once the others are binary: name them as before
        names = {index: name for name, index in pruning.layer_names(model).items()}
        bits = {names[index]: bits[name] for name, index in pruning.layer_names(trained).items()}
        points.append(_point("binary-shared", binary.pack(shared), context, bits=bits))
    return points


def _remove_filters(model, candidate):
    """(model, retraining lr): the candidate's units removed first, if it removes any."""
    names = pruning.layer_names(model)
    rates = {names[n]: r for n, r in candidate.get("filters", {}).items() if r > 0}
    if not rates:
        return model, PRUNE_LR
    return structured.prune(model, rates), FILTERS_LR


def run(candidate, context, seed):
    """The points of one trial: [{"kind", "val_accuracy", "plain_accuracy", "bytes", "file": the .npz as
    bytes}], the shared point with its "bits" per layer too.

    context: {"model": the trained Sequential, "x_fit", "y_fit" (N, C, H, W) float32 / (N,) int64
    retraining images, "x_val", "y_val" the validation readings (the split's images and their
    shifted views), "x_plain", "y_plain" the split's images alone}. The context's model is not changed.
    """
    x, y = context["x_fit"], context["y_fit"]
    model, lr = _remove_filters(context["model"].copy(), candidate)
    if candidate["family"] == "binary":
        return _binary(model, candidate, context, seed)
    model = _retrain_pruned(model, candidate, x, y, seed, lr)
    points = [_point("sparse", to_sparse(model), context)]
    if candidate.get("share"):
        shared, bits = _shared(model, candidate, context, seed)
        points.append(_point("shared", shared, context, bits=bits))
    if candidate.get("int8"):
        points.append(_point("int8", quantization.quantize_model(model, x[:sensitivity.CALIBRATION]), context))
    return points
