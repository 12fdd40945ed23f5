"""`minicnn demo`: the quick run end to end, its report, its artifacts, and its bad inputs."""

import json
import os
import sys

import numpy as np
import pytest

import minicnn
import optim.app
from optim.app.cli import main
from optim.app import demo, report

KEYS = {"technique", "model", "accuracy", "delta_points", "params", "nonzero", "bits_per_weight", "bytes",
        "compression", "latency_ms_b1", "throughput_b256", "settings", "artifact"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    with open(out / "report.json") as f:
        return out, json.load(f)


def test_report_has_every_row_with_every_field(quick_run):
    out, result = quick_run
    assert result["dataset"] == "mnist10k"
    assert set(result["baseline"]) == set(demo.NETWORKS)
    pairs = [(r["model"], r["technique"]) for r in result["results"]]
    assert pairs == [(n, t) for n in demo.NETWORKS for t in demo.TECHNIQUES]
    for row in result["results"]:
        assert KEYS <= set(row), KEYS - set(row)
        base = result["baseline"][row["model"]]
        assert row["delta_points"] == pytest.approx(100 * (row["accuracy"] - base["accuracy"]))
        assert row["compression"] == pytest.approx(base["bytes"] / row["bytes"])
        assert row["bytes"] == os.path.getsize(out / row["artifact"])
        assert 0 < row["latency_ms_b1"] and 0 < row["throughput_b256"]
        assert 0 < row["nonzero"] <= row["params"] and row["bits_per_weight"] > 0


def test_every_artifact_loads_and_predicts_with_the_reported_accuracy(quick_run):
    out, result = quick_run
    x, y = minicnn.datasets.load("mnist10k")[2:]
    for row in [*result["baseline"].values(), *result["results"]]:
        model = minicnn.load(out / row["artifact"])
        logits = model.predict(x)
        assert logits.shape == (len(x), 10) and np.isfinite(logits).all()
        assert float((logits.argmax(axis=1) == y).mean()) == row["accuracy"], row["artifact"]


def test_the_techniques_really_change_the_artifacts(quick_run):
    """Whatever the few epochs of --quick give in accuracy, each technique's mechanism shows in the file."""
    _, result = quick_run
    for name, base in result["baseline"].items():
        rows = {r["technique"]: r for r in result["results"] if r["model"] == name}
        assert rows["weight sharing"]["bits_per_weight"] < 8
        assert rows["int8 quantization"]["bits_per_weight"] < 9
        assert rows["binarization"]["bytes"] < base["bytes"] / 10
        for technique in ("weight clipping", "model pruning", "deep compression"):
            assert rows[technique]["nonzero"] < 0.5 * base["params"], technique
        for technique in ("network pruning", "knowledge distillation", "model cutting"):
            assert rows[technique]["params"] < base["params"], technique
        assert rows["deep compression"]["compression"] > rows["model pruning"]["compression"]


def test_the_automatic_row_is_the_searchs_choice_from_a_held_out_base(quick_run):
    out, result = quick_run
    for name in demo.NETWORKS:
        row = next(r for r in result["results"] if r["model"] == name and r["technique"] == "automatic compression")
        with open(out / f"baseline-{name}-heldout-quick-mnist10k-auto" / "front.json") as f:
            front = json.load(f)
        with open(front["chosen_path"], "rb") as f:
            assert (out / row["artifact"]).read_bytes() == f.read()
        assert front["baseline"]["path"].endswith(f"baseline-{name}-heldout-quick-mnist10k.npz")
        assert row["settings"]["trials"] == len({p["key"] for p in front["points"]}) - 1 >= 4


def test_markdown_report_and_plots(quick_run):
    out, result = quick_run
    text = (out / "report.md").read_text()
    assert report.markdown_table(result) in text
    for row in result["results"]:
        assert f"`{row['artifact']}`" in text
    if "plots skipped" in text:
        pytest.importorskip("matplotlib")  # then plots should have been drawn: fail below
    for name in ("tradeoff.png", "weights.png", "masks.png", "sensitivity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in text
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]


def test_cached_baselines_are_reused(quick_run, tmp_path, monkeypatch, capsys):
    out, result = quick_run
    for name in demo.NETWORKS:
        cached = f"baseline-{name}-quick-mnist10k.npz"
        (tmp_path / cached).write_bytes((out / cached).read_bytes())

    def no_training(*args, **kwargs):
        raise AssertionError("a cached baseline was trained again")

    monkeypatch.setattr(demo, "fit", no_training)
    again = demo.run("mnist10k", str(tmp_path), quick=True, techniques=(), plots=False)
    assert "reusing the trained" in capsys.readouterr().out
    for name, base in result["baseline"].items():
        assert again["baseline"][name]["accuracy"] == base["accuracy"]
    assert "(plots skipped: --no-plots)" in (tmp_path / "report.md").read_text()


def test_readme_table_is_replaced_between_the_markers(tmp_path, quick_run):
    _, result = quick_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{report.README_BEGIN}\nold table\n{report.README_END}\n\nmore\n")
    report.update_readme(readme, result)
    text = readme.read_text()
    assert "old table" not in text and report.markdown_table(result) in text and text.endswith("\n\nmore\n")
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        report.update_readme(readme, result)


# --------------------------------------------------------------------------
# Bad input, and nothing half-written


def test_unknown_data_set_network_or_technique(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'cifar'"):
        demo.run("cifar", str(tmp_path))
    with pytest.raises(ValueError, match="unknown network 'vgg'"):
        demo.run("mnist10k", str(tmp_path), networks=("vgg",))
    with pytest.raises(ValueError, match="unknown technique 'magic'"):
        demo.run("mnist10k", str(tmp_path), techniques=("magic",))


def test_output_folder_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_cached_model_of_another_architecture(tmp_path):
    minicnn.zoo.seed_cnn().save(tmp_path / "baseline-lenet5-quick-mnist10k.npz")
    with pytest.raises(ValueError, match="another architecture than lenet5"):
        demo.run("mnist10k", str(tmp_path), quick=True, networks=("lenet5",), techniques=())


def test_an_interrupted_demo_leaves_no_report(tmp_path, monkeypatch):
    minicnn.zoo.seed_cnn().save(tmp_path / "baseline-seed_cnn-quick-mnist10k.npz")  # untrained: fast

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(demo.APPLY, "int8 quantization", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.run("mnist10k", str(tmp_path), quick=True, networks=("seed_cnn",),
                 techniques=("weight sharing", "int8 quantization"), plots=False)
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "report.md").exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_without_matplotlib_the_plots_are_skipped(tmp_path, monkeypatch, capsys):
    minicnn.zoo.seed_cnn().save(tmp_path / "baseline-seed_cnn-quick-mnist10k.npz")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.delitem(sys.modules, "matplotlib.figure", raising=False)
    monkeypatch.delitem(sys.modules, "optim.app.plots", raising=False)
    monkeypatch.delattr(optim.app, "plots", raising=False)  # else `from . import plots` finds it there
    demo.run("mnist10k", str(tmp_path), quick=True, networks=("seed_cnn",), techniques=("int8 quantization",))
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out
    assert "(plots skipped: matplotlib is not installed)" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))
