"""Does ONNX Runtime run the exported int8 LeNet-5 faster than minicnn's own integer kernels?

Measured in one run, on the same inputs, at batch 1 (latency) and 256 (throughput):

- minicnn: `QuantizedModel.predict`, everything included (quantize the input, the Numba int8
  ops, dequantize the logits);
- ONNX Runtime: the same model exported by optim.export (QuantizeLinear, QLinearConv,
  MaxPool on int8, MatMulInteger, DequantizeLinear), one CPU session, `session.run`.

Both get the same threads (`--threads`, default 2: Numba's and BLAS's for minicnn,
`SessionOptions.intra_op_num_threads` for ONNX Runtime). The two alternate, one repeat each
per round (minicnn.timing.compare), so a slow spell of the shared machine hits both; the
ratio reported is the median over rounds of minicnn time / ONNX Runtime time (> 1: ONNX
Runtime is faster). Before timing, the script checks that both give the same classes.

Weights: the zoo's seed-0 LeNet-5 calibrated on random images (speed depends on shapes,
not values), or `--model` an int8 model file (e.g. the demo's lenet5-int8-quantization.npz).

    python bench/bench_export.py [--quick] [--model M.npz] [--threads 2] [--json PATH]
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
from minicnn import load, zoo  # noqa: E402
from minicnn.timing import FULL, QUICK, compare  # noqa: E402
from optim.export import export, run  # noqa: E402
from optim.export.runtime import session  # noqa: E402
from optim.quantization import QuantizedModel, quantize_model  # noqa: E402

BATCHES = (1, 256)
THREADS = 2


def random_images(n, seed=0):
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def int8_model(path):
    if path is None:
        return quantize_model(zoo.lenet5(seed=0), random_images(512, seed=1), per_channel=True)
    model = load(path)
    if not isinstance(model, QuantizedModel):
        raise SystemExit(f"{path} is not an int8 model (it holds a {type(model).__name__})")
    return model


def figures(model, runner, budget):
    rows, out = [], []
    name = runner.get_inputs()[0].name
    for batch in BATCHES:
        x = random_images(batch, seed=3)
        timings = compare({"minicnn": lambda: model.predict(x, batch_size=batch),
                           "onnxruntime": lambda: runner.run(None, {name: x})}, budget)
        ratio = statistics.median(m / o for m, o in zip(timings["minicnn"].times, timings["onnxruntime"].times))
        med = {label: t.median for label, t in timings.items()}
        if batch == 1:
            figure, unit, value = "latency b1", "us", {k: 1e6 * t for k, t in med.items()}
        else:
            figure, unit, value = f"throughput b{batch}", "images/s", {k: batch / t for k, t in med.items()}
        rows.append([figure, unit, value["minicnn"], value["onnxruntime"], ratio])
        out.append({"figure": figure, "batch": batch, "unit": unit, "value": value, "speed_ratio": ratio,
                    "timing": {k: t.to_dict() for k, t in timings.items()}})
        print(f"  batch {batch} done", flush=True)
    return rows, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "export", "short timings, for a smoke test")
    parser.add_argument("--model", default=None, help="an int8 model file (default: the zoo's LeNet-5, quantized)")
    args = parse_run_args(parser, argv)
    threads = set_threads(args.threads or THREADS)
    budget = QUICK if args.quick else FULL
    started = time.perf_counter()
    model = int8_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx_bytes = export(model, path)
        runner = session(path, threads=threads)
    x = random_images(512, seed=2)
    agreement = float((run(runner, x)[0].argmax(1) == model.predict(x).argmax(1)).mean())
    if agreement < 0.99:
        raise SystemExit(f"validation failed: ONNX Runtime and minicnn agree on only {100 * agreement:.1f}% of classes")
    rows, result_rows = figures(model, runner, budget)
    facts = machine_facts()
    print("machine:\n" + format_facts(facts))
    print(f"\nint8 LeNet-5: minicnn's predict against its ONNX export in ONNX Runtime, {threads} threads each; "
          "ratio = minicnn time / ONNX Runtime time\n")
    print(format_table(["figure", "unit", "minicnn", "onnxruntime", "ratio"], rows))
    print(f"same class on {num(100 * agreement)}% of random images; ONNX file {onnx_bytes:,} bytes")
    result = {"benchmark": "export", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "budget": vars(budget), "machine": facts, "threads": threads, "model": args.model or "zoo lenet5",
              "onnx_bytes": onnx_bytes, "argmax_agreement": agreement, "figures": result_rows,
              "seconds": time.perf_counter() - started}
    write_json(args.json, result)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
