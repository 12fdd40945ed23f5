"""The subcommands of the `minicnn` command line, and their options.

`train` trains a zoo network; each technique command loads a model file,
prints its summary and test accuracy, applies one technique (with progress
bars from `minicnn.fit`), and prints the summary and accuracy again, with the
bytes of the saved file; `demo` runs them all (demo.py).
"""

import argparse
import json
import os
import time

import numpy as np

from minicnn import datasets, zoo
from minicnn.atomic import write_file
from minicnn.layers import weight_layers
from minicnn.optimizers import SGD, Adam
from minicnn.serialization import load
from minicnn.training import evaluate, fit

from .. import binary, cutting, deep_compression, distillation, pruning, quantization, sharing, sparse, structured
from . import demo
from .report import update_readme


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
    if args.hold_out is not None:  # the split compress --auto --validation F --seed S decides on: never trained on
        x_train, y_train, x_val, y_val = datasets.split_validation(x_train, y_train, args.hold_out, args.seed)
        print(f"holding out {len(x_val)} training images (--hold-out {args.hold_out}, seed {args.seed})")
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


def _finetune_data(args):
    """(x_fit, y_fit, x_val, y_val, x_test, y_test): decisions on validation, report on test."""
    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    return (*datasets.split_validation(x_train, y_train, 0.1, args.seed), x_test, y_test)


def cmd_distill(args):
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
            write_file(args.json, json.dumps(result, indent=2))
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
    return finish(f"{args.student} distilled from {args.teacher}", student, x_test, y_test, args.out)


def cmd_quantize(args):
    """--bits 8: int8 integer-only inference; --bits 1: binary weights (and activations)."""
    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    model = load(args.model)
    report(f"float model {args.model}", model, x_test, y_test, args.model)
    if args.bits == 8:
        x_cal = x_train[np.random.default_rng(args.seed).permutation(len(x_train))[: args.calibration]]
        print(f"\ncalibrating on {len(x_cal)} training images ({args.method}), "
              f"{'per-channel' if args.per_channel else 'per-tensor'} weights")
        if args.qat_epochs:
            small = quantization.quantization_aware_training(
                model, x_train, y_train, epochs=args.qat_epochs, per_channel=args.per_channel, seed=args.seed,
                calibration_size=args.calibration)
        else:
            small = quantization.quantize_model(model, x_cal, per_channel=args.per_channel, method=args.method,
                                                percentile=args.percentile)
        print(quantization.format_ranges(small.ranges))
        return finish("int8 model, integer-only inference", small, x_test, y_test, args.out)
    trained = binary.binarize(model, binary_activations=args.binary_activations)
    names = [f"{i}: {type(layer).__name__}" for i, layer in enumerate(trained.layers) if layer.kind.startswith("binary")]
    print(f"\nbinarized {', '.join(names)} ({'binary' if args.binary_activations else 'real'} activations); "
          f"first and last weight layers stay float32. Retraining {args.retrain_epochs} epochs, "
          f"adam lr {args.lr}, latent weights clipped to [-1, 1]")
    fit(trained, x_train, y_train, epochs=args.retrain_epochs, batch_size=args.batch_size,
        optimizer=Adam(args.lr), seed=args.seed, constraint=binary.clip_latent)
    return finish("binary model, weights packed one bit each", binary.pack(trained), x_test, y_test, args.out)


def cmd_prune(args):
    """--method clip|global: unstructured, saved sparse; --method filters: structured, a narrower network."""
    if args.lr is None:
        args.lr = 3e-4 if args.method == "filters" else 1e-4
    if args.iterations is None:  # the settings the project measured (the demo's)
        args.iterations = 2 if args.method == "clip" else 4
    if args.method == "filters":
        return _prune_filters(args)
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
        ends_scale = _ends_scale(model, args.sparsity, args.ends_scale)
        result = pruning.prune_global(model, x_train, y_train, args.sparsity, ends_scale=ends_scale, **common)
    print("\nweights removed per layer:\n" + pruning.format_sparsity(result.model, args.layers))
    return finish(f"pruned ({args.method}), stored sparse", sparse.to_sparse(result.model), x_test, y_test, args.out)


def _ends_scale(model, sparsity, asked):
    """--ends-scale, or by default 0.5, the setting the project measured best on LeNet-5 (92%: +0.15
    points, where 1 lost 0.35), where the middle weight layers can take the rest of the sparsity; else 1."""
    if asked is not None:
        return asked
    sizes = [model.layers[i].params["W"].size for i in weight_layers(model.layers)]
    ends = sizes[0] + sizes[-1] if len(sizes) >= 3 else 0
    return 0.5 if ends and sparsity * (sum(sizes) - ends / 2) <= sum(sizes[1:-1]) else 1.0


