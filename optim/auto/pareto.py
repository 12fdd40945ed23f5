"""The Pareto front of the search's models, and the choice within the accuracy budget.

Every model the search made is a point p = (a, b, v): validation accuracy a and
batch-1 speedup v over the base model (higher are better), bytes of its file b
(lower is better). p dominates q when it is no worse in all three and better in one:

    p > q  <=>  a_p >= a_q, b_p <= b_q, v_p >= v_q, and p != q in at least one

The front is the set of points no other point dominates (the trade-offs worth
keeping, as in AMC, He et al. ECCV 2018, and HAQ, Wang et al. CVPR 2019, which
search the same accuracy/size/latency space with reinforcement learning).

A point is within the budget when each of its two readings of the validation
split is: a on the decision images (each image and its shifted views) and a'
on the plain images alone, against the base model's a_0 and a'_0,

    a >= a_0 - max_drop   and   a' >= a'_0 - max_drop

(without the views the two are one number). The smallest model within the
budget is the one whose reading is luckiest (the winner's curse). The two
readings share the plain images, but each has its own bias (the base's luck
on those 800 images; a model's robustness to translation), so a model beyond
the budget is less often lucky on both (docs/auto.md measures what each rule
chose). The front reads a alone. Among the points within, the chosen model
is the one with the fewest bytes (ties broken by higher a, then higher
speedup) or the highest speedup (ties broken by higher a, then fewer bytes).

Latency is measured, not computed: `latency` times model.predict on one image with
minicnn.timing (warm-up, calibrated repeats, median), in the driver, while no trial
runs, each model in alternating rounds with the base model: the speedup v is the
ratio of one run (the machine's pace drifts between runs more than the models differ).
"""

import json

from minicnn.atomic import save_figure, write_file
from minicnn.serialization import load
from minicnn.timing import QUICK, compare, measure

OBJECTIVES = ("bytes", "latency")
READINGS = ("val_accuracy", "plain_accuracy")  # the decision images; the plain images alone


def dominates(p, q):
    no_worse = (p["val_accuracy"] >= q["val_accuracy"] and p["bytes"] <= q["bytes"]
                and p["speedup"] >= q["speedup"])
    better = (p["val_accuracy"] > q["val_accuracy"] or p["bytes"] < q["bytes"]
              or p["speedup"] > q["speedup"])
    return no_worse and better


def front(points):
    """The points no other point dominates, sorted by bytes (then accuracy, descending)."""
    kept = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(kept, key=lambda p: (p["bytes"], -p["val_accuracy"], -p["speedup"]))


def within(point, baseline, max_drop):
    """Whether both of the point's readings, val_accuracy and plain_accuracy, are at most
    `max_drop` (a fraction) below the baseline's."""
    return all(point[k] >= baseline[k] - max_drop - 1e-12 for k in READINGS)


def choose(points, baseline, max_drop, objective="bytes"):
    """The best point by `objective` within `max_drop` (a fraction) of the `baseline` point, or None."""
    order = {"bytes": lambda p: (p["bytes"], -p["val_accuracy"], -p["speedup"]),
             "latency": lambda p: (-p["speedup"], -p["val_accuracy"], p["bytes"])}[objective]
    return min((p for p in points if within(p, baseline, max_drop)), key=order, default=None)


def latency(path, x_one, base=None, budget=QUICK):
    """{"latency_s": the median of one batch-1 predict of the model file at `path`, "speedup": the
    base model's median over it, the two timed in alternating rounds (1.0 without a base)}.
    x_one (1, C, H, W) float32."""
    model = load(path)
    if base is None:
        return {"latency_s": measure(lambda: model.predict(x_one), budget).median, "speedup": 1.0}
    t = compare({"model": lambda: model.predict(x_one), "base": lambda: base.predict(x_one)}, budget)
    return {"latency_s": t["model"].median, "speedup": t["base"].median / t["model"].median}


def save(report, path):
    write_file(path, json.dumps(report, indent=1))


def plot(points, chosen, path):
    """Validation accuracy against bytes (log scale), batch-1 speedup as colour, the front circled;
    returns a message instead when matplotlib (the `plot` extra) is missing."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend
    except ImportError:
        return "matplotlib is not installed (pip install 'minicnn[plot]'): Pareto plot skipped"
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    dots = ax.scatter([p["bytes"] for p in points], [100 * p["val_accuracy"] for p in points],
                      c=[p["speedup"] for p in points], cmap="viridis", s=18)
    fig.colorbar(dots, label="batch-1 speedup over the base model")
    best = front(points)  # in three figures: not joined, a point may sit below its neighbours by being faster
    ax.plot([p["bytes"] for p in best], [100 * p["val_accuracy"] for p in best], color="crimson", ls="none",
            marker="o", mfc="none", ms=8, label="Pareto front (accuracy, bytes, speedup)")
    if chosen is not None:
        ax.scatter([chosen["bytes"]], [100 * chosen["val_accuracy"]], marker="*", s=180, color="orange",
                   zorder=5, label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return None
