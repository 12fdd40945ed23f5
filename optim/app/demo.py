"""`minicnn demo`: the seed example made real.

The example this project grew from trains a small Keras CNN (conv 32@3x3,
ReLU, max-pool 2, dense 10, softmax; Adam, cross-entropy, 10 epochs) and
then, for each optimization technique, only prints `model.summary()`. Here
every step does the work:

    for each network (the seed CNN, LeNet-5):
        train it as the example does, or reuse the copy cached in DIR      -> baseline
        for each technique: apply it to the baseline (with its fine-tuning),
            save the artifact in DIR, load it back with minicnn.load, and measure
            its test accuracy, size on disk, batch-1 latency and batch-256
            throughput, timed in alternation with the baseline's
    write DIR/report.json and DIR/report.md (each written, then renamed), and the plots

Every figure in the report is measured by the run that writes it. The
settings of each technique are those its own command measured (see
docs/techniques.md); `--quick` keeps the settings and cuts the data and the
epochs, to run the whole flow in CI.
"""

import os
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from minicnn import datasets, zoo
from minicnn.optimizers import Adam
from minicnn.serialization import load
from minicnn.summary import totals
from minicnn.timing import Budget, compare
from minicnn.training import evaluate, fit

from .. import auto, binary, cutting, distillation, pruning, quantization, sparse, structured
from ..deep_compression import deep_compression
from .report import format_verdict, write_json, write_markdown

NETWORKS = ("seed_cnn", "lenet5")


@dataclass(frozen=True)
class Recipe:
    """How much work the demo does: the full run, or `--quick` for CI."""

    train_images: int | None  # None: every training image
    max_epochs: int | None  # None: every technique trains for the epochs its settings ask
    timing: Budget
    search: dict  # optim.auto's options beyond the technique's settings

    def epochs(self, n):
        return n if self.max_epochs is None else min(n, self.max_epochs)


FULL_RUN = Recipe(train_images=None, max_epochs=None,
                  timing=Budget(repeats=7, min_time=0.05, warmup=3, warm_time=0.1, switch_time=0.05),
                  search={"workers": 2})
QUICK_RUN = Recipe(train_images=2000, max_epochs=2,
                   timing=Budget(repeats=1, min_time=0.0, warmup=1, warm_time=0.0, switch_time=0.0),
                   search={"workers": 1, "tolerances": (1.0, 4.0), "refine_rounds": 0})
BASELINE_EPOCHS = 10  # the example's recipe: Adam, lr 1e-3, batch 64
VALIDATION = 0.1  # of the training images: x_val, the split every decision reads

# What each technique is asked for, per network: the settings its own command
# measured (docs/techniques.md). Layer names count from 1 per kind: conv1, fc1...
SETTINGS = {
    "seed_cnn": {
        "weight sharing": {"bits": {"conv": 4, "fc": 4}, "epochs": 2},
        "weight clipping": {"quality": 1.2, "layers": ["fc1"], "iterations": 2, "epochs": 4},
        "network pruning": {"rate": 0.5, "criterion": "l1", "epochs": 3},
        "int8 quantization": {"per_channel": True, "calibration": 1000},
        # Two weight layers: no middle one to binarize, so the dense layer (98% of the
        # weights) takes binary weights; its inputs stay real, since sign(relu(x)) is ~ +1.
        "binarization": {"layers": [4], "binary_activations": False, "epochs": 5},
        "knowledge distillation": {"student": "tiny_cnn", "temperature": 8.0, "alpha": 0.9, "epochs": 20},
        "model pruning": {"sparsity": 0.8, "iterations": 4, "ends_scale": 1.0, "epochs": 4},
        "model cutting": {"max_drop": 0.005, "epochs": 3},
        "deep compression": {"sparsity": 0.8, "bits": {"conv": 8, "fc": 5}, "iterations": 8, "ends_scale": 1.0,
                             "epochs": 6},
        # 8 minutes: its refinement rounds, which reach past round 0's largest tolerance, fit on a Zen 1
        "automatic compression": {"network": "seed_cnn", "max_drop": 0.3, "time_budget": 8, "epochs": 4},
    },
    "lenet5": {
        "weight sharing": {"bits": {"conv": 4, "fc": 4}, "epochs": 2},
        "weight clipping": {"quality": 1.8, "layers": ["conv2", "fc1"], "iterations": 2, "epochs": 4},
        "network pruning": {"rate": 0.6, "criterion": "l1", "epochs": 3},
        "int8 quantization": {"per_channel": True, "calibration": 1000},
        "binarization": {"layers": None, "binary_activations": True, "epochs": 5},
        "knowledge distillation": {"student": "small_mlp", "temperature": 8.0, "alpha": 0.9, "epochs": 50},
        "model pruning": {"sparsity": 0.92, "iterations": 4, "ends_scale": 0.5, "epochs": 4},
        "model cutting": {"max_drop": 0.005, "epochs": 3},
        # conv1 and fc2 (2% of the weights, the most sensitive) are pruned to half the sparsity
        "deep compression": {"sparsity": 0.95, "bits": {"conv": 8, "fc": 5}, "iterations": 8, "ends_scale": 0.5,
                             "epochs": 6},
        # no per-layer number: optim.auto finds them within max_drop points of validation accuracy
        "automatic compression": {"network": "lenet5", "max_drop": 0.3, "time_budget": 8, "epochs": 4},
    },
}


