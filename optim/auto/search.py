"""Stage 2: the search over per-layer settings, and the whole `compress --auto` run.

The method is Deep Compression's sensitivity-driven thresholds (Han, Mao & Dally,
ICLR 2016; Han et al. 2015, section 4), as Distiller automates them (Zmora et
al. 2019), turned into a one-dimensional search. A tolerance t (points of
validation accuracy) picks every layer's settings at once from the stage-1
curves (sensitivity.settings_within, each curve followed piecewise-linearly up to
its first crossing, so tolerances between grid points give new settings):

    s_l(t) = max{s : a_0 - a_l^prune(s) <= t n_l / n_max}   sparsity of layer l: a layer of n_l
                                                            weights may lose in proportion to them
                                                            (n_max: the largest layer's)
    r_l(t) = max{r : a_0 - a_l^filter(r) <= t}              fraction of units removed (filters,
                                                            narrow, binary families)
    b_l    = min{b : a' - a_l^share(b) <= D / L}            index bits of layer l, read in the
                                                            trial off the curve of the pruned,
                                                            retrained layer (a'), D = max_drop
                                                            shared evenly by the L layers

so sensitive layers stay dense and wide, redundant ones go far, with no number
given by hand. Each candidate is retrained (recipe.py) and yields up to three
models (sparse float, shared + Huffman, int8), or two binary ones (binary, and
binary with its float layers shared).

    round 0   a ladder of tolerances, for each family (prune; filters + prune;
              filters + binary; for --objective latency, filters alone: "narrow");
              without filters, one binary trial with every unit
    round k   per family, bisect (geometrically, two points) between the largest
              tolerance whose trial stayed within max_drop and the next one tried
    last      fine-tune the promising candidates: the bracketing pair of each
              family again, with twice the retraining epochs

Every decision reads validation accuracy only: the images are the training
images' validation split (minicnn.datasets.split_validation), each read with
its eight one-pixel translations (minicnn.datasets.shifted_views), and a trial
is within max_drop when it is so both on these views and on the plain images
(pareto.within); this module never sees the test images. The refinement uses
accuracy alone (not latency, which is measured and noisy), so the trials a seed
runs are the same on every executor. AMC (He et al., ECCV 2018) and HAQ (Wang
et al., CVPR 2019) search the same per-layer space with reinforcement learning,
at far more trials.
"""

import hashlib
import os
import time

import numpy as np

from minicnn.atomic import write_file
from minicnn.checks import check_bool, check_number, check_positive_int
from minicnn.datasets import shifted_views, split_validation
from minicnn.model import check_sequential
from minicnn.serialization import load
from minicnn.training import evaluate

from . import pareto, recipe, sensitivity, trials

TECHNIQUES = ("prune", "share", "int8", "binary", "filters")
TOLERANCES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # points of one-shot per-layer drop
CONTEXT_KEYS = ("x_fit", "y_fit", "x_val", "y_val", "x_plain", "y_plain")


def _sha256(*arrays):
    """sha256 of the arrays' bytes one after the other, read in place (no copy of the data set)."""
    digest = hashlib.sha256()
    for a in arrays:
        digest.update(np.ascontiguousarray(a))
    return digest.hexdigest()


def check_settings(max_drop, objective, techniques, workers, time_budget, epochs):
    """ValueError on a bad setting, before any work; returns the techniques as a sorted list."""
    check_number(max_drop, "max_drop (accuracy points)", 0)
    if objective not in pareto.OBJECTIVES:
        raise ValueError(f"objective must be one of {pareto.OBJECTIVES}, got {objective!r}")
    techniques = list(TECHNIQUES if techniques is None else techniques)
    unknown = sorted(set(techniques) - set(TECHNIQUES))
    if unknown or not techniques:
        raise ValueError(f"unknown technique(s) {unknown or techniques}; choose among {list(TECHNIQUES)}")
    check_positive_int(workers, "workers")
    if time_budget is not None and check_number(time_budget, "time_budget (minutes)", 0) == 0:
        raise ValueError("time_budget (minutes) must be above 0, got 0")
    check_positive_int(epochs, "epochs")
    return sorted(set(techniques))


def candidate(family, table, tolerance, techniques, epochs, max_drop):
    """The per-layer settings of `family` at `tolerance` (points) read off the sensitivity table.

    The bits get an even share of the budget per layer, max_drop / L: the drops of L shared
    layers add up, and the pruning has used its own part of the budget already.
    """
    chosen = sensitivity.settings_within(table, tolerance / 100) if tolerance is not None else {}
    layers = table["layers"]
    shared = {"bits_tolerance": round(max_drop / 100 / len(layers), 6), "share": "share" in techniques}
    if family == "binary":
        return {"family": "binary", "epochs": epochs, "filters": chosen.get("filters", {}), **shared}
    unpruned = {name: 0.0 for name in layers}
    return {"family": family, "epochs": epochs,
            "sparsity": unpruned if family == "narrow" else chosen.get("sparsity", unpruned),
            "filters": chosen.get("filters", {}) if family in ("filters", "narrow") else {},
            "int8": "int8" in techniques, **shared}


