"""The `minicnn` command line (also `python -m minicnn`).

    minicnn train --model lenet5 --data mnist10k --epochs 10 --out lenet5.npz
"""

import argparse
import os
import sys
import time

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


def cmd_prune(args):
    from optim import pruning, sparse  # optim builds on minicnn; imported only when used

    from .serialization import load

    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    model = sparse.to_dense(load(args.model))  # a pruned file can be pruned further
    report(f"{args.model} before pruning", model, x_test, y_test, args.model)
    if args.sensitivity:
        *_, x_val, y_val = datasets.split_validation(x_train, y_train, 0.1, args.seed)
        curves = pruning.sensitivity(model, x_val, y_val, layers=args.layers)
        print(f"\nsensitivity: validation accuracy ({len(x_val)} training images) with one layer pruned, "
              "no retraining\n" + pruning.format_sensitivity(curves))
    common = dict(iterations=args.iterations, retrain_epochs=args.retrain_epochs, lr=args.lr,
                  batch_size=args.batch_size, seed=args.seed, layers=args.layers)
    if args.method == "clip":
        if args.quality is None:
            raise ValueError("--method clip needs --quality Q (weights with |w| < Q * std(W) are removed)")
        result = pruning.prune_clip(model, x_train, y_train, args.quality, **common)
    else:
        if args.sparsity is None:
            raise ValueError("--method global needs --sparsity S (the fraction of weights to remove)")
        result = pruning.prune_global(model, x_train, y_train, args.sparsity, ends_scale=args.ends_scale, **common)
    print("\nweights removed per layer:\n" + pruning.format_sparsity(result.model, args.layers))
    pruned = sparse.to_sparse(result.model)
    if args.out:
        save(pruned, args.out)
    report(f"pruned ({args.method})", pruned, x_test, y_test, args.out)
    return 0


def cmd_compress(args):
    from optim import deep_compression  # optim builds on minicnn; imported only when used

    from .serialization import load

    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    model = load(args.model)
    before = report(f"{args.model} before compression", model, x_test, y_test, args.model)
    if args.pipeline == "deep" and args.sparsity is None:
        raise ValueError("--pipeline deep needs --sparsity S (the fraction of weights to prune)")
    sparsity = args.sparsity if args.pipeline == "deep" else 0.0
    result = deep_compression.deep_compression(
        model, x_train, y_train, sparsity, bits={"conv": args.bits_conv, "fc": args.bits_fc},
        retrain_epochs=args.retrain_epochs, finetune_epochs=args.finetune_epochs, prune_iterations=args.iterations,
        prune_lr=args.lr, finetune_lr=args.finetune_lr, batch_size=args.batch_size, init=args.init,
        ends_scale=args.ends_scale, seed=args.seed)
    if args.out:
        save(result.model, args.out)
    sizes = (os.path.getsize(args.model), os.path.getsize(args.out)) if args.out else ()
    print(f"\nsize per layer (Deep Compression, Tables 2-3), index bits {result.bits}:")
    print(deep_compression.format_table(result.model, *sizes))
    after = report(f"compressed ({args.pipeline})", result.model, x_test, y_test, args.out)
    print(f"accuracy {before:.4f} -> {after:.4f} ({100 * (after - before):+.2f} points)")
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

    p = commands.add_parser("prune", help="prune a model file, retrain, and save it sparse")
    p.add_argument("--model", required=True, help="model file (.npz) to prune")
    add_data_args(p)
    p.add_argument("--method", default="global", choices=["clip", "global"],
                   help="clip: per-layer |w| < Q std(W) (Han 2015); global: one magnitude threshold "
                        "on the cubic schedule (Zhu & Gupta 2017)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--quality", type=float, help="for clip: the threshold in standard deviations")
    amount.add_argument("--sparsity", type=float, help="for global: the fraction of weights to remove, in [0, 1)")
    p.add_argument("--iterations", type=int, default=1, help="prune-retrain rounds (clip) or pruning steps (global)")
    p.add_argument("--retrain-epochs", type=int, default=4, help="epochs of retraining in total")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate for retraining")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ends-scale", type=float, default=1.0,
                   help="for global: prune the first and last layers to this fraction of the sparsity")
    p.add_argument("--layers", nargs="+", default=None, help="layers to prune (conv1 ... fc1 ...); default all")
    p.add_argument("--sensitivity", action="store_true",
                   help="first print each layer's accuracy against its sparsity, without retraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to save the pruned, sparse model (.npz)")
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser("compress", help="Deep Compression: prune, share weights (k-means), Huffman code")
    p.add_argument("--model", required=True, help="model file (.npz) to compress")
    add_data_args(p)
    p.add_argument("--pipeline", default="deep", choices=["deep", "share"],
                   help="deep: prune -> retrain -> share -> fine-tune -> Huffman; share: weight sharing alone")
    p.add_argument("--sparsity", type=float, help="for deep: the fraction of weights to prune, in [0, 1)")
    p.add_argument("--bits-conv", type=int, default=8, help="index bits of conv layers (2**bits centroids)")
    p.add_argument("--bits-fc", type=int, default=5, help="index bits of dense layers (2**bits centroids)")
    p.add_argument("--init", default="linear", choices=["linear", "density", "random", "kmeans++"],
                   help="k-means initialisation")
    p.add_argument("--retrain-epochs", type=int, default=6, help="epochs of retraining while pruning")
    p.add_argument("--iterations", type=int, default=8, help="pruning steps on the cubic schedule")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate while pruning")
    p.add_argument("--ends-scale", type=float, default=1.0,
                   help="prune the first and last layers to this fraction of the sparsity")
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs of centroid fine-tuning")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam learning rate of the centroids")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to save the compressed model (.npz)")
    p.set_defaults(run=cmd_compress)
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