def _prune_filters(args):
    if args.rate is None and args.max_drop is None:
        raise ValueError("--method filters needs --rate R (the fraction of units to remove) or --max-drop D")
    x_fit, y_fit, x_val, y_val, x_test, y_test = _finetune_data(args)
    model = load(args.model)
    report(f"{args.model} before pruning", model, x_test, y_test)
    rates = {i: args.rate for i in structured.removable_layers(model)}
    if args.max_drop is not None:
        table = structured.sensitivity(model, x_val, y_val, criterion=args.criterion)
        print(f"\nsensitivity: validation accuracy with one layer pruned\n{structured.format_sensitivity(table)}")
        rates = structured.choose_rates(table, args.max_drop)
    print(f"\nremoving units by {args.criterion} score, rates {rates}, {args.steps} step(s), "
          f"{args.retrain_epochs} fine-tuning epoch(s) each")
    pruned = structured.prune_and_finetune(
        model, rates, x_fit, y_fit, steps=args.steps, epochs=args.retrain_epochs,
        criterion=args.criterion, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, score_data=(x_val, y_val), validation=(x_val, y_val))
    print()
    print(structured.compare(model, pruned))
    return finish("after pruning and fine-tuning", pruned, x_test, y_test, args.out)


def cmd_auto(args):
    """compress --auto: the search of optim.auto on the training images; test accuracy once, at the end."""
    from .. import auto  # here, not at the top: the other commands never need it

    if not args.out:
        raise ValueError("--auto needs --out DIR (the folder of the trial log, the models and the front)")
    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    result = auto.auto_compress(
        args.model, x_train, y_train, args.out, args.max_drop, objective=args.objective, techniques=args.techniques,
        time_budget=args.time_budget, workers=args.workers, scheduler=args.scheduler, seed=args.seed,
        epochs=args.auto_epochs, validation=args.validation, views=not args.plain_validation)
    tested = auto.evaluate_chosen(result, x_test, y_test)
    result["test_accuracy"] = tested
    write_file(os.path.join(args.out, "front.json"), json.dumps(result, indent=1))  # now with the test figures
    base = result["baseline"]
    print(f"\n{len(result['points']) - 1} models from {len(set(p['key'] for p in result['points'])) - 1} trials "
          f"in {result['seconds'] / 60:.1f} min; Pareto front: {len(result['front'])} points ({args.out}/front.json)")
    for message in result["messages"]:
        print(message)
    readings = {"val_accuracy": "validation (shifted views)" if result["settings"]["views"] else "validation"}
    if result["settings"]["views"]:
        readings["plain_accuracy"] = "plain"
    for objective, p in result["chosen"].items():
        mark = " (chosen: chosen.npz)" if objective == args.objective else ""
        scores = [f"{name} {p[k]:.4f} ({100 * (p[k] - base[k]):+.2f} points)" for k, name in readings.items()]
        scores.append(f"test {tested[objective]:.4f} ({100 * (tested[objective] - tested['baseline']):+.2f} points)")
        print(f"{objective:>8}{mark}: {p['kind']} {p['path']}\n          {', '.join(scores)}, "
              f"{p['bytes']:,} bytes ({base['bytes'] / p['bytes']:.1f}x smaller), batch-1 "
              f"{1e3 * p['latency_s']:.3f} ms"
              + ("" if p["key"] == "baseline" else f" ({p['speedup']:.2f}x the base model's speed, timed in alternation)"))
    return 0


def cmd_compress(args):
    if args.auto:
        return cmd_auto(args)
    x_train, y_train, x_test, y_test = datasets.load(args.data, root=args.root)
    model = load(args.model)
    before = report(f"{args.model} before compression", model, x_test, y_test, args.model)
    sparsity = args.sparsity if args.pipeline == "deep" else 0.0
    result = deep_compression.deep_compression(
        model, x_train, y_train, sparsity, bits={"conv": args.bits_conv, "fc": args.bits_fc},
        retrain_epochs=args.retrain_epochs, finetune_epochs=args.finetune_epochs, prune_iterations=args.iterations,
        prune_lr=args.lr, finetune_lr=args.finetune_lr, batch_size=args.batch_size, init=args.init,
        ends_scale=_ends_scale(model, sparsity, args.ends_scale), seed=args.seed)
    if args.out:
        result.model.save(args.out)
    sizes = (os.path.getsize(args.model), os.path.getsize(args.out)) if args.out else ()
    print(f"\nsize per layer (Deep Compression, Tables 2-3), index bits {result.bits}:")
    print(deep_compression.format_table(result.model, *sizes))
    after = report(f"compressed ({args.pipeline})", result.model, x_test, y_test, args.out)
    print(f"accuracy {before:.4f} -> {after:.4f} ({100 * (after - before):+.2f} points)")
    return 0


