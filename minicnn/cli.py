"""The `minicnn` command line (also `python -m minicnn`).

    minicnn train --model lenet5 --data mnist10k --epochs 10 --out lenet5.npz
    minicnn prune | quantize | distill | cut ...   (optim/commands.py)

`train` lives here; the technique commands live in optim/commands.py and
are added to the parser when it is built (optim builds on minicnn, so
minicnn imports it only then).
"""

import argparse
import os
import sys
import time

from . import datasets, zoo
from .optimizers import SGD, Adam
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


def finish(title, model, x_test, y_test, out):
    """Save `model` to `out` (if given), then `report` it; the exit status of a command."""
    if out:
        model.save(out)
    report(title, model, x_test, y_test, out)
    return 0


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
    return finish(f"{args.model} trained on {args.data}", model, x_test, y_test, args.out)


def build_parser():
    from optim.commands import add_commands

    parser = argparse.ArgumentParser(prog="minicnn", description="A small CNN from scratch, and how to make it smaller and faster.")
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

    add_commands(commands)
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
