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


def cmd_distill(args):
    import json

    from optim import distillation

    from .atomic import atomic_path
    from .serialization import load

    data = datasets.load(args.data, root=args.root)
    x_train, y_train, x_test, y_test = data
    teacher = load(args.teacher)
    report(f"teacher {args.teacher}", teacher, x_test, y_test)

    def build_student(seed):
        return zoo.build(args.student, seed=seed)

    student = build_student(args.seed)
    report(f"{args.student} before distillation", student, x_test, y_test)
    recipe = (f"T {args.temperature}, alpha {args.alpha}, {args.epochs} epochs, batch {args.batch_size}, "
              f"adam lr {args.lr}")
    start, cpu_start = time.perf_counter(), time.process_time()
    if args.compare:
        if args.validation:
            # Tuning: report on training images held out of the transfer set, never on the test set.
            data = datasets.split_validation(x_train, y_train, args.validation)
            print(f"\nreporting on a validation split of {len(data[2])} training images, not on the test set")
        seeds = list(range(args.seed, args.seed + args.seeds))
        print(f"\n{args.student} from scratch and distilled, seeds {seeds}, sweep T in {args.temperatures}; {recipe}")
        result = distillation.compare(teacher, build_student, data, seeds, args.temperature, args.alpha,
                                      args.temperatures, args.epochs, args.batch_size, args.lr)
        result["settings"].update(student=args.student, teacher=args.teacher, data=args.data,
                                  reported_on="validation" if args.validation else "test")
        result["seconds"] = time.perf_counter() - start
        result["cpu_seconds"] = time.process_time() - cpu_start  # all threads; steadier on a shared machine
        print(distillation.format_comparison(result))
        if args.json:
            with atomic_path(args.json) as tmp:
                with open(tmp, "w") as f:
                    json.dump(result, f, indent=2)
            print(f"wrote {args.json}")
        return 0
    if args.omit_class is not None:
        print(f"\ndistilling {args.student} without any {args.omit_class} in the transfer set; {recipe}")
        student, result = distillation.omitted_class(
            teacher, build_student, data, args.omit_class, args.temperature, args.alpha, args.epochs,
            args.batch_size, args.lr, args.seed)
        print(distillation.format_omitted_class(result))
    else:
        print(f"\ndistilling into {args.student} on {len(x_train)} images; {recipe}")
        student = distillation.distill(teacher, student, x_train, y_train, args.temperature, args.alpha,
                                       args.epochs, args.batch_size, Adam(args.lr), args.seed, in_place=True)
    print(f"done in {time.perf_counter() - start:.1f} s")
    if args.out:
        save(student, args.out)
    report(f"{args.student} distilled from {args.teacher}", student, x_test, y_test, args.out)
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

    p = commands.add_parser("distill", help="train a small student on a teacher's soft targets (Hinton et al. 2015)")
    p.add_argument("--teacher", required=True, help="the teacher model file (.npz)")
    p.add_argument("--student", default="small_mlp", choices=sorted(zoo.MODELS))
    add_data_args(p)
    p.add_argument("--temperature", type=float, default=8.0)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft targets, in [0, 1]")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to save the distilled student (.npz); not with --compare")
    p.add_argument("--compare", action="store_true",
                   help="train the student from scratch and distilled over several seeds, with a temperature sweep")
    p.add_argument("--seeds", type=int, default=3, help="with --compare: seeds seed, seed+1, ...")
    p.add_argument("--temperatures", type=lambda s: [float(t) for t in s.split(",")], default=[1, 2, 4, 8, 20],
                   help="with --compare: the sweep, comma-separated")
    p.add_argument("--json", default=None, help="with --compare: write the results here")
    p.add_argument("--validation", type=float, default=None,
                   help="with --compare: report on this fraction of the training images, held out (for tuning)")
    p.add_argument("--omit-class", type=int, default=None,
                   help="distill without this class in the transfer set, report the student's accuracy on it")
    p.set_defaults(run=cmd_distill)

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