def families(techniques, table, objective):
    """The families that climb a tolerance ladder: binary does when units can be removed first;
    narrow (units removed, no weight pruned: dense kernels on smaller layers) for latency only."""
    out = []
    if {"prune", "share", "int8"} & set(techniques):
        out.append("prune")
    if "filters" in techniques and table.get("filters"):
        out.append("filters")
        if objective == "latency":
            out.append("narrow")
        if "binary" in techniques and table.get("binary"):
            out.append("binary")
    return out


def next_tolerances(tried, feasible):
    """Two tolerances to try next for one family, given {tolerance: within budget}; [] when settled."""
    ts = sorted(tried)
    ok = [t for t in ts if feasible[t]]
    if not ok:
        return [ts[0] / 4, ts[0] / 2]
    lo = max(ok)
    above = [t for t in ts if t > lo]
    if not above:
        return [lo * 1.5, lo * 2]
    hi = min(above)
    if hi / lo < 1.15:
        return []  # the bracket is narrower than the curves can tell apart
    return [lo * (hi / lo) ** (1 / 3), lo * (hi / lo) ** (2 / 3)]


class Run:
    """The state of one search: its log, executor, trials and measured points."""

    def __init__(self, context, log, runner, table, settings, progress):
        self.context, self.log, self.runner = context, log, runner
        self.table, self.settings, self.progress = table, settings, progress
        self.baseline = recipe.readings(context["model"], context)
        self.tried = {}  # family -> {tolerance: key}
        self.results = {}  # key -> (candidate, tolerance, points)
        self.latency = {}  # path -> {"latency_s", "speedup" over the base model}

    def run(self, jobs):
        """jobs: [(tolerance, candidate)] -> run (or resume) them, record their points."""
        found = trials.run_trials([(c, self.settings["seed"]) for _, c in jobs], self.log, self.runner,
                                  self.progress)
        for (tolerance, cand), points in zip(jobs, found):
            key = trials.candidate_key(cand)
            self.results[key] = (cand, tolerance, points)
            if tolerance is not None and cand["epochs"] == self.settings["epochs"]:
                self.tried.setdefault(cand["family"], {})[tolerance] = key
        self.measure()

    def measure(self):
        x_one = self.context["x_val"][:1]
        for _, _, points in self.results.values():
            for p in points:
                if p["path"] not in self.latency:
                    self.latency[p["path"]] = pareto.latency(p["path"], x_one, self.context["model"])

    def new_jobs(self, jobs):
        """The jobs no trial has run yet. A tolerance that reads the same settings off the curves
        as one tried before gives the same point: it is recorded as tried, with that trial's key,
        so that its family's bracket narrows past it."""
        fresh = []
        for tolerance, cand in jobs:
            key = trials.candidate_key(cand)
            if key in self.results:
                self.tried.setdefault(cand["family"], {})[tolerance] = key
            else:
                fresh.append((tolerance, cand))
        return fresh

    def within(self, key):
        """Whether any point of the trial `key` is within the budget on both readings."""
        return any(pareto.within(p, self.baseline, self.settings["max_drop"] / 100) for p in self.results[key][2])

    def points(self):
        out = []
        for key, (cand, tolerance, points) in self.results.items():
            for p in points:
                out.append({**p, "key": key, "family": cand["family"], "tolerance": tolerance,
                            "epochs": cand["epochs"], **self.latency[p["path"]]})
        return sorted(out, key=lambda p: (p["key"], p["kind"]))


