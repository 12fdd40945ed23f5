"""The `minicnn` command line (also `python -m minicnn`).

    minicnn train --model lenet5 --data mnist10k --epochs 10 --out lenet5.npz
    minicnn quantize --model lenet5.npz --bits 1 --retrain-epochs 5 --out lenet5-bin.npz
"""

import argparse
import os
import sys
import time

from . import datasets, zoo
from .optimizers import SGD, Adam
from .serialization import load, save
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


def cmd_quantize_binary(args):
    """--bits 1: binarize the middle weight layers (optim/binary.py), retrain with the STE, pack to bits."""
    from optim.binary import binarize, clip_latent, pack  # optim builds on minicnn: imported only when used

    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    model = load(args.model)
    report(f"float model {args.model}", model, x_test, y_test, args.model)
    binary = binarize(model, binary_activations=args.binary_activations)
    names = [f"{i}: {type(layer).__name__}" for i, layer in enumerate(binary.layers) if layer.kind.startswith("binary")]
    print(f"\nbinarized {', '.join(names)} ({'binary' if args.binary_activations else 'real'} activations); "
          f"first and last weight layers stay float32. Retraining {args.retrain_epochs} epochs, "
          f"adam lr {args.lr}, latent weights clipped to [-1, 1]")
    fit(binary, x_train, y_train, epochs=args.retrain_epochs, batch_size=args.batch_size,
        optimizer=Adam(args.lr), seed=args.seed, constraint=clip_latent)
    packed = pack(binary)
    save(packed, args.out)
    report("binary model, weights packed one bit each", packed, x_test, y_test, args.out)
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

    p = commands.add_parser("quantize", help="quantize a saved model (--bits 1: binary weights)")
    p.add_argument("--model", required=True, help="a float model file (.npz)")
    p.add_argument("--bits", type=int, required=True, choices=[1])
    p.add_argument("--retrain-epochs", type=int, default=5, help="epochs of training with binary weights")
    p.add_argument("--binary-activations", action="store_true", help="binarize the middle layers' inputs too (XNOR)")
    add_data_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to save the packed model (.npz)")
    p.set_defaults(run=cmd_quantize_binary)
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
