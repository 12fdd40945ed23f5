"""optim.auto: the automatic search on a tiny model (12x12 digits, a few hundred images)."""

import hashlib
import json
import os

import numpy as np
import pytest

import minicnn
from minicnn import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential
from optim import auto
from optim.auto import pareto, search, sensitivity, trials

FAST = dict(epochs=1, tolerances=(1.0, 8.0), refine_rounds=1, progress=False,
            techniques=["prune", "share", "int8", "binary"])


def _small_digits():
    """600 training and 200 test digits, average-pooled 28 -> 14 and cropped to 12x12."""
    x_train, y_train, x_test, y_test = minicnn.datasets.load("mnist10k")

    def shrink(x):
        return np.ascontiguousarray(x.reshape(-1, 1, 14, 2, 14, 2).mean(axis=(3, 5))[:, :, 1:13, 1:13])

    return shrink(x_train[:600]), y_train[:600], shrink(x_test[:200]), y_test[:200]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    x, y, x_test, y_test = _small_digits()
    rng = np.random.default_rng(0)
    model = Sequential([Conv2D(1, 6, 3, rng=rng), ReLU(), MaxPool2D(2), Flatten(),
                        Dense(6 * 5 * 5, 32, rng=rng), ReLU(), Dense(32, 10, rng=rng)], input_shape=(1, 12, 12))
    minicnn.fit(model, x, y, epochs=4, batch_size=32, optimizer=minicnn.Adam(3e-3), verbose=False)
    path = str(folder / "tiny.npz")
    model.save(path)
    return folder, path, x, y, x_test, y_test


@pytest.fixture(scope="module")
def first_run(setup):
    folder, path, x, y, _, _ = setup
    return auto.auto_compress(path, x, y, str(folder / "run1"), max_drop=1.0, workers=1, **FAST)


def _outcome(report):
    """What must not depend on the executor: the trials' points and the choice by bytes."""
    return ([(p["key"], p["kind"], p["val_accuracy"], p["bytes"]) for p in report["points"]],
            report["chosen"]["bytes"]["key"], report["chosen"]["bytes"]["kind"])


