"""The command line, run in-process and as `python -m optim.app`."""

import subprocess
import sys

import numpy as np

import minicnn
from optim.app.cli import main


def test_train_prints_summary_and_saves(tmp_path, capsys):
    out = tmp_path / "mlp.npz"
    assert main(["train", "--model", "lenet300", "--epochs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Total" in text and "test accuracy" in text
    accuracy = float(text.split("test accuracy ")[1].split()[0])
    x, y = minicnn.datasets.load()[2:]
    assert abs(minicnn.evaluate(minicnn.load(out), x, y) - accuracy) <= 5e-5  # printed with 4 decimals


def test_hold_out_trains_without_the_split_compress_auto_decides_on(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("optim.app.commands.fit", lambda model, x, y, **kw: seen.append(x))
    assert main(["train", "--model", "lenet300", "--epochs", "1", "--hold-out", "0.25", "--seed", "3"]) == 0
    x, y = minicnn.datasets.load()[:2]
    x_fit = minicnn.datasets.split_validation(x, y, 0.25, 3)[0]
    assert len(seen) == 1 and np.array_equal(seen[0], x_fit)
    assert "holding out 2000 training images" in capsys.readouterr().out


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["train", "--model", "lenet300", "--epochs", "1", "--data", "mnist", "--root", str(tmp_path / "none")]) == 2
    assert "error" in capsys.readouterr().err


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "optim.app", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout
