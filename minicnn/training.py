"""The training loop: shuffled mini-batches, forward, loss, backward, step.

    for each epoch: permute the data with the seeded generator
        for each batch: z = model.forward(x_b); L, dz = loss(z, idx)
                        model.backward(dz); optimizer.step(layers); constraint(model)

`constraint(model)` runs after every step: pruning re-applies its masks
there, weight sharing re-ties its clusters. `loss(z, idx)` receives the
batch's indices into x, so a loss with per-sample targets (distillation's
cached teacher logits) needs no change to the loop. Same seed, same
result: shuffling comes from `seed`, and every kernel is deterministic.
"""

import numpy as np
from tqdm.auto import tqdm

from .checks import check_array, check_labels, check_positive_int
from .losses import cross_entropy
from .optimizers import Adam


def _check_data(model, x, y):
    check_array(x, "x", ndim=1 + len(model.input_shape))
    if len(x) == 0:
        raise ValueError("no training images: x is empty")
    if x.shape[1:] != model.input_shape:
        raise ValueError(f"x has per-sample shape {x.shape[1:]}, the model expects {model.input_shape}")
    check_labels(y, len(x), model.num_classes)


def fit(model, x, y, epochs=10, batch_size=64, optimizer=None, seed=0, constraint=None,
        loss=None, validation=None, verbose=True):
    """Train `model` in place on x (N, C, H, W) float32, y (N,) int.

    optimizer: defaults to Adam(lr=1e-3). validation: optional (x_val, y_val),
    evaluated after each epoch. Returns the history: a dict of per-epoch lists
    "loss", "accuracy" (training, running over the epoch) and "val_accuracy".
    """
    _check_data(model, x, y)
    epochs = check_positive_int(epochs, "epochs", minimum=0)
    batch_size = check_positive_int(batch_size, "batch_size")
    optimizer = Adam(1e-3) if optimizer is None else optimizer
    if loss is None:
        def loss(z, idx):
            return cross_entropy(z, y[idx])
    rng = np.random.default_rng(seed)
    history = {"loss": [], "accuracy": [], "val_accuracy": []}
    n = len(x)
    for epoch in range(epochs):
        order = rng.permutation(n)
        total_loss = correct = seen = 0
        batches = tqdm(range(0, n, batch_size), desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not verbose, leave=verbose, unit="batch")
        for start in batches:
            idx = order[start : start + batch_size]
            z = model.forward(x[idx])
            batch_loss, dz = loss(z, idx)
            model.backward(dz)
            optimizer.step(model.layers)
            if constraint is not None:
                constraint(model)
            total_loss += batch_loss * len(idx)
            correct += int((z.argmax(axis=1) == y[idx]).sum())
            seen += len(idx)
            batches.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}", refresh=False)
        history["loss"].append(total_loss / max(seen, 1))
        history["accuracy"].append(correct / max(seen, 1))
        if validation is not None:
            history["val_accuracy"].append(evaluate(model, *validation))
            if verbose:
                tqdm.write(f"epoch {epoch + 1}: val accuracy {history['val_accuracy'][-1]:.4f}")
    model.clear_activations()
    return history


def evaluate(model, x, y, batch_size=256):
    """Accuracy in [0, 1] of anything with predict(x) -> logits (N, K)."""
    check_array(x, "x")
    logits = model.predict(x, batch_size=batch_size)
    check_labels(y, len(x), logits.shape[1])
    if len(y) == 0:
        raise ValueError("no images to evaluate on: x is empty")
    return float((logits.argmax(axis=1) == y).mean())