@dataclass
class Data:
    """The images each step uses. Images (N, 1, 28, 28) float32, labels (N,) int.

    Baselines and fine-tuning train on all of (x_train, y_train), as the example
    does. (x_fit, y_fit) and (x_val, y_val) split those same images: where to cut
    is chosen by training heads on x_fit and scoring them on x_val, and the
    sensitivity curves are drawn on x_val. The baseline has seen x_val, so its
    accuracy there is a training accuracy, higher than on new images. Every
    accuracy in the report is on (x_test, y_test), which nothing trains on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_fit: np.ndarray
    y_fit: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str


def load_data(name, recipe, root=None, seed=0):
    """The data set `name`, its training images cut to recipe.train_images (a seeded sample)."""
    x_train, y_train, x_test, y_test = datasets.load(name, root=root)
    if recipe.train_images is not None and recipe.train_images < len(x_train):
        keep = np.sort(np.random.default_rng(seed).permutation(len(x_train))[: recipe.train_images])
        x_train, y_train = x_train[keep], y_train[keep]
    return Data(x_train, y_train, *datasets.split_validation(x_train, y_train, VALIDATION, seed), x_test, y_test,
                name)


@dataclass
class Outcome:
    """What a technique made: the artifact (anything `minicnn.load` reads back), the settings
    used, and what the verdict should add (e.g. the student's accuracy from scratch)."""

    model: object
    settings: dict
    note: str = ""
    figures: dict = field(default_factory=dict)  # data only the plots need


# --------------------------------------------------------------------------
# The techniques, each applied to a trained baseline (which it does not change)


def weight_sharing(model, data, epochs, bits):
    result = deep_compression(model, data.x_train, data.y_train, sparsity=0.0, bits=bits, finetune_epochs=epochs)
    return Outcome(result.model, {"index_bits": result.bits, "kmeans_rounds": result.rounds, "finetune_epochs": epochs,
                                  "coding": "huffman"})


def weight_clipping(model, data, epochs, quality, layers, iterations, lr=1e-4):
    epochs = max(epochs, iterations)  # each clip-and-retrain round needs an epoch, even under --quick
    result = pruning.prune_clip(model, data.x_train, data.y_train, quality, iterations=iterations,
                                retrain_epochs=epochs, lr=lr, layers=layers)
    settings = {"quality": quality, "layers": layers, "iterations": iterations, "retrain_epochs": epochs, "lr": lr}
    return Outcome(sparse.to_sparse(result.model), settings, figures={"pruned": result.model})


def network_pruning(model, data, epochs, rate, criterion, lr=3e-4):
    rates = {i: rate for i in structured.removable_layers(model)}
    pruned = structured.prune_and_finetune(model, rates, data.x_train, data.y_train, epochs=epochs,
                                           criterion=criterion, lr=lr)
    fewer = structured.total_macs(model) / structured.total_macs(pruned)
    settings = {"rate": rate, "layers": sorted(rates), "criterion": criterion, "finetune_epochs": epochs, "lr": lr}
    return Outcome(pruned, settings, note=f"{fewer:.1f}x fewer MACs")


def int8_quantization(model, data, epochs, per_channel, calibration):
    x_cal = data.x_train[np.random.default_rng(0).permutation(len(data.x_train))[:calibration]]
    quantized = quantization.quantize_model(model, x_cal, per_channel=per_channel)
    return Outcome(quantized, {"per_channel": per_channel, "calibration_images": len(x_cal), "method": "minmax"},
                   note="integer-only inference")


def binarization(model, data, epochs, layers, binary_activations):
    trained = binary.binarize(model, layers=layers, binary_activations=binary_activations)
    fit(trained, data.x_train, data.y_train, epochs=epochs, optimizer=Adam(1e-3), constraint=binary.clip_latent)
    chosen = [i for i, layer in enumerate(trained.layers) if layer.kind.startswith("binary")]
    settings = {"layers": chosen, "binary_activations": binary_activations, "retrain_epochs": epochs}
    kind = "XNOR-popcount" if binary_activations else "add/subtract"
    return Outcome(binary.pack(trained), settings, note=f"{kind} inference")


def knowledge_distillation(model, data, epochs, student, temperature, alpha):
    scratch = zoo.build(student, seed=0)
    fit(scratch, data.x_train, data.y_train, epochs=epochs, optimizer=Adam(1e-3))
    distilled = distillation.distill(model, zoo.build(student, seed=0), data.x_train, data.y_train, temperature,
                                     alpha, epochs, 64, Adam(1e-3), seed=0)
    settings = {"student": student, "temperature": temperature, "alpha": alpha, "epochs": epochs}
    note = f"the same student trained from scratch: {evaluate(scratch, data.x_test, data.y_test):.2%}"
    return Outcome(distilled, settings, note=note)


def model_pruning(model, data, epochs, sparsity, iterations, ends_scale, lr=1e-4):
    result = pruning.prune_global(model, data.x_train, data.y_train, sparsity, iterations=iterations,
                                  retrain_epochs=epochs, lr=lr, ends_scale=ends_scale)
    settings = {"sparsity": sparsity, "ends_scale": ends_scale, "schedule": "cubic", "iterations": iterations,
                "retrain_epochs": epochs, "lr": lr}
    return Outcome(sparse.to_sparse(result.model), settings, figures={"pruned": result.model})


def model_cutting(model, data, epochs, max_drop, lr=3e-4):
    cut, table = cutting.choose_truncation(model, data.x_fit, data.y_fit, data.x_val, data.y_val, max_drop=max_drop,
                                           epochs=epochs)
    chosen = next(row for row in table if row["chosen"])
    fit(cut, data.x_train, data.y_train, epochs=epochs, optimizer=Adam(lr))
    settings = {"max_drop": max_drop, "head_epochs": epochs, "finetune_epochs": epochs, "lr": lr,
                "candidates": {row["after"]: round(row["accuracy"], 4) for row in table}}
    removed = sum(bool(layer.params) for layer in model.layers) - sum(bool(layer.params) for layer in cut.layers) + 1
    kept = f"layers 0..{chosen['after']}" if chosen["after"] >= 0 else "no layer"
    within = ("within" if chosen["accuracy_drop"] <= max_drop
              else "no cut was within max_drop of the uncut network; the most accurate:")
    return Outcome(cut, settings, note=f"{within} kept {kept} and a new head in place of the {removed} weight "
                                       f"layers after them")


def deep_compression_pipeline(model, data, epochs, sparsity, bits, iterations, ends_scale):
    finetune = max(1, epochs // 3)
    result = deep_compression(model, data.x_train, data.y_train, sparsity=sparsity, bits=bits,
                              retrain_epochs=epochs, finetune_epochs=finetune, prune_iterations=iterations,
                              ends_scale=ends_scale)
    settings = {"sparsity": sparsity, "ends_scale": ends_scale, "index_bits": result.bits,
                "kmeans_rounds": result.rounds, "iterations": iterations, "retrain_epochs": epochs,
                "finetune_epochs": finetune, "coding": "huffman"}
    return Outcome(result.model, settings, note="prune, share, Huffman-code")


def automatic_compression(model, data, epochs, network, max_drop, time_budget, recipe, out_dir):
    """optim.auto's search, from a base of the same recipe trained without the validation split
    (the baseline has seen it: its candidates, retrained without it, would all look worse than they
    are). The search keeps its trial log beside that base, so a second run resumes it."""
    base, path = baseline(network, data, recipe, out_dir, held_out=True)
    report = auto.auto_compress(path, data.x_train, data.y_train, path.removesuffix(".npz") + "-auto", max_drop,
                                time_budget=time_budget, epochs=epochs, validation=VALIDATION, seed=0, **recipe.search)
    chosen = report["chosen"]["bytes"]
    settings = {"max_drop": max_drop, "objective": "bytes", "time_budget_min": time_budget, "retrain_epochs": epochs,
                "chosen": {"family": chosen["family"], "kind": chosen["kind"], "tolerance": chosen["tolerance"]},
                "trials": len({p["key"] for p in report["points"]}) - 1, "search_seconds": round(report["seconds"])}
    drop = {k: 100 * (chosen[k] - report["baseline"][k]) for k in auto.READINGS}
    note = (f"{settings['trials']} trials in {report['seconds'] / 60:.1f} min; validation "
            f"{drop['val_accuracy']:+.2f} points on the shifted views, {drop['plain_accuracy']:+.2f} on the plain "
            "images, against its own base "
            f"(trained without the validation split: {evaluate(base, data.x_test, data.y_test):.2%} on test)")
    return Outcome(load(report["chosen_path"]), settings, note=note)


# The techniques in the order the demo applies them.
APPLY = {
    "weight sharing": weight_sharing,
    "weight clipping": weight_clipping,
    "network pruning": network_pruning,
    "int8 quantization": int8_quantization,
    "binarization": binarization,
    "knowledge distillation": knowledge_distillation,
    "model pruning": model_pruning,
    "model cutting": model_cutting,
    "deep compression": deep_compression_pipeline,
    "automatic compression": automatic_compression,
}
TECHNIQUES = tuple(APPLY)


# --------------------------------------------------------------------------
# Baselines, measurements, the run


def check_out_dir(out_dir):
    """Create `out_dir` if needed and make sure files can be written in it, before any work."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"output folder {out_dir} is a file, not a folder")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out_dir} is not writable")


def _architecture(model):
    return [(layer.kind, layer.config()) for layer in model.layers]


def baseline(name, data, recipe, out_dir, held_out=False):
    """The trained network `name`: DIR/baseline-<name>[-heldout][-quick]-<data>.npz if it is there
    (its architecture checked), else trained and saved there. held_out: trained on x_fit only, for
    a search that decides on x_val. Returns (model, path)."""
    path = os.path.join(out_dir, f"baseline-{name}{'-heldout' if held_out else ''}"
                                 f"{'-quick' if recipe.train_images else ''}-{data.name}.npz")
    fresh = zoo.build(name, seed=0)
    if os.path.exists(path):
        model = load(path)
        if getattr(model, "layers", None) is None or _architecture(model) != _architecture(fresh):
            raise ValueError(f"{path} holds another architecture than {name}; remove it or choose another --out")
        tqdm.write(f"reusing the trained {name} cached in {path}")
        return model, path
    x, y = (data.x_fit, data.y_fit) if held_out else (data.x_train, data.y_train)
    epochs = recipe.epochs(BASELINE_EPOCHS)
    tqdm.write(f"training {name} on {len(x)} images: {epochs} epochs, batch 64, adam lr 0.001")
    fit(fresh, x, y, epochs=epochs, optimizer=Adam(1e-3))
    fresh.save(path)
    return fresh, path


def speeds(model, x, budget, baseline_model=None):
    """Batch-1 latency (ms) and batch-256 throughput (images/s) of `model`'s predict; with a
    baseline, each timed in alternating rounds with it (minicnn.timing.compare), and the
    speedups: baseline time / model time."""
    timings = {}
    for key, images in (("b1", x[:1]), ("b256", x[:256])):
        contestants = {"model": lambda: model.predict(images)}
        if baseline_model is not None:
            contestants["baseline"] = lambda: baseline_model.predict(images)
        timings[key] = compare(contestants, budget)
    row = {"latency_ms_b1": 1e3 * timings["b1"]["model"].median,
           "throughput_b256": len(x[:256]) / timings["b256"]["model"].median}
    if baseline_model is not None:
        row.update({f"speedup_{key}": t["baseline"].median / t["model"].median for key, t in timings.items()})
    return row


def describe(model, path, data):
    """The report's figures of a saved model: test accuracy, params, nonzero, bits per weight
    (the layers' storage, codebooks and biases included, as in summary()), bytes of the file."""
    t = totals(model)
    return {"accuracy": evaluate(model, data.x_test, data.y_test), "params": t["params"], "nonzero": t["nonzero"],
            "bits_per_weight": t["bits_per_weight"], "bytes": os.path.getsize(path),
            "artifact": os.path.basename(path)}


def measure_baseline(name, model, path, data, recipe):
    """The report's row of a trained baseline."""
    row = {"model": name, **describe(model, path, data), **speeds(model, data.x_test, recipe.timing),
           "settings": {"epochs": recipe.epochs(BASELINE_EPOCHS), "batch_size": 64, "optimizer": "adam", "lr": 1e-3}}
    tqdm.write(f"\n== {name}, the baseline ==\n{model.summary()}\ntest accuracy {row['accuracy']:.2%}, "
               f"{row['bytes']:,} bytes on disk")
    return row


def apply_technique(technique, name, model, base, data, recipe, out_dir):
    """Apply `technique` to the trained `model`, save the artifact, load it back and measure the
    file as it loads. Returns (the report's row, the loaded artifact, the Outcome)."""
    settings = dict(SETTINGS[name][technique])
    epochs = recipe.epochs(settings.pop("epochs", 0))
    start = time.perf_counter()
    if technique == "automatic compression":  # the search keeps its trials and front in out_dir
        settings.update(recipe=recipe, out_dir=out_dir)
    outcome = APPLY[technique](model, data, epochs, **settings)
    seconds = time.perf_counter() - start
    path = os.path.join(out_dir, f"{name}-{technique.replace(' ', '-')}.npz")
    outcome.model.save(path)
    artifact = load(path)
    row = {"technique": technique, "model": name, **describe(artifact, path, data)}
    row["delta_points"] = 100 * (row["accuracy"] - base["accuracy"])
    row["compression"] = base["bytes"] / row["bytes"]
    row.update(speeds(artifact, data.x_test, recipe.timing, model), settings=outcome.settings, note=outcome.note,
               seconds=seconds)
    tqdm.write(f"\n== {name}: {technique} ==\n{artifact.summary()}\n{format_verdict(row)}")
    return row, artifact, outcome


def run(data_name="mnist10k", out_dir="demo", quick=False, root=None, networks=NETWORKS, techniques=TECHNIQUES,
        plots=True):
    """Train, apply every technique, measure, report. Returns the report (the JSON's content)."""
    for name in networks:
        if name not in SETTINGS:
            raise ValueError(f"unknown network {name!r}; the demo knows {', '.join(SETTINGS)}")
    for technique in techniques:
        if technique not in APPLY:
            raise ValueError(f"unknown technique {technique!r}; choose from {', '.join(TECHNIQUES)}")
    if data_name not in datasets.DATASETS:
        raise ValueError(f"unknown data set {data_name!r}; choose one of {', '.join(sorted(datasets.DATASETS))}")
    check_out_dir(out_dir)
    recipe = QUICK_RUN if quick else FULL_RUN
    data = load_data(data_name, recipe, root)
    report = {"dataset": data_name, "quick": quick, "train_images": len(data.x_train), "test_images": len(data.x_test),
              "baseline": {}, "results": []}
    figures = {}  # per network: the models and curves the plots draw
    steps = tqdm(total=len(networks) * len(techniques), desc="demo", unit="technique")
    for name in networks:
        model, path = baseline(name, data, recipe, out_dir)
        base = report["baseline"][name] = measure_baseline(name, model, path, data, recipe)
        figures[name] = {"baseline": model}
        if plots:  # the curves are only drawn: 6 evaluations per weight layer
            figures[name]["sensitivity"] = pruning.sensitivity(model, data.x_val, data.y_val)
        for technique in techniques:
            steps.set_postfix_str(f"{name}: {technique}")
            row, artifact, outcome = apply_technique(technique, name, model, base, data, recipe, out_dir)
            report["results"].append(row)
            figures[name][technique] = {"model": artifact, **outcome.figures}
            steps.update()
    steps.close()
    write_json(report, out_dir)  # before the plots: a plotting failure must not lose the figures
    plot_files, why = _plots(report, figures, out_dir) if plots else ([], "--no-plots")
    write_markdown(report, out_dir, plot_files, why)
    return report


def _plots(report, figures, out_dir):
    """(files written, why none) for the plots of this run."""
    try:
        from . import plots
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] != "matplotlib":
            raise  # a broken import inside optim.app.plots is a bug, not a missing extra
        tqdm.write("plots skipped: matplotlib is not installed (pip install 'minicnn[plot]')")
        return [], "matplotlib is not installed"
    return plots.draw_all(report, figures, out_dir), ""