def test_front_has_no_dominated_point_and_every_point_loads(first_run):
    points = first_run["points"]
    best = [p for p in points if p["key"] + "/" + p["kind"] in first_run["front"]]
    assert best and all(not pareto.dominates(q, p) for p in best for q in points)
    assert all(any(pareto.dominates(q, p) for q in points) for p in points if p not in best)
    for p in points:
        minicnn.load(p["path"])
    assert os.path.exists(first_run["chosen_path"])
    with open(os.path.join(os.path.dirname(first_run["chosen_path"]), "sensitivity.json")) as f:
        assert set(json.load(f)) >= {"baseline", "sparsity", "bits", "int8", "binary"}
    for plot in ("sensitivity.png", "front.png"):  # PNGs, written whole
        with open(os.path.join(os.path.dirname(first_run["chosen_path"]), plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_chosen_model_respects_max_drop_on_both_validation_readings(first_run):
    baseline = first_run["baseline"]
    for objective, chosen in first_run["chosen"].items():
        for reading in ("val_accuracy", "plain_accuracy"):
            assert chosen[reading] >= baseline[reading] - 0.01 - 1e-12
        within = [p for p in first_run["points"] if pareto.within(p, baseline, 0.01)]
        if objective == "bytes":
            assert chosen["bytes"] == min(p["bytes"] for p in within)
        else:
            assert chosen["speedup"] == max(p["speedup"] for p in within)
    assert first_run["chosen"]["bytes"]["bytes"] < first_run["baseline"]["bytes"]


@pytest.mark.parametrize("views", [True, False])
def test_decisions_see_validation_images_only(setup, monkeypatch, tmp_path, views):
    _, path, x, y, _, _ = setup
    _, _, x_val, _ = minicnn.datasets.split_validation(x, y, 0.1, 0)
    seen = set()
    for module in (search, sensitivity, trials.recipe, pareto):
        if hasattr(module, "evaluate"):
            real = module.evaluate

            def spy(model, xs, ys, *args, real=real, **kwargs):
                seen.add(hashlib.sha256(np.ascontiguousarray(xs).tobytes()).hexdigest())
                return real(model, xs, ys, *args, **kwargs)

            monkeypatch.setattr(module, "evaluate", spy)
    for module in (sensitivity.pruning, sensitivity.structured):
        monkeypatch.setattr(module, "evaluate", spy)
    auto.auto_compress(path, x, y, str(tmp_path / "run"), max_drop=1.0, workers=1, views=views, **FAST)
    read = [x_val]
    if views:  # each image with its eight translations, and each point on the images alone too
        read.append(minicnn.datasets.shifted_views(x_val, np.zeros(len(x_val), np.int64))[0])
    assert seen == {hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest() for x in read}


def test_resume_skips_finished_trials(setup, first_run, monkeypatch):
    folder, path, x, y, _, _ = setup
    calls = []
    real = trials.recipe.run
    monkeypatch.setattr(trials.recipe, "run", lambda *a: calls.append(a) or real(*a))
    again = auto.auto_compress(path, x, y, str(folder / "run1"), max_drop=1.0, workers=1, **FAST)
    assert calls == []
    assert _outcome(again) == _outcome(first_run)


def test_foreign_log_is_refused(setup, first_run):
    folder, path, x, y, _, _ = setup
    other = minicnn.load(path)
    other.layers[0].params["b"] += 1
    other_path = str(folder / "other.npz")
    other.save(other_path)
    with pytest.raises(ValueError, match="another model file or other settings"):
        auto.auto_compress(other_path, x, y, str(folder / "run1"), max_drop=1.0, **FAST)
    for other_settings in ({"max_drop": 0.5}, {"max_drop": 1.0, "views": False}):
        with pytest.raises(ValueError, match="another model file or other settings"):
            auto.auto_compress(path, x, y, str(folder / "run1"), **other_settings, **FAST)


def test_log_from_another_code_version_is_refused(tmp_path, monkeypatch):
    path = str(tmp_path / "m.npz")
    Sequential([Flatten(), Dense(4, 2, rng=0)], input_shape=(1, 2, 2)).save(path)
    settings = {"max_drop": 1.0}
    first = trials.fingerprint(path, settings)
    trials.TrialLog(str(tmp_path / "run"), first, settings)
    monkeypatch.setattr(trials, "__version__", "99.0")
    assert trials.fingerprint(path, settings) != first
    with pytest.raises(ValueError, match=rf"written by minicnn {minicnn.__version__}, not by this minicnn 99.0"):
        trials.TrialLog(str(tmp_path / "run"), trials.fingerprint(path, settings), settings)
    with open(tmp_path / "run" / "trials.jsonl", "w") as f:  # a log from before logs recorded the version
        f.write(json.dumps({"fingerprint": first, "settings": settings}) + "\n")
    with pytest.raises(ValueError, match="an older minicnn \\(no version recorded\\)"):
        trials.TrialLog(str(tmp_path / "run"), trials.fingerprint(path, settings), settings)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_drop": -0.1}, "max_drop"), ({"max_drop": float("nan")}, "max_drop"),
    ({"max_drop": float("inf")}, "max_drop"), ({"max_drop": 1, "techniques": ["prune", "magic"]}, "magic"),
    ({"max_drop": 1, "objective": "joules"}, "objective"), ({"max_drop": 1, "workers": 0}, "workers"),
])
def test_bad_inputs(setup, tmp_path, kwargs, message):
    _, path, x, y, _, _ = setup
    with pytest.raises(ValueError, match=message):
        auto.auto_compress(path, x, y, str(tmp_path / "bad"), **kwargs)


