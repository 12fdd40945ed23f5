"""Is the int8 model faster than the float32 one it came from?

Measured in one run, side by side, on the same inputs:

1. Networks: LeNet-5 and the seed CNN, float32 `model.predict` (minicnn's
   fused channels-last stages, minicnn.inference) against the int8
   `QuantizedModel.predict` (quantize the input, integer ops, dequantize the
   logits: everything included). Throughput at batch 256, latency at batch 1.
2. Kernels, same shapes at batch 256: the float32 im2row conv
   (`minicnn.kernels.conv2d_forward`; float32 predict and training run the
   direct `minicnn.direct.conv_block`, which bench_substrate.py times) against the int8 conv as
   predict runs it (`op.bind`: the windows of the codes' unsigned bytes read in place or copied,
   the int8 GEMM with int32 accumulators, fixed-point requantization; no pool here),
   and float32 Dense (x @ W + b) against the int8 dense op; each int8 op's
   multiply-adds per second also as a fraction of the int8 peak that a probe
   kernel measures in the same run (bench/peak.py's dot4_peak).

The machine is shared, so each pair is measured in `--rounds` alternating
rounds and the ratio reported is the median of the per-round ratios
float32 time / int8 time (> 1: int8 is faster). Every figure is a median
over repeats after a warm-up that excludes Numba's compilation
(bench/common.py). Before timing, the script checks that the Numba kernels
give bit for bit the NumPy reference's output and reports how often the
int8 model's argmax agrees with the float model's.

Weights are the zoo's seed-0 initialisation and the data random images in
[0, 1): speed depends on shapes, not values (accuracy figures come from
`minicnn quantize`, see README).

    python bench/bench_quantization.py [--quick] [--threads N] [--threading MODE] [--rounds 3] [--json PATH]

On a busy machine, the float32 path's spinning BLAS threads suffer more from
contention than Numba's sleeping workers; a per-core comparison is

    NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/bench_quantization.py
"""

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree, not an installed copy

import numba  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, machine_facts, num, parse_run_args, set_threads, write_json,
)
from bench.peak import dot4_peak  # noqa: E402
from minicnn.simd import HAS_VNNI  # noqa: E402
from minicnn.timing import FULL, QUICK, measure  # noqa: E402
from minicnn import kernels, zoo  # noqa: E402
from optim.quantization import quantize_model  # noqa: E402
from optim.quantization.kernels import unsigned  # noqa: E402

NETWORKS = ("lenet5", "seed_cnn")
BATCH = 256


