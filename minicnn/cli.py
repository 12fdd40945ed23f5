"""The `minicnn` command line (also `python -m minicnn`).

    minicnn train --model lenet5 --data mnist10k --epochs 10 --out lenet5.npz
"""

import argparse
import os
import sys
import time

import numpy as np

from . import datasets, zoo
from .optimizers import SGD, Adam
from .serialization import save
from .training import evaluate, fit


def add_data_args(p):
    """--data and --root: which data set, and where its IDX files are."""
    p.add_argument("--data", default="mnist10k", choices=sorted(datasets.DATASETS))
    p.add_argument("--root", default=None, help="folder of IDX files for mnist / fashion-mnist")


def report(title, model, x_test, y_test, path=None):
    """Print a model's summary, its test accuracy and (if saved) its bytes on disk; return the accuracy."""
    accuracy = evaluate(model, x_test, y_test)
    print(f"\n== {title} ==")
    print(model.summary())
    size = f", {os.path.getsize(path):,} bytes on disk ({path})" if path else ""
    print(f"test accuracy {accuracy:.4f} on {len(x_test)} images{size}")
    return accuracy


def cmd_train(args):
    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    model = zoo.build(args.model, seed=args.seed)
    optimizer = Adam(args.lr) if args.optimizer == "adam" else SGD(args.lr, momentum=args.momentum)
    print(f"training {args.model} on {args.data}: {len(x_train)} images, "
          f"{args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr {args.lr}")
    start = time.perf_counter()
    fit(model, x_train, y_train, epochs=args.epochs, batch_size=args.batch_size,
        optimizer=optimizer, seed=args.seed)
    elapsed = time.perf_counter() - start
    print(f"trained in {elapsed:.1f} s ({args.epochs * len(x_train) / elapsed:.0f} samples/s)")
    if args.out:
        save(model, args.out)
    report(f"{args.model} trained on {args.data}", model, x_test, y_test, args.out)
    return 0


def cmd_quantize_int8(args):
    """Post-training int8 quantization (or QAT with --qat-epochs) of a saved model."""
    from optim import quantization  # minicnn never imports optim at module level

    from .serialization import load

    quantization.check_bits(args.bits)
    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    model = load(args.model)
    report(f"float model {args.model}", model, x_test, y_test, args.model)
    x_cal = x_train[np.random.default_rng(args.seed).permutation(len(x_train))[: args.calibration]]
    print(f"\ncalibrating on {len(x_cal)} training images ({args.method}), "
          f"{'per-channel' if args.per_channel else 'per-tensor'} weights")
    if args.qat_epochs:
        qmodel = quantization.quantization_aware_training(
            model, x_train, y_train, epochs=args.qat_epochs, per_channel=args.per_channel, seed=args.seed,
            calibration_size=args.calibration)
    else:
        qmodel = quantization.quantize_model(model, x_cal, per_channel=args.per_channel, method=args.method,
                                             percentile=args.percentile)
    print(quantization.format_ranges(qmodel.ranges))
    qmodel.save(args.out)
    report(f"int8 model {args.out}", qmodel, x_test, y_test, args.out)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="minicnn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="train a zoo model and save it")
    p.add_argument("--model", default="lenet5", choices=sorted(zoo.MODELS))
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9, help="for sgd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to save the trained model (.npz)")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("quantize", help="quantize a saved model to int8 (integer-only inference)")
    p.add_argument("--model", required=True, help="a float model file (.npz)")
    add_data_args(p)
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--per-channel", action="store_true", help="one weight scale per output channel")
    p.add_argument("--calibration", type=int, default=1000, help="training images used to calibrate")
    p.add_argument("--method", default="minmax", choices=["minmax", "ema", "percentile"])
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--qat-epochs", type=int, default=0, help="quantization-aware fine-tuning epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to save the int8 model (.npz)")
    p.set_defaults(run=cmd_quantize_int8)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"minicnn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
