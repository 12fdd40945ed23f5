"""How fast are the bit kernels of optim/binary/ against minicnn's float32?

Measured in one run, side by side, after checking the results agree:

1. Dense 4096 -> 4096 at batch 1, 64 and 256:
   - float32: minicnn's Dense.forward (numpy matmul, BLAS);
   - XNOR-popcount kernel: xnor.xnor_matmul on inputs already packed to bits
     (and the weights in the kernel's blocks, as a layer keeps them)
     (the issue's target: >= 8x faster than float32 at batch 64);
   - XNOR layer: PackedBinaryDense with binary inputs, i.e. the kernel plus
     packing the input signs and the beta * alpha scaling;
   - add/subtract layer: PackedBinaryDense with real inputs (binary weights only),
     optim.binary.addsub's masked adds.
2. LeNet-5's conv2 (20 -> 50 channels, 5x5, on 12x12, then its 2x2 max-pool)
   as predict runs it, one fused stage on a channels-last input, at batch 1 and
   256: float32 (the direct conv) against XNOR (binary inputs and weights: the
   pixels' signs packed, the windows' words read in place, popcounts, the pool
   in the registers); and the same two as model.predict of the two layers
   (NCHW input and output, so the transposes, the same for both, included).
3. LeNet-5 end to end (model.predict) at batch 1 and 256: float32 against the
   packed binary-weight model (conv2 and fc1 binary, real activations) and the
   packed XNOR model (conv2 and fc1 with binary inputs too), all in predict's
   fused stages; the first and last layers stay float32 in both.

The weights are random (seeded): speed depends on shapes only. Every figure
is a median over repeats after a warm-up that excludes Numba's compilation
(bench/common.py), the contestants of a row timed in alternating rounds.
speedup = float32 time / binary time, so > 1 means the binary path is faster.

    python bench/bench_binary.py [--quick] [--threads N] [--threading MODE] [--json PATH]
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree, not an installed copy

import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, machine_facts, num, parse_run_args, set_threads, write_json,
)
from minicnn.timing import FULL, QUICK, compare  # noqa: E402
from minicnn import Sequential, direct, zoo  # noqa: E402
from minicnn.layers import Conv2D, Dense, MaxPool2D  # noqa: E402
from optim.binary import (  # noqa: E402
    BinaryConv2D, BinaryDense, PackedBinaryConv2D, PackedBinaryDense, binarize, pack, xnor,
)

DENSE = 4096
DENSE_BATCHES = (1, 64, 256)
NET_BATCHES = (1, 256)
CONV = (20, 50, 5, 12)  # LeNet-5's conv2: channels in and out, kernel, input side


def check(condition, message):
    if not condition:
        raise SystemExit(f"validation failed: {message}")


def dense_figures(budget):
    rng = np.random.default_rng(0)
    float_layer = Dense(DENSE, DENSE, rng=rng)
    trained = {}  # the training-time layers (float computation on binarized values): the validation reference
    for binary_input in (False, True):
        trained[binary_input] = BinaryDense(DENSE, DENSE, binary_input=binary_input)
        trained[binary_input].params = float_layer.params
    addsub_layer = PackedBinaryDense.from_layer(trained[False])
    xnor_layer = PackedBinaryDense.from_layer(trained[True])
    bits = xnor_layer.bits
    blocks = xnor.blocked(bits)
    rows = []
    for batch in DENSE_BATCHES:
        x = rng.standard_normal((batch, DENSE)).astype(np.float32)
        a = xnor.pack_signs(x)
        check(np.array_equal(xnor.xnor_matmul(a[:4], bits, DENSE, blocks), xnor.xnor_matmul_ref(a[:4], bits, DENSE)),
              "xnor_matmul vs its reference")
        for name, layer, binary_input in (("add/subtract", addsub_layer, False), ("XNOR", xnor_layer, True)):
            check(np.allclose(layer.forward(x[:4]), trained[binary_input].forward(x[:4]), rtol=1e-4, atol=1e-4),
                  f"{name} layer vs the training-time forward")
        rows.append(timed_row(batch, {
            "float32 Dense": lambda: float_layer.forward(x),
            "XNOR-popcount kernel": lambda: xnor.xnor_matmul(a, bits, DENSE, blocks),
            "XNOR layer (packs input)": lambda: xnor_layer.forward(x),
            "add/subtract layer": lambda: addsub_layer.forward(x),
        }, budget))
        print(f"  dense batch {batch} done", flush=True)
    return rows


def conv_figures(budget):
    """The conv2 contestants timed as predict's fused stage (run(xp, out) on the same padded,
    channels-last input: the conv alone) and as model.predict of the two layers (NCHW in and out:
    the layout changes, the same for both, included)."""
    C, F, K, H = CONV
    rng = np.random.default_rng(2)
    conv, binary = Conv2D(C, F, K, rng=rng), BinaryConv2D(C, F, K, binary_input=True)
    binary.params["W"][...], binary.params["b"][...] = conv.params["W"], conv.params["b"]
    packed = PackedBinaryConv2D.from_layer(binary)
    models = {"float32 conv": Sequential([conv, MaxPool2D(2)], input_shape=(C, H, H)),
              "XNOR conv": Sequential([packed, MaxPool2D(2)], input_shape=(C, H, H))}
    trained_form = Sequential([binary, MaxPool2D(2)], input_shape=(C, H, H))
    stages, predicts = [], []
    for batch in NET_BATCHES:
        x = rng.standard_normal((batch, C, H, H)).astype(np.float32)
        check(np.allclose(models["XNOR conv"].predict(x), trained_form.forward(x), rtol=1e-4, atol=1e-4),
              "packed XNOR conv vs its training-time forward")
        xp = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        out = np.empty(direct.output_shape(xp.shape, F, K, 1, True), np.float32)
        float_stage = direct.conv_block_runner(xp.shape, F, K, 1, False, True)
        w = direct.pack_filters(conv.params["W"], 1, True)
        xnor_stage = packed.fused_conv(xp.shape, False, True)
        for name, stage in (("float32", lambda o: float_stage(xp, w, conv.params["b"], o)),
                            ("XNOR", lambda o: xnor_stage(xp, o))):
            check(np.allclose(stage(out.copy()), models[f"{name} conv"].predict(x).transpose(0, 2, 3, 1), rtol=1e-5,
                              atol=1e-5), f"the {name} stage vs its model's predict")
        stages.append(timed_row(batch, {"float32 conv": lambda: float_stage(xp, w, conv.params["b"], out),
                                        "XNOR conv": lambda: xnor_stage(xp, out)}, budget))
        predicts.append(timed_row(batch, {name: lambda m=m: m.predict(x, batch_size=batch)
                                          for name, m in models.items()}, budget))
        print(f"  conv batch {batch} done", flush=True)
    return stages, predicts


def timed_row(batch, contestants, budget):
    """One table row: the contestants timed in alternating rounds, speedups against the first."""
    t = compare(contestants, budget)
    first = next(iter(t.values())).median
    return {"batch": batch, "timing": {k: v.to_dict() for k, v in t.items()},
            "ms": {k: 1e3 * v.median for k, v in t.items()}, "speedup": {k: first / v.median for k, v in t.items()}}


def network_figures(budget):
    float_model = zoo.lenet5(seed=0)
    models = {
        "float32": float_model,
        "binary weights": pack(binarize(float_model)),
        "XNOR (binary inputs too)": pack(binarize(float_model, binary_activations=True)),
    }
    trained_form = {"binary weights": binarize(float_model),
                    "XNOR (binary inputs too)": binarize(float_model, binary_activations=True)}
    rng = np.random.default_rng(1)
    rows = []
    for batch in NET_BATCHES:
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        for name, model in trained_form.items():
            check(np.allclose(models[name].predict(x), model.predict(x), rtol=1e-4, atol=1e-4),
                  f"packed {name} LeNet-5 vs its training-time forward")
        row = timed_row(batch, {name: lambda m=m: m.predict(x, batch_size=batch) for name, m in models.items()}, budget)
        rows.append({**row, "images_per_s": {k: 1e3 * batch / ms for k, ms in row["ms"].items()}})
        print(f"  lenet5 batch {batch} done", flush=True)
    return rows, {name: m.layers[2].stats()["bytes"] + m.layers[5].stats()["bytes"] for name, m in models.items()}


def table(rows, first):
    names = list(rows[0]["ms"])
    headers = [first, *(f"{n} ms" for n in names), *(f"{n} speedup" for n in names[1:])]
    body = [[str(r["batch"]), *(r["ms"][n] for n in names), *(num(r["speedup"][n]) + "x" for n in names[1:])]
            for r in rows]
    return format_table(headers, body)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "binary")
    args = parse_run_args(p, argv)
    set_threads(args.threads)
    budget = QUICK if args.quick else FULL
    started = time.perf_counter()
    xnor.pack_signs(np.zeros((1, 1), np.float32))  # starts Numba's thread pool, so the facts name its layer
    facts = machine_facts()
    print("machine:\n" + format_facts(facts), flush=True)
    result = {"benchmark": "binary", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "budget": vars(budget), "machine": facts}

    result["dense"] = dense_figures(budget)
    print(f"\nDense {DENSE} -> {DENSE} (speedup = float32 time / this time; "
          "the kernel column excludes packing the input)")
    print(table(result["dense"], "batch"), flush=True)

    result["conv2_stage"], result["conv2_predict"] = conv_figures(budget)
    C, F, K, H = CONV
    print(f"\nLeNet-5's conv2, {C} -> {F} channels, {K}x{K} on {H}x{H}, and its 2x2 max-pool, as predict's fused stage"
          " runs them (channels-last input)")
    print(table(result["conv2_stage"], "batch"), flush=True)
    print("The same, model.predict of the two layers (NCHW input and output: transposes included)")
    print(table(result["conv2_predict"], "batch"), flush=True)

    result["lenet5"], weight_bytes = network_figures(budget)
    result["lenet5_middle_weight_bytes"] = weight_bytes
    print("\nLeNet-5 end to end, model.predict (conv2 and fc1 binarized; first and last layers float32)")
    print(table(result["lenet5"], "batch"))
    print("conv2 + fc1 stored bytes: " + ", ".join(f"{k} {v:,}" for k, v in weight_bytes.items()))

    result["seconds"] = time.perf_counter() - started
    write_json(args.json, result)
    print(f"\n{result['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
