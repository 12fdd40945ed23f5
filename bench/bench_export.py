"""Does ONNX Runtime run the exported int8 LeNet-5 faster than minicnn's own integer kernels?

Measured in one run, on the same inputs (mnist10k test images), at batch 1 (latency) and 256
(throughput):

- minicnn: `QuantizedModel.predict`, everything included (quantize the input, the Numba int8
  ops, dequantize the logits);
- ONNX Runtime: the same model exported by optim.export (QuantizeLinear, QLinearConv,
  MaxPool on int8, MatMulInteger, DequantizeLinear), one CPU session, `session.run`.

Both get the same threads (`--threads`, default: all Numba's; Numba's and BLAS's for minicnn,
`SessionOptions.intra_op_num_threads` for ONNX Runtime). The two alternate, one repeat each
per round (minicnn.timing.compare), so a slow spell of the shared machine hits both; the
ratio reported is the median over rounds of minicnn time / ONNX Runtime time (> 1: ONNX
Runtime is faster).

The model, as the demo makes it:
- `--model M.npz`: an int8 model file (the demo's lenet5-int8-quantization.npz);
- `--float-model F.npz`: a trained float LeNet-5 (the demo's baseline), quantized here as the
  demo does (per-channel, calibrated on 1,000 mnist10k training images);
- neither: the zoo's seed-0 LeNet-5 with untrained weights, quantized the same way. Speed
  depends on shapes, not values, but the output says the weights are untrained.

Before timing, the script runs both on the 2,000 mnist10k test images and requires the same
class on at least 99.9% of them for a trained model (an int8 code can differ by one where
ONNX Runtime and minicnn round a half differently). An untrained model's logits are nearly
tied, so its agreement is printed, not required.

    python bench/bench_export.py [--quick] [--model M.npz | --float-model F.npz] [--threads N] [--json PATH]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree, not an installed copy

import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, machine_facts, num, parse_run_args, set_threads, write_json,
)
from minicnn import Sequential, datasets, load, zoo  # noqa: E402
from minicnn.timing import FULL, QUICK, compare  # noqa: E402
from optim.export import agreement, export, session  # noqa: E402
from optim.quantization import QuantizedModel, quantize_model  # noqa: E402

BATCHES = (1, 256)
CALIBRATION = 1000  # the demo's int8 quantization: per-channel, 1,000 training images
MIN_AGREEMENT = 0.999  # for a trained model


def quantized_as_the_demo_does(model, x_train):
    x_cal = x_train[np.random.default_rng(0).permutation(len(x_train))[:CALIBRATION]]
    return quantize_model(model, x_cal, per_channel=True)


def int8_model(args, x_train):
    """(the int8 model, what it is, whether its weights are trained)."""
    if args.model is not None:
        model = load(args.model)
        if not isinstance(model, QuantizedModel):
            raise SystemExit(f"{args.model} is not an int8 model (it holds a {type(model).__name__})")
        return model, f"int8 model {args.model}", True
    if args.float_model is not None:
        model = load(args.float_model)
        if not isinstance(model, Sequential):
            raise SystemExit(f"{args.float_model} is not a float model (it holds a {type(model).__name__})")
        return quantized_as_the_demo_does(model, x_train), f"{args.float_model} quantized to int8", True
    return quantized_as_the_demo_does(zoo.lenet5(seed=0), x_train), "int8 LeNet-5 with UNTRAINED weights", False


def figures(model, runner, x_test, budget, trained):
    rows, out = [], []
    label = "" if trained else " (untrained weights)"
    name = runner.get_inputs()[0].name
    for batch in BATCHES:
        x = np.ascontiguousarray(x_test[:batch], dtype=np.float32)
        timings = compare({"minicnn": lambda: model.predict(x, batch_size=batch),
                           "onnxruntime": lambda: runner.run(None, {name: x})}, budget)
        ratio = statistics.median(m / o for m, o in zip(timings["minicnn"].times, timings["onnxruntime"].times))
        med = {label: t.median for label, t in timings.items()}
        if batch == 1:
            figure, unit, value = "latency b1", "us", {k: 1e6 * t for k, t in med.items()}
        else:
            figure, unit, value = f"throughput b{batch}", "images/s", {k: batch / t for k, t in med.items()}
        rows.append([figure + label, unit, value["minicnn"], value["onnxruntime"], ratio])
        out.append({"figure": figure, "batch": batch, "unit": unit, "value": value, "speed_ratio": ratio,
                    "timing": {k: t.to_dict() for k, t in timings.items()}})
        print(f"  batch {batch} done", flush=True)
    return rows, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "export", "short timings, for a smoke test")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None,
                        help="an int8 model file (e.g. the demo's lenet5-int8-quantization.npz)")
    source.add_argument("--float-model", default=None,
                        help="a trained float LeNet-5 file, quantized as the demo does (default, without --model: "
                             "the zoo's LeNet-5 with untrained weights)")
    args = parse_run_args(parser, argv)
    threads = set_threads(args.threads)  # None: Numba's count, as every bench; ONNX Runtime gets the same
    budget = QUICK if args.quick else FULL
    started = time.perf_counter()
    x_train, _, x_test, _ = datasets.load("mnist10k")
    model, what, trained = int8_model(args, x_train)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx_bytes = export(model, path)
        runner = session(path, threads=threads)
    check = agreement(model, runner, x_test)
    same = check["argmax_agreement"]
    if trained and same < MIN_AGREEMENT:
        raise SystemExit(f"validation failed: ONNX Runtime and minicnn give the same class on only {100 * same:.2f}% "
                         f"of the {len(x_test):,} test images (at least {100 * MIN_AGREEMENT:.1f}% required)")
    rows, result_rows = figures(model, runner, x_test, budget, trained)
    facts = machine_facts()
    print("machine:\n" + format_facts(facts))
    print(f"\n{what}: minicnn's predict against its ONNX export in ONNX Runtime, {threads} threads each; "
          "ratio = minicnn time / ONNX Runtime time\n")
    print(format_table(["figure", "unit", "minicnn", "onnxruntime", "ratio"], rows))
    print(f"same class on {num(100 * same)}% of the {len(x_test):,} mnist10k test images"
          f"{'' if trained else ' (untrained weights: nearly tied logits, not required)'}; "
          f"max relative logit error {check['max_relative_error']:.2g}; ONNX file {onnx_bytes:,} bytes")
    result = {"benchmark": "export", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "budget": vars(budget), "machine": facts, "threads": threads, "model": what, "trained": trained,
              "onnx_bytes": onnx_bytes, "argmax_agreement": same, "max_relative_error": check["max_relative_error"],
              "validation_images": len(x_test), "figures": result_rows, "seconds": time.perf_counter() - started}
    write_json(args.json, result)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