def auto_compress(model_path, x_train, y_train, out, max_drop, objective="bytes", techniques=None,
                  time_budget=None, workers=1, scheduler=None, seed=0, epochs=4, validation=0.1,
                  tolerances=TOLERANCES, refine_rounds=2, progress=True, views=True):
    """Compress the model file at `model_path` within `max_drop` points of validation accuracy.

    x_train (N, C, H, W) float32, y_train (N,) int64: the training images; a `validation`
    fraction of them is held out (seeded) for every decision, the rest retrains; with `views`,
    each held-out image is scored with its eight one-pixel translations (shifted_views), and every
    point is scored on the plain held-out images as well: a point is within `max_drop` when both
    readings are (pareto.within; without `views` the two are the same). No test images come in.
    Writes to `out`: sensitivity.json/.png, trials.jsonl, models/, front.json, front.png and
    chosen.npz. Returns the report (what front.json holds).
    """
    started = time.perf_counter()
    techniques = check_settings(max_drop, objective, techniques, workers, time_budget, epochs)
    model = check_sequential(load(model_path), "compress --auto")
    x_fit, y_fit, x_plain, y_plain = split_validation(x_train, y_train, validation, seed)
    views = check_bool(views, "views")  # a plain bool: it goes into the trial log's JSON
    x_val, y_val = shifted_views(x_plain, y_plain) if views else (x_plain, y_plain)
    settings = {"max_drop": max_drop, "objective": objective, "techniques": techniques, "seed": seed,
                "epochs": epochs, "validation": validation, "views": views, "tolerances": list(tolerances),
                "refine_rounds": refine_rounds, "images": int(len(x_train)),
                "data_sha256": _sha256(x_train, y_train)}
    os.makedirs(out, exist_ok=True)
    log = trials.TrialLog(out, trials.fingerprint(model_path, settings), settings)
    context = {"model": model, **dict(zip(CONTEXT_KEYS, (x_fit, y_fit, x_val, y_val, x_plain, y_plain)))}
    runner = trials.executor(context, workers, scheduler)  # an unreachable scheduler fails here
    try:
        table = sensitivity.analyse(model, x_fit, x_val, y_val, techniques, seed)
        sensitivity.save(table, os.path.join(out, "sensitivity.json"))
        messages = [sensitivity.plot(table, os.path.join(out, "sensitivity.png"))]
        search = Run(context, log, runner, table, settings, progress)
        _search(search, table, techniques, tolerances, refine_rounds, started, time_budget)
    finally:
        runner.close()
    return _report(search, model_path, out, messages, time.perf_counter() - started)


def _search(search, table, techniques, tolerances, refine_rounds, started, time_budget):
    epochs, max_drop = search.settings["epochs"], search.settings["max_drop"]
    kinds = families(techniques, table, search.settings["objective"])
    jobs = [(t, candidate(f, table, t, techniques, epochs, max_drop)) for f in kinds for t in tolerances]
    if table.get("binary") and "binary" not in kinds:  # one binary trial, with every unit
        jobs.append((None, candidate("binary", table, None, techniques, epochs, max_drop)))
    search.run(jobs)

    def out_of_time():
        return time_budget is not None and time.perf_counter() - started > 60 * time_budget

    for _ in range(refine_rounds):
        if out_of_time():
            return
        jobs = [(t, candidate(f, table, t, techniques, epochs, max_drop)) for f in kinds
                for t in next_tolerances(search.tried[f], {t: search.within(k) for t, k in search.tried[f].items()})]
        jobs = search.new_jobs(jobs)
        if jobs:
            search.run(jobs)
    if out_of_time():
        return
    jobs = []
    for f in kinds:
        ranked = sorted(search.tried[f])
        ok = [t for t in ranked if search.within(search.tried[f][t])]
        pair = ([max(ok)] if ok else []) + [t for t in ranked if not ok or t > max(ok)][:1]
        jobs += [(t, {**search.results[search.tried[f][t]][0], "epochs": 2 * epochs}) for t in pair]
    search.run(jobs)


def _report(search, model_path, out, messages, seconds):
    baseline = {"key": "baseline", "kind": "float32", "family": "baseline", "tolerance": None,
                "path": os.path.abspath(model_path), **search.baseline, "bytes": os.path.getsize(model_path),
                **pareto.latency(model_path, search.context["x_val"][:1])}
    points = [baseline] + search.points()
    best = pareto.front(points)
    max_drop = search.settings["max_drop"] / 100
    chosen = {o: pareto.choose(points, baseline, max_drop, o) for o in pareto.OBJECTIVES}
    objective = search.settings["objective"]
    chosen_path = os.path.join(out, "chosen.npz")
    with open(chosen[objective]["path"], "rb") as f:
        write_file(chosen_path, f.read())
    messages.append(pareto.plot(points, chosen[objective], os.path.join(out, "front.png")))
    report = {"settings": search.settings, "baseline": baseline, "points": points,
              "front": [p["key"] + "/" + p["kind"] for p in best], "chosen": chosen,
              "chosen_path": chosen_path, "seconds": seconds, "messages": [m for m in messages if m]}
    pareto.save(report, os.path.join(out, "front.json"))
    return report


def evaluate_chosen(report, x_test, y_test):
    """Test accuracy of the baseline and the chosen models: the one look at the test images, at the
    end, after every decision is taken. Returns {"baseline": a, "bytes": a, "latency": a}."""
    paths = {"baseline": report["baseline"]["path"], **{o: p["path"] for o, p in report["chosen"].items()}}
    return {name: evaluate(load(path), x_test, y_test) for name, path in paths.items()}