def random_images(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def quantized(name):
    model = zoo.build(name, seed=0)
    return model, quantize_model(model, random_images(512, seed=1), per_channel=True)


def validate(name, model, qmodel):
    """Numba == NumPy reference bit for bit; argmax agreement with float32."""
    x = random_images(64, seed=2)
    fast, ref = qmodel.predict(x), qmodel.predict(x, reference=True)
    if not np.array_equal(fast, ref):
        raise SystemExit(f"{name}: the int8 kernels disagree with the NumPy reference")
    return float((fast.argmax(1) == model.forward(x).argmax(1)).mean())


def compare(fns, budget, rounds):
    """Alternate the contestants `rounds` times; their median times and the
    median over rounds of float32 time / int8 time."""
    times = {label: [] for label in fns}
    for _ in range(rounds):
        for label, fn in fns.items():
            times[label].append(measure(fn, budget).median)
    ratio = statistics.median(f / q for f, q in zip(times["float32"], times["int8"]))
    return {label: statistics.median(t) for label, t in times.items()}, ratio


def network_rows(budget, rounds, out):
    rows = []
    for name in NETWORKS:
        model, qmodel = quantized(name)
        agreement = validate(name, model, qmodel)
        for batch in (BATCH, 1):
            x = random_images(batch, seed=3)
            med, ratio = compare({"float32": lambda: model.predict(x, batch_size=batch),
                                  "int8": lambda: qmodel.predict(x, batch_size=batch)}, budget, rounds)
            if batch == 1:
                figure, unit, value = f"{name} latency b1", "us", {k: 1e6 * t for k, t in med.items()}
            else:
                figure, unit, value = f"{name} throughput b{batch}", "images/s", {k: batch / t for k, t in med.items()}
            rows.append([figure, unit, value["float32"], value["int8"], ratio])
            out.append({"figure": figure, "unit": unit, "value": value, "speed_ratio": ratio,
                        "median_s": med, "argmax_agreement": agreement})
    return rows


def conv_case(name, layer_index, in_shape):
    """A zoo conv layer and its int8 op, with float and int8 inputs of in_shape (C, H, W)."""
    model, qmodel = quantized(name)
    layer, op = model.layers[layer_index], qmodel.layers[layer_index]
    x = np.random.default_rng(3).random((BATCH, *in_shape), dtype=np.float32)
    xq = np.random.default_rng(4).integers(-128, 128, (BATCH, in_shape[1], in_shape[2], in_shape[0])).astype(np.int8)
    W, b = layer.params["W"], layer.params["b"]
    step, u = op.bind(xq.shape), unsigned(xq)  # what predict runs: a step bound to the shape, on the codes' bytes
    return (lambda: kernels.conv2d_forward(x, W, b, layer.stride, layer.padding)), (lambda: step(u)), \
        BATCH * op.macs(in_shape)


def dense_case(name, layer_index):
    model, qmodel = quantized(name)
    layer, op = model.layers[layer_index], qmodel.layers[layer_index]
    x = np.random.default_rng(3).random((BATCH, layer.in_features), dtype=np.float32)
    xq = np.random.default_rng(5).integers(-128, 128, x.shape).astype(np.int8)
    W, b = layer.params["W"], layer.params["b"]
    step, u = op.bind(xq.shape), unsigned(xq)
    return (lambda: x @ W + b), (lambda: step(u)), BATCH * op.macs((layer.in_features,))


def kernel_rows(budget, rounds, peak, out):
    """Rows of the kernel table; the int8 op's multiply-adds per second also as a fraction of `peak`,
    the int8 probe's GMAC/s (None without VNNI), the op's time including its layouts and requantization."""
    cases = {
        "lenet5 conv1 1->20 5x5 28x28": conv_case("lenet5", 0, (1, 28, 28)),
        "lenet5 conv2 20->50 5x5 12x12": conv_case("lenet5", 2, (20, 12, 12)),
        "seed_cnn conv 1->32 3x3 28x28": conv_case("seed_cnn", 0, (1, 28, 28)),
        "lenet5 dense 800->500": dense_case("lenet5", 5),
    }
    rows = []
    for figure, (float_fn, int_fn, macs) in cases.items():
        med, ratio = compare({"float32": float_fn, "int8": int_fn}, budget, rounds)
        ms = {k: 1e3 * t for k, t in med.items()}
        gmacs = macs / med["int8"] / 1e9
        share = None if peak is None else gmacs / peak
        rows.append([f"{figure} b{BATCH}", "ms", ms["float32"], ms["int8"], ratio, gmacs,
                     "-" if share is None else f"{100 * share:.0f}%"])
        out.append({"figure": figure, "unit": "ms", "value": ms, "speed_ratio": ratio, "batch": BATCH,
                    "int8_gmacs": gmacs, "of_int8_peak": share})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "quantization", "short timings, for a smoke test")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per comparison")
    args = parse_run_args(parser, argv)
    set_threads(args.threads)
    budget = QUICK if args.quick else FULL
    networks, kernel_figures = [], []
    rows = network_rows(budget, args.rounds, networks)
    peak = dot4_peak(budget)[0] if HAS_VNNI else None
    kernels_table = kernel_rows(budget, args.rounds, peak, kernel_figures)
    print("machine:\n" + format_facts(machine_facts()))
    print(f"\nint8 vs float32, {args.rounds} alternating rounds; speedup = float32 time / int8 time\n")
    print(format_table(["figure", "unit", "float32", "int8", "speedup"], rows))
    if peak is None:
        print("\nno VNNI in this build: no int8 peak (the probe's portable products are loop-invariant, and LLVM "
              "takes them out of its loop)\n")
    else:
        print(f"\nint8 peak (bench/peak.py's probe: 16-lane dot4_add, {numba.get_num_threads()} threads): "
              f"{num(peak)} GMAC/s; kernels' int8 multiply-adds per second, as a fraction of it\n")
    print(format_table(["figure", "unit", "float32", "int8", "speedup", "int8 GMAC/s", "of int8 peak"],
                       kernels_table))
    for r in networks:
        print(f"{r['figure']}: int8 argmax agrees with float32 on {num(100 * r['argmax_agreement'])}% of random images")
    write_json(args.json, {"machine": machine_facts(), "rounds": args.rounds, "quick": args.quick,
                           "int8_peak_gmacs": peak, "networks": networks, "kernels": kernel_figures})
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
