"""The demo's plots (matplotlib, the `plot` extra): the trade-off at a glance,
weights before and after sharing and quantization, pruning masks, and
pruning sensitivity curves.

Figures are drawn with matplotlib's object API (`Figure`, no pyplot), so no
display or global backend is involved, and saved atomically as PNG.
"""

import os

import numpy as np
from matplotlib.figure import Figure

from minicnn.atomic import save_figure
from minicnn.layers import weight_layers

MARKERS = {"seed_cnn": "o", "lenet5": "s"}


def _save(fig, out_dir, name):
    save_figure(fig, os.path.join(out_dir, name))
    return name


def tradeoff(report, out_dir):
    """Test accuracy against bytes on disk (log axis), one point per technique and network."""
    fig = Figure(figsize=(8, 5.5))
    ax = fig.add_subplot()
    for k, (name, base) in enumerate(report["baseline"].items()):
        color = f"C{k}"
        rows = [r for r in report["results"] if r["model"] == name]
        ax.scatter([r["bytes"] for r in rows], [100 * r["accuracy"] for r in rows], marker=MARKERS.get(name, "o"),
                   color=color, label=name)
        ax.scatter([base["bytes"]], [100 * base["accuracy"]], marker="*", s=200, color=color,
                   label=f"{name} baseline")
        for r in rows:
            ax.annotate(r["technique"], (r["bytes"], 100 * r["accuracy"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"What each technique bought on {report['dataset']}: up and to the left is better")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "tradeoff.png")


def _largest_weight_layer(model):
    return max(weight_layers(model.layers), key=lambda i: model.layers[i].params["W"].size)


def _int8_unit(quantized, shape):
    """(unit, its scale, its codes): the output unit at the median scale of the int8 op whose
    weights have `shape` (the int8 ops fuse ReLUs, so indices differ from the float model's);
    None if no op has that shape."""
    op = next((op for op in quantized.layers if getattr(op, "W", None) is not None and op.W.shape == shape), None)
    if op is None:
        return None
    unit = int(np.argsort(op.w_scale)[op.w_scale.size // 2])
    codes = op.W[:, unit] if op.W.ndim == 2 else op.W[unit]
    return unit, float(op.w_scale[unit]), codes


def histograms(figures, out_dir):
    """Per network, its largest layer: the float weights, the weights after sharing with the
    centroids marked, and one output unit's weights against its int8 levels."""
    names = [n for n in figures if "weight sharing" in figures[n] and "int8 quantization" in figures[n]]
    if not names:
        return None
    fig = Figure(figsize=(14, 3.6 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), 3, squeeze=False)
    for row, name in zip(axes, names):
        base = figures[name]["baseline"]
        index = _largest_weight_layer(base)
        W = base.layers[index].params["W"]
        w = W.ravel()
        row[0].hist(w, bins=200, color="gray")
        row[0].set_title(f"{name}, layer {index}: {w.size:,} float32 weights", fontsize=9)
        shared = figures[name]["weight sharing"]["model"].layers[index]
        codebook = shared.params["codebook"]
        row[1].hist(w, bins=200, color="lightgray", label="before")
        row[1].hist(shared.values(), bins=200, color="C0", label="after sharing")
        row[1].vlines(codebook, 0, 1, transform=row[1].get_xaxis_transform(), color="C3", lw=0.6)
        row[1].set_title(f"after sharing: {codebook.size} centroids (red), fine-tuned", fontsize=9)
        row[1].legend(fontsize=7)
        found = _int8_unit(figures[name]["int8 quantization"]["model"], W.shape)
        if found is None:
            row[2].axis("off")
            continue
        unit, scale, codes = found
        floats = (W[:, unit] if W.ndim == 2 else W[unit]).ravel()
        # Near zero, where most weights are, so that the individual levels show.
        # Bins of scale / 8 centred on the levels, so each level's codes fill one bar.
        window, bins = 10 * scale, scale * (np.arange(-80.5, 81.5) / 8)
        snapped = scale * codes.ravel().astype(np.float64)
        row[2].hist(floats[np.abs(floats) < window], bins=bins, color="lightgray", label="float32")
        row[2].hist(snapped[np.abs(snapped) < window], bins=bins, color="C0", label="int8 x scale")
        row[2].legend(fontsize=7)
        row[2].vlines(scale * np.arange(-10, 11), 0, 1, transform=row[2].get_xaxis_transform(), color="C3", lw=0.6)
        row[2].set_title(f"int8, unit {unit}, near 0: levels k x {scale:.2e} (red),\n"
                         f"k in [{int(codes.min())}, {int(codes.max())}] over the unit", fontsize=9)
    for ax in axes.ravel():
        ax.set_xlabel("weight")
    for ax in axes[:, :2].ravel():
        ax.set_yscale("log")
    return _save(fig, out_dir, "weights.png")


def _weight_image(layer):
    """A weight layer's weights as a 2-D array, one row per output unit."""
    W = layer.params["W"]
    return W.reshape(W.shape[0], -1) if W.ndim == 4 else W.T


def masks(figures, out_dir, techniques=("weight clipping", "model pruning")):
    """Which weights survive pruning: each pruned layer's mask as an image (black = kept)."""
    panels = [(name, t, figures[name][t]["pruned"]) for name in figures for t in techniques if t in figures[name]]
    if not panels:
        return None
    weighted = [weight_layers(model.layers) for *_, model in panels]
    width = max(map(len, weighted))
    fig = Figure(figsize=(3.2 * width, 3.0 * len(panels)))
    axes = fig.subplots(len(panels), width, squeeze=False)
    for row, (name, technique, model), indices in zip(axes, panels, weighted):
        for ax, i in zip(row, indices):
            kept = _weight_image(model.layers[i]) != 0
            ax.imshow(kept, cmap="gray_r", aspect="auto", interpolation="nearest")
            ax.set_title(f"{name} {technique}\nlayer {i}: {kept.mean():.1%} kept", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[len(indices):]:
            ax.axis("off")
    return _save(fig, out_dir, "masks.png")


def sensitivity(figures, out_dir):
    """Accuracy against the sparsity of one layer at a time, no retraining, on the demo's
    x_val: training images the baseline has seen, so the level is high; the shape is the point."""
    names = [n for n in figures if "sensitivity" in figures[n]]
    fig = Figure(figsize=(5.5 * len(names), 4))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        for layer, curve in figures[name]["sensitivity"].items():
            s, acc = zip(*curve)
            ax.plot(100 * np.array(s), 100 * np.array(acc), marker="o", label=layer)
        ax.set_title(f"{name}: one layer pruned, no retraining")
        ax.set_xlabel("sparsity of the layer (%)")
        ax.set_ylabel("accuracy on 10% of the training images (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out_dir, "sensitivity.png")


def draw_all(report, figures, out_dir):
    """Every plot the data allow; returns the file names written in out_dir."""
    files = [tradeoff(report, out_dir), histograms(figures, out_dir), masks(figures, out_dir),
             sensitivity(figures, out_dir)]
    return [f for f in files if f]