def cmd_cut(args):
    x_fit, y_fit, x_val, y_val, x_test, y_test = _finetune_data(args)
    model = load(args.model)
    report(f"{args.model} before cutting", model, x_test, y_test)
    if args.truncate_after is not None:
        print(f"\nkeeping layers 0..{args.truncate_after} and training a new head")
        cut = cutting.truncate(model, args.truncate_after, x_fit, y_fit, epochs=max(args.retrain_epochs, 1),
                               batch_size=args.batch_size, optimizer=Adam(args.lr), seed=args.seed)
    else:
        cut, scores = cutting.cut(model, x_val, y_val, args.criterion, args.remove, args.threshold)
        print(f"\n{'block':<10}{'val accuracy without it':>26}{'drop':>9}{'distance':>10}")
        for s in scores:
            print(f"{str(s['block']):<10}{s['accuracy']:>26.4f}{s['accuracy_drop']:>+9.4f}{s['distance']:>10.3f}")
        removed = len(model.layers) - len(cut.layers)
        print(f"removed {removed} layers by {args.criterion}; fine-tuning {args.retrain_epochs} epoch(s)")
        fit(cut, x_fit, y_fit, epochs=args.retrain_epochs, batch_size=args.batch_size,
            optimizer=Adam(args.lr), seed=args.seed, validation=(x_val, y_val))
    return finish("after cutting", cut, x_test, y_test, args.out)


def cmd_export(args):
    """Write a model file as ONNX and print both files' bytes; --check runs both on the test images."""
    from ..export import DEFAULT_OPSET, agreement, export  # onnx is an optional extra: imported here only

    model = load(args.model)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    x_test = datasets.load(args.data, root=args.root)[2] if args.check else None
    try:
        nbytes = export(model, args.out, opset=opset, sparse=not args.dense_weights)
        result = agreement(model, args.out, x_test) if args.check else None
    except ImportError as e:
        raise ValueError(str(e)) from None  # onnx or onnxruntime missing: one line from main, not a traceback
    npz = os.path.getsize(args.model)
    print(f"{args.model}: {npz:,} bytes on disk; {args.out} (ONNX, opset {opset}): {nbytes:,} bytes "
          f"({nbytes / npz:.2f}x the .npz)")
    if result:
        print(f"ONNX Runtime on the {len(x_test):,} {args.data} test images: the same class on "
              f"{100 * result['argmax_agreement']:.2f}%, logits within {result['max_relative_error']:.1e} "
              "of the largest (max |difference| / max |logit|)")
    return 0


def cmd_demo(args):
    start = time.perf_counter()
    result = demo.run(args.data, args.out, quick=args.quick, root=args.root, plots=not args.no_plots)
    print(f"\nwrote {os.path.join(args.out, 'report.md')} and report.json "
          f"({len(result['results'])} results) in {time.perf_counter() - start:.0f} s")
    if args.readme:
        update_readme(args.readme, result)
        print(f"updated the demo table in {args.readme}")
    return 0