def test_pool_workers_get_their_share_of_blas_threads(monkeypatch):
    monkeypatch.delenv(trials.BLAS_THREADS, raising=False)
    pool = trials.LocalExecutor({}, workers=2)
    try:
        seen = pool.pool.submit(os.getenv, trials.BLAS_THREADS).result()
    finally:
        pool.close()
    assert seen == str(max(1, os.cpu_count() // 2))
    assert trials.BLAS_THREADS not in os.environ  # put back: the driver's own setting is untouched


def test_a_blas_thread_count_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv(trials.BLAS_THREADS, "3")
    pool = trials.LocalExecutor({}, workers=2)
    try:
        seen = pool.pool.submit(os.getenv, trials.BLAS_THREADS).result()
    finally:
        pool.close()
    assert seen == "3" and os.environ[trials.BLAS_THREADS] == "3"


def test_unreachable_scheduler_names_its_address(setup, tmp_path):
    _, path, x, y, _, _ = setup
    pytest.importorskip("distributed", reason="dask[distributed] is not installed (the `dask` extra)")
    with pytest.raises(ValueError, match="127.0.0.1:1"):
        auto.auto_compress(path, x, y, str(tmp_path / "run"), max_drop=1, scheduler="tcp://127.0.0.1:1", **FAST)


def test_same_result_on_a_process_pool_and_on_dask(setup, first_run, tmp_path):
    _, path, x, y, _, _ = setup
    pooled = auto.auto_compress(path, x, y, str(tmp_path / "pool"), max_drop=1.0, workers=2, **FAST)
    assert _outcome(pooled) == _outcome(first_run)
    distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed (the `dask` extra)")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        on_dask = auto.auto_compress(path, x, y, str(tmp_path / "dask"), max_drop=1.0,
                                     scheduler=cluster.scheduler_address, **FAST)
    assert _outcome(on_dask) == _outcome(first_run)


def test_test_images_are_looked_at_once_at_the_end(setup, first_run):
    *_, x_test, y_test = setup
    accuracies = auto.evaluate_chosen(first_run, x_test, y_test)
    assert set(accuracies) == {"baseline", "bytes", "latency"}
    assert all(0 <= a <= 1 for a in accuracies.values())


def _trial_context(path, x, y):
    """A trial's context as auto_compress builds it without the views: the plain images decide."""
    x_fit, y_fit, x_val, y_val = minicnn.datasets.split_validation(x, y, 0.1, 0)
    arrays = (x_fit, y_fit, x_val, y_val, x_val, y_val)
    return {"model": minicnn.load(path), **dict(zip(search.CONTEXT_KEYS, arrays))}


def test_filters_family_makes_a_narrower_model_that_loads(setup, tmp_path):
    _, path, x, y, _, _ = setup
    context = _trial_context(path, x, y)
    cand = {"family": "filters", "epochs": 1, "sparsity": {"conv1": 0.5, "fc1": 0.8, "fc2": 0.0},
            "bits_tolerance": 0.01, "filters": {"conv1": 0.5, "fc1": 0.25},
            "share": True, "int8": True}
    points = trials.recipe.run(cand, context, 0)
    assert [p["kind"] for p in points] == ["sparse", "shared", "int8"]
    file = tmp_path / "narrow.npz"
    file.write_bytes(points[0]["file"])
    narrow = minicnn.load(str(file))
    assert narrow.output_shapes()[0][0] == 3 and points[0]["bytes"] < os.path.getsize(path)


def test_binary_family_removes_units_then_binarizes_and_shares_the_float_layers(setup, tmp_path):
    _, path, x, y, _, _ = setup
    context = _trial_context(path, x, y)
    cand = {"family": "binary", "epochs": 1, "filters": {"conv1": 0.5}, "bits_tolerance": 0.01, "share": True}
    points = trials.recipe.run(cand, context, 0)
    assert [p["kind"] for p in points] == ["binary", "binary-shared"]
    assert set(points[1]["bits"]) == {"conv1", "fc2"}  # the float layers, by their names in the model
    for p in points:
        file = tmp_path / f"{p['kind']}.npz"
        file.write_bytes(p["file"])
        kinds = [layer.kind for layer in minicnn.load(str(file)).layers]
        assert kinds.count("packed_binary_dense") == 1 and p["bytes"] < os.path.getsize(path) / 4


def test_binary_layers_are_the_middle_ones_or_the_larger_of_two():
    rng = np.random.default_rng(0)
    three = Sequential([Conv2D(1, 4, 3, rng=rng), ReLU(), Flatten(), Dense(400, 20, rng=rng), ReLU(),
                        Dense(20, 10, rng=rng)], input_shape=(1, 12, 12))
    two = Sequential([Conv2D(1, 4, 3, rng=rng), ReLU(), Flatten(), Dense(400, 10, rng=rng)], input_shape=(1, 12, 12))
    one = Sequential([Flatten(), Dense(144, 10, rng=rng)], input_shape=(1, 12, 12))
    assert sensitivity.binary_layers(three) == [3]
    assert sensitivity.binary_layers(two) == [3]
    assert sensitivity.binary_layers(one) == []


@pytest.mark.parametrize("tolerance", [0.0, 0.02, 1.0])
def test_fewest_bits_is_the_bits_curve_read_from_its_low_end(setup, tolerance):
    _, path, x, y, _, _ = setup
    model = minicnn.load(path)
    base = minicnn.evaluate(model, x[:200], y[:200])
    curves = sensitivity.bits_sensitivity(model, x[:200], y[:200], seed=3)
    expected = {name: min((b for b, a in curve if base - a <= tolerance), default=8) for name, curve in curves.items()}
    assert sensitivity.fewest_bits(model, tolerance, x[:200], y[:200], seed=3) == expected


def test_each_family_asks_for_what_it_runs():
    table = {"baseline": 0.9, "layers": ["conv1", "fc1", "fc2"], "weights": {"conv1": 50, "fc1": 800, "fc2": 80},
             "sparsity": {n: [[0.5, 0.9], [0.9, 0.8]] for n in ("conv1", "fc1", "fc2")},
             "filters": {n: [[0.25, 0.9], [0.75, 0.7]] for n in ("conv1", "fc1")}, "binary": {"fc1": 0.5}}
    techniques = list(search.TECHNIQUES)
    assert search.families(techniques, table, "bytes") == ["prune", "filters", "binary"]
    assert search.families(techniques, table, "latency") == ["prune", "filters", "narrow", "binary"]
    narrow = search.candidate("narrow", table, 10.0, techniques, 4, 0.3)
    assert set(narrow["sparsity"].values()) == {0.0} and narrow["filters"]["conv1"] > 0
    wide = search.candidate("filters", table, 10.0, techniques, 4, 0.3)
    assert wide["filters"] == narrow["filters"] and wide["sparsity"]["fc1"] > 0
    binary = search.candidate("binary", table, 10.0, techniques, 4, 0.3)
    assert binary["filters"] == narrow["filters"] and "sparsity" not in binary and binary["share"]
    assert search.candidate("binary", table, None, techniques, 4, 0.3)["filters"] == {}


def test_layers_are_pruned_as_far_as_their_share_of_the_weights_allows():
    """The same curve in every layer: the largest layer reads it at the tolerance, the others at
    the tolerance times their weights over the largest's; units are removed at the tolerance."""
    curve = [[0.5, 0.99], [0.9, 0.59]]  # 1 point at 0.5, 41 at 0.9
    table = {"baseline": 1.0, "layers": ["conv1", "fc1", "fc2"], "weights": {"conv1": 100, "fc1": 10000, "fc2": 2500},
             "sparsity": {n: curve for n in ("conv1", "fc1", "fc2")}, "filters": {"conv1": curve}}
    chosen = sensitivity.settings_within(table, 0.21)
    # tolerances 21, 5.25 and 0.21 points, each read between the grid points (from 0 at sparsity 0)
    assert chosen["sparsity"] == {"fc1": 0.7, "fc2": 0.542, "conv1": 0.105}
    assert chosen["filters"] == {"conv1": 0.7}


def test_cli_prints_one_line_on_bad_input(setup, tmp_path, capsys):
    from optim.app.cli import main

    _, path, *_ = setup
    assert main(["compress", "--auto", "--model", path, "--max-drop", "nan", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_drop" in err[0]
    assert main(["compress", "--auto", "--model", path, "--validation", "1.5", "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "validation fraction must be in (0, 1), got 1.5" in err[0]


def test_cli_plain_validation_turns_the_views_off(setup, tmp_path, monkeypatch, capsys):
    from optim.app.cli import main

    asked = {}

    def stop(*args, **kwargs):
        asked.update(kwargs)
        raise ValueError("stopped")

    monkeypatch.setattr(auto, "auto_compress", stop)
    _, path, *_ = setup
    for flags, views in (([], True), (["--plain-validation"], False)):
        assert main(["compress", "--auto", "--model", path, "--out", str(tmp_path), *flags]) == 2
        assert asked["views"] is views and "stopped" in capsys.readouterr().err


def test_front_and_choice_on_made_up_points():
    pts = [{"val_accuracy": a, "plain_accuracy": a, "bytes": b, "speedup": 1 / t, "key": str(i), "kind": "k"}
           for i, (a, b, t) in enumerate([(0.99, 100, 1.0), (0.98, 50, 1.0), (0.98, 60, 1.0), (0.97, 50, 0.5),
                                          (0.99, 100, 2.0)])]
    base = {"val_accuracy": 0.99, "plain_accuracy": 0.99}
    assert [p["key"] for p in auto.front(pts)] == ["1", "3", "0"]  # by bytes, then higher accuracy
    assert auto.choose(pts, base, 0.01)["key"] == "1"
    assert auto.choose(pts, base, 0.01, "latency")["key"] == "0"  # a tie on latency: higher accuracy
    assert auto.choose(pts, base, 0.02, "latency")["key"] == "3"
    pts[1]["plain_accuracy"] = 0.97  # within on the views, not on the plain images: out of the budget
    assert auto.choose(pts, base, 0.01)["key"] == "2"
    assert auto.choose(pts, {**base, "plain_accuracy": 0.98}, 0.01)["key"] == "1"


def test_tolerance_reads_settings_between_grid_points():
    curve = [(0.5, 0.99), (0.7, 0.98), (0.9, 0.90)]
    assert sensitivity.largest_within(curve, 0.99, 0.0) == 0.5
    assert sensitivity.largest_within(curve, 0.99, 0.01) == 0.7
    assert sensitivity.largest_within(curve, 0.99, 0.05) == 0.8
    assert sensitivity.largest_within(curve, 0.99, 0.5) == 0.9
    assert search.next_tolerances([1.0, 2.0, 4.0], {1.0: True, 2.0: False, 4.0: False}) == pytest.approx(
        [2 ** (1 / 3), 2 ** (2 / 3)])


def test_cli_prints_both_validation_readings_and_test_of_the_chosen(setup, first_run, tmp_path, monkeypatch,
                                                                      capsys):
    from optim.app.cli import main

    tested = {"baseline": 0.9, "bytes": 0.89, "latency": 0.91}
    monkeypatch.setattr(auto, "auto_compress", lambda *args, **kwargs: dict(first_run))
    monkeypatch.setattr(auto, "evaluate_chosen", lambda report, x, y: tested)
    _, path, *_ = setup
    assert main(["compress", "--auto", "--model", path, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    chosen, base = first_run["chosen"]["bytes"], first_run["baseline"]
    drop = 100 * (chosen["plain_accuracy"] - base["plain_accuracy"])
    assert f"validation (shifted views) {chosen['val_accuracy']:.4f}" in out
    assert f"plain {chosen['plain_accuracy']:.4f} ({drop:+.2f} points), test 0.8900 (-1.00 points)" in out
    with open(tmp_path / "front.json") as f:
        assert json.load(f)["test_accuracy"] == tested