def _at_least(minimum):
    """An argparse type: an integer >= minimum (a count or an index), rejected with a one-line error."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in its error message
    return parse


def _add_training_args(p, epochs_flag, epochs, lr, epochs_help=None, lr_help="Adam's learning rate"):
    """The fine-tuning recipe shared by every command that retrains."""
    p.add_argument(epochs_flag, type=int, default=epochs, help=epochs_help)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--seed", type=int, default=0)


def add_commands(commands):
    """Add every subcommand to the `minicnn` parser's subparsers."""
    p = commands.add_parser("train", help="train a zoo model and save it")
    p.add_argument("--model", default="lenet5", choices=sorted(zoo.MODELS))
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9, help="for sgd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hold-out", type=float, default=None, metavar="FRACTION",
                   help="train without this fraction of the training images: the validation split that "
                        "compress --auto --validation FRACTION (same --seed) takes its decisions on")
    p.add_argument("--out", default=None, help="where to save the trained model (.npz)")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser("demo", help="train the seed CNN and LeNet-5, apply every technique, report the gains")
    add_data_args(p)
    p.add_argument("--out", default="demo", help="folder for the trained models, artifacts, report and plots")
    p.add_argument("--quick", action="store_true", help="a few epochs on 2,000 training images (for CI)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots")
    p.add_argument("--readme", default=None, help="also write the table into this README, between its markers")
    p.set_defaults(run=cmd_demo)

    p = commands.add_parser("distill", help="train a small student on a teacher's soft targets (Hinton et al. 2015)")
    p.add_argument("--teacher", required=True, help="the teacher model file (.npz)")
    p.add_argument("--student", default="small_mlp", choices=sorted(zoo.MODELS))
    add_data_args(p)
    p.add_argument("--temperature", type=float, default=8.0)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft targets, in [0, 1]")
    _add_training_args(p, "--epochs", 50, 1e-3)
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

    p = commands.add_parser("quantize", help="int8 integer-only inference (--bits 8) or binary weights (--bits 1)")
    p.add_argument("--model", required=True, help="a float model file (.npz)")
    add_data_args(p)
    p.add_argument("--bits", type=int, default=8, choices=[8, 1])
    p.add_argument("--per-channel", action="store_true", help="int8: one weight scale per output channel")
    p.add_argument("--calibration", type=_at_least(1), default=1000, help="int8: training images used to calibrate")
    p.add_argument("--method", default="minmax", choices=quantization.METHODS, help="int8: calibration")
    p.add_argument("--percentile", type=float, default=99.99, help="int8: for --method percentile")
    p.add_argument("--qat-epochs", type=int, default=0, help="int8: quantization-aware fine-tuning epochs")
    p.add_argument("--binary-activations", action="store_true",
                   help="binary: binarize the middle layers' inputs too (XNOR-popcount inference)")
    _add_training_args(p, "--retrain-epochs", 5, 1e-3)
    p.add_argument("--out", required=True, help="where to save the quantized model (.npz)")
    p.set_defaults(run=cmd_quantize)

    p = commands.add_parser("prune", help="remove weights (clip, global: stored sparse) or whole filters and neurons")
    p.add_argument("--model", required=True, help="model file (.npz) to prune")
    add_data_args(p)
    p.add_argument("--method", default="global", choices=["clip", "global", "filters"],
                   help="clip: per-layer |w| < Q std(W) (Han et al. 2015); global: one magnitude threshold on "
                        "the cubic schedule (Zhu & Gupta 2017); filters: whole conv filters and dense neurons "
                        "(Li et al. 2017)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--quality", type=float, help="clip: the threshold in standard deviations")
    amount.add_argument("--sparsity", type=float, help="global: the fraction of weights to remove, in [0, 1)")
    amount.add_argument("--rate", type=float, help="filters: fraction of the units of every prunable layer, in [0, 1)")
    amount.add_argument("--max-drop", type=float,
                        help="filters, instead of --rate: per-layer rates from a sensitivity analysis, the largest "
                             "whose validation accuracy drop (a fraction, e.g. 0.02) stays within this")
    p.add_argument("--iterations", type=int, default=None,
                   help="clip: prune-retrain rounds (default 2); global: pruning steps on the cubic schedule (default 4)")
    p.add_argument("--ends-scale", type=float, default=None,
                   help="global: prune the first and last layers (the most sensitive) to this fraction of the "
                        "sparsity (default: 0.5 where the middle layers can take the rest, else 1)")
    p.add_argument("--layers", nargs="+", default=None, help="clip, global: layers to prune (conv1 ... fc1 ...)")
    p.add_argument("--sensitivity", action="store_true",
                   help="clip, global: first print each layer's accuracy against its sparsity, without retraining")
    p.add_argument("--criterion", default="l1", choices=structured.CRITERIA, help="filters: ranking")
    p.add_argument("--steps", type=int, default=1, help="filters: prune and fine-tune in this many steps")
    _add_training_args(p, "--retrain-epochs", 4, None, "epochs of retraining (per step for filters)",
                       "Adam's learning rate; 1e-4 (clip, global), 3e-4 (filters)")
    p.add_argument("--out", default=None, help="where to save the pruned model (.npz)")
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser("cut", help="remove whole layers, or truncate and train a new head (optim.cutting)")
    p.add_argument("--model", required=True, help="model file (.npz) to cut")
    add_data_args(p)
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--remove", type=int, help="remove the K least important blocks")
    how.add_argument("--threshold", type=float,
                     help="remove every block scoring below T (accuracy drop as a fraction, e.g. 0.005)")
    how.add_argument("--truncate-after", type=_at_least(0), help="keep layers 0..I and train a new classifier head")
    p.add_argument("--criterion", default="accuracy", choices=cutting.CRITERIA)
    _add_training_args(p, "--retrain-epochs", 3, 3e-4)
    p.add_argument("--out", default=None, help="where to save the cut model (.npz)")
    p.set_defaults(run=cmd_cut)

    p = commands.add_parser("compress", help="Deep Compression: prune, share weights (k-means), Huffman code")
    p.add_argument("--model", required=True, help="model file (.npz) to compress")
    add_data_args(p)
    p.add_argument("--pipeline", default="deep", choices=["deep", "share"],
                   help="deep: prune -> retrain -> share -> fine-tune -> Huffman; share: weight sharing alone")
    p.add_argument("--sparsity", type=float, default=0.95,
                   help="for deep: the fraction of weights to prune, in [0, 1) (default 0.95)")
    p.add_argument("--bits-conv", type=int, default=8, help="index bits of conv layers (2**bits centroids)")
    p.add_argument("--bits-fc", type=int, default=5, help="index bits of dense layers (2**bits centroids)")
    p.add_argument("--init", default="linear", choices=sharing.INITS,
                   help="k-means initialisation")
    p.add_argument("--iterations", type=int, default=8, help="pruning steps on the cubic schedule")
    p.add_argument("--ends-scale", type=float, default=None,
                   help="prune the first and last layers (the most sensitive) to this fraction of the sparsity "
                        "(default: 0.5 where the middle layers can take the rest, else 1)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="epochs of centroid fine-tuning")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam learning rate of the centroids")
    _add_training_args(p, "--retrain-epochs", 6, 1e-4)
    p.add_argument("--out", default=None, help="where to save the compressed model (.npz); with --auto, a folder")
    auto = p.add_argument_group("automatic search (--auto, optim.auto): per-layer settings within an accuracy budget")
    auto.add_argument("--auto", action="store_true", help="search per-layer settings instead of the fixed pipeline")
    auto.add_argument("--max-drop", type=float, default=0.3,
                      help="points of validation accuracy the result may lose, on the views and on the plain images")
    auto.add_argument("--objective", default="bytes", choices=["bytes", "latency"],
                      help="within the budget, choose the smallest file or the lowest batch-1 latency")
    auto.add_argument("--techniques", nargs="+", default=None,
                      help="among prune share int8 binary filters (default: all)")
    auto.add_argument("--time-budget", type=float, default=None,
                      help="minutes: start no new round of trials after this")
    auto.add_argument("--workers", type=int, default=1, help="local worker processes running trials")
    auto.add_argument("--scheduler", default=None,
                      help="address of a Dask scheduler (e.g. tcp://host:8786) to run trials on its workers")
    auto.add_argument("--auto-epochs", type=int, default=4, help="retraining epochs of each trial")
    auto.add_argument("--validation", type=float, default=0.1,
                      help="fraction of the training images held out for every decision (default 0.1: 800 of "
                           "mnist10k's, each read with its eight one-pixel translations; a larger one resolves "
                           "--max-drop more finely and leaves fewer images to retrain on)")
    auto.add_argument("--plain-validation", action="store_true",
                      help="score each validation image once, not with its eight one-pixel translations")
    p.set_defaults(run=cmd_compress)

    p = commands.add_parser("export", help="write a model file (any kind) as ONNX, for ONNX Runtime (optim.export)")
    p.add_argument("--model", required=True, help="model file (.npz) to export")
    p.add_argument("--out", required=True, help="where to write the ONNX model (.onnx)")
    p.add_argument("--opset", type=int, default=None,
                   help="ai.onnx opset version, 13 (the default) to 27, the newest tested in ONNX Runtime "
                        "(1.32; 1.19 runs up to 21)")
    p.add_argument("--dense-weights", action="store_true",
                   help="store every weight dense, even where a sparse initializer is smaller (for tools "
                        "that read no sparse initializers)")
    p.add_argument("--check", action="store_true",
                   help="run the model and the ONNX file (in ONNX Runtime) on the test images and compare")
    add_data_args(p)
    p.set_defaults(run=cmd_export)
