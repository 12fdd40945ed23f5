"""Does ONNX Runtime run an int8 model faster than minicnn's own integer kernels?

Measured in one run, on the same inputs (mnist10k test images), at batch 1 (latency) and 256
(throughput):

- minicnn: `QuantizedModel.predict`, everything included (quantize the input, the Numba int8
  ops, dequantize the logits);
- ONNX Runtime: the same model exported by optim.export (QuantizeLinear, QLinearConv,
  MaxPool on int8, MatMulInteger, DequantizeLinear), one CPU session, `session.run`;
- with `--ort-static`, also ONNX Runtime on its own int8 model: the float model exported by
  optim.export, then quantized by `onnxruntime.quantization.quantize_static` (QDQ format,
  per-channel int8 weights, 7-bit on a CPU without VNNI as ORT advises, uint8 activations,
  MinMax ranges from the same 1,000 training images minicnn calibrates on). ONNX Runtime
  fuses the QDQ graph into its integer kernels when it loads it; the output says which ops
  it runs.

All get the same threads (`--threads`, default: all Numba's; Numba's and BLAS's for minicnn,
`SessionOptions.intra_op_num_threads` for ONNX Runtime). They alternate, one repeat each
per round (minicnn.timing.compare), so a slow spell of the shared machine hits all; a ratio
reported is the median over rounds of minicnn time / ONNX Runtime time (> 1: ONNX Runtime
is faster).

The model, as the demo makes it:
- `--model M.npz`: an int8 model file (the demo's lenet5-int8-quantization.npz);
- `--float-model F.npz`: a trained float model of the zoo (the demo's baseline, LeNet-5 or
  the seed CNN), quantized here as the demo does (per-channel, calibrated on 1,000 mnist10k
  training images);
- neither: the zoo's seed-0 LeNet-5 with untrained weights, quantized the same way. Speed
  depends on shapes, not values, but the output says the weights are untrained.
`--ort-static` needs `--float-model`: ONNX Runtime's quantizer starts from the float model.

Before timing, the script runs both on the 2,000 mnist10k test images and requires the same
class on at least 99.9% of them for a trained model (an int8 code can differ by one where
ONNX Runtime and minicnn round a half differently). An untrained model's logits are nearly
tied, so its agreement is printed, not required. ONNX Runtime's own quantization chooses its
own scales and rounds differently, so with `--ort-static` the two int8 models are not
required to agree with each other: each one's test accuracy and agreement with the float
model's classes are printed, and each must be within 1 point of the float model's accuracy
(the float model's export itself must agree with minicnn's float predict on 99.9%).

    python bench/bench_export.py [--quick] [--model M.npz | --float-model F.npz [--ort-static]]
                                 [--threads N] [--json PATH]
"""

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree, not an installed copy

import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, machine_facts, num, parse_run_args, set_threads, write_json,
)
from minicnn import Sequential, datasets, load, zoo  # noqa: E402
from minicnn.timing import FULL, QUICK, compare  # noqa: E402
from optim.export import agreement, export, run, session  # noqa: E402
from optim.quantization import QuantizedModel, quantize_model  # noqa: E402

BATCHES = (1, 256)
CALIBRATION = 1000  # the demo's int8 quantization: per-channel, 1,000 training images
MIN_AGREEMENT = 0.999  # for a trained model
MAX_ACCURACY_DROP = 0.01  # --ort-static: each int8 model's test accuracy within 1 point of the float model's


def calibration_images(x_train):
    """The demo's 1,000 calibration images: minicnn's quantization and ONNX Runtime's see the same ones."""
    return x_train[np.random.default_rng(0).permutation(len(x_train))[:CALIBRATION]]


def quantized_as_the_demo_does(model, x_train):
    return quantize_model(model, calibration_images(x_train), per_channel=True)


def int8_model(args, x_train):
    """(the int8 model, what it is, whether its weights are trained, the float model it comes from or None)."""
    if args.model is not None:
        model = load(args.model)
        if not isinstance(model, QuantizedModel):
            raise SystemExit(f"{args.model} is not an int8 model (it holds a {type(model).__name__})")
        return model, f"int8 model {args.model}", True, None
    if args.float_model is not None:
        model = load(args.float_model)
        if not isinstance(model, Sequential):
            raise SystemExit(f"{args.float_model} is not a float model (it holds a {type(model).__name__})")
        return quantized_as_the_demo_does(model, x_train), f"{args.float_model} quantized to int8", True, model
    return (quantized_as_the_demo_does(zoo.lenet5(seed=0), x_train), "int8 LeNet-5 with UNTRAINED weights",
            False, None)


# --------------------------------------------------------------------------
# --ort-static: ONNX Runtime's own int8 quantization of the float model


def has_vnni():
    """Whether the host CPU has VNNI (int8 dot products into int32), as LLVM reads its features: the
    CPU ONNX Runtime picks its kernels for, not the target Numba may be told to compile for
    (minicnn.simd.HAS_VNNI, which a portable run turns off)."""
    import llvmlite.binding

    features = llvmlite.binding.get_host_cpu_features()
    return bool(features.get("avx512vnni") or features.get("avxvnni"))


def ort_quantized(float_model, x_train, folder):
    """The float model exported by optim.export, then quantized by ONNX Runtime's quantize_static:
    (the QDQ file's path, the float file's path, the settings)."""
    from onnxruntime.quantization import (
        CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static,
    )

    class Images(CalibrationDataReader):
        """The calibration images, 256 at a time, as the graph's input "input"."""

        def __init__(self, x):
            self.batches = (np.ascontiguousarray(x[i : i + 256], dtype=np.float32) for i in range(0, len(x), 256))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    folder = Path(folder)
    float_path, prepared, qdq_path = folder / "float.onnx", folder / "float-prepared.onnx", folder / "qdq.onnx"
    export(float_model, float_path, sparse=False)  # ORT's quantizer finds weights among dense initializers only
    # ORT's recommended first step: shape inference and its graph optimizations (without it, a warning)
    quant_pre_process(float_path, prepared)
    # U8S8 (uint8 activations, int8 weights) is what ORT advises for x86-64 CPUs: its int8 GEMMs
    # there multiply unsigned bytes by signed ones, as the instructions do (VPMADDUBSW, VNNI's
    # VPDPBUSD). Without VNNI, VPMADDUBSW adds two u8 x s8 products into an int16 that can
    # saturate, so ORT advises 7-bit weights there (reduce_range); with VNNI, full 8 bits.
    settings = {"format": "QDQ", "per_channel": True, "weight_type": "QInt8", "activation_type": "QUInt8",
                "reduce_range": not has_vnni(), "calibration": f"MinMax, {CALIBRATION:,} mnist10k training images"}
    quantize_static(prepared, qdq_path, Images(calibration_images(x_train)), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=settings["reduce_range"], activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return qdq_path, float_path, settings


def ops_run(path, folder):
    """The ops ONNX Runtime runs for the model file `path`: its graph once a session has optimized it
    (QDQ groups fused into integer kernels), in order."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
    options.log_severity_level = 3  # not the warning that the optimized file suits this machine only
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def ort_static(float_model, model, x_train, x_test, y_test, threads):
    """ONNX Runtime's int8 model of float_model, checked: (its session, what the JSON and output say).

    model: minicnn's int8 model of float_model. Each int8 model's accuracy must be within
    MAX_ACCURACY_DROP of the float model's, and the float export must agree with minicnn."""
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        qdq_path, float_path, info = ort_quantized(float_model, x_train, folder)
        runner = session(qdq_path, threads=threads)
        float_check = agreement(float_model, float_path, x_test)  # the quantizer's input is the float model
        info.update(onnx_bytes=qdq_path.stat().st_size, ops_run=ops_run(qdq_path, folder),
                    file_ops=dict(Counter(node.op_type for node in onnx.load(qdq_path).graph.node)))
    if float_check["argmax_agreement"] < MIN_AGREEMENT:
        raise SystemExit(f"validation failed: the float model's ONNX export gives minicnn's class on only "
                         f"{100 * float_check['argmax_agreement']:.2f}% of the {len(x_test):,} test images")
    classes = {"float": float_model.predict(x_test).argmax(axis=1),
               "minicnn": model.predict(x_test).argmax(axis=1),
               "onnxruntime_qdq": run(runner, x_test)[0].argmax(axis=1)}
    accuracy = {k: float((c == y_test).mean()) for k, c in classes.items()}
    for k, int8 in (("minicnn", "minicnn's int8 model"), ("onnxruntime_qdq", "ONNX Runtime's int8 model")):
        if accuracy[k] < accuracy["float"] - MAX_ACCURACY_DROP:
            raise SystemExit(f"validation failed: {int8} has test accuracy {100 * accuracy[k]:.2f}%, the float model's "
                             f"{100 * accuracy['float']:.2f}% (at most {100 * MAX_ACCURACY_DROP:.0f} point lower "
                             "allowed)")
    info.update(
        float_export={k: float_check[k] for k in ("argmax_agreement", "max_relative_error")},
        accuracy=accuracy,
        agreement_with_float={k: float((c == classes["float"]).mean()) for k, c in classes.items() if k != "float"},
        int8_agreement=float((classes["minicnn"] == classes["onnxruntime_qdq"]).mean()))
    return runner, info


# --------------------------------------------------------------------------
# Timing


def figures(model, runners, x_test, budget, trained):
    """runners: {"onnxruntime": session[, "onnxruntime_qdq": session]}, timed with minicnn in the same rounds."""
    rows, out = [], []
    label = "" if trained else " (untrained weights)"
    for batch in BATCHES:
        x = np.ascontiguousarray(x_test[:batch], dtype=np.float32)
        fns = {"minicnn": lambda: model.predict(x, batch_size=batch)}
        for key, runner in runners.items():  # runner and name bound now, not at the loop's end
            fns[key] = lambda runner=runner, name=runner.get_inputs()[0].name: runner.run(None, {name: x})
        timings = compare(fns, budget)
        ratios = {key: statistics.median(m / o for m, o in zip(timings["minicnn"].times, timings[key].times))
                  for key in runners}
        med = {key: t.median for key, t in timings.items()}
        if batch == 1:
            figure, unit, value = "latency b1", "us", {k: 1e6 * t for k, t in med.items()}
        else:
            figure, unit, value = f"throughput b{batch}", "images/s", {k: batch / t for k, t in med.items()}
        row = [figure + label, unit, value["minicnn"]]
        for key in runners:
            row += [value[key], ratios[key]]
        rows.append(row)
        entry = {"figure": figure, "batch": batch, "unit": unit, "value": value, "speed_ratio": ratios["onnxruntime"],
                 "timing": {k: t.to_dict() for k, t in timings.items()}}
        if "onnxruntime_qdq" in ratios:
            entry["speed_ratio_qdq"] = ratios["onnxruntime_qdq"]
        out.append(entry)
        print(f"  batch {batch} done", flush=True)
    return rows, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "export", "short timings, for a smoke test")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None,
                        help="an int8 model file (e.g. the demo's lenet5-int8-quantization.npz)")
    source.add_argument("--float-model", default=None,
                        help="a trained float model file of the zoo (e.g. the demo's baseline-lenet5-mnist10k.npz), "
                             "quantized as the demo does (default, without --model: the zoo's LeNet-5 with "
                             "untrained weights)")
    parser.add_argument("--ort-static", action="store_true",
                        help="also time ONNX Runtime's own int8 quantization of --float-model (quantize_static, "
                             "QDQ, per-channel), calibrated on the same images")
    args = parse_run_args(parser, argv)
    if args.ort_static and args.float_model is None:
        parser.error("--ort-static needs --float-model F.npz: ONNX Runtime quantizes the float model itself")
    threads = set_threads(args.threads)  # None: Numba's count, as every bench; ONNX Runtime gets the same
    budget = QUICK if args.quick else FULL
    started = time.perf_counter()
    x_train, _, x_test, y_test = datasets.load("mnist10k")
    model, what, trained, float_model = int8_model(args, x_train)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        onnx_bytes = export(model, path)
        runners = {"onnxruntime": session(path, threads=threads)}
    check = agreement(model, runners["onnxruntime"], x_test)
    same = check["argmax_agreement"]
    if trained and same < MIN_AGREEMENT:
        raise SystemExit(f"validation failed: ONNX Runtime and minicnn give the same class on only {100 * same:.2f}% "
                         f"of the {len(x_test):,} test images (at least {100 * MIN_AGREEMENT:.1f}% required)")
    static = None
    if args.ort_static:
        runners["onnxruntime_qdq"], static = ort_static(float_model, model, x_train, x_test, y_test, threads)
    rows, result_rows = figures(model, runners, x_test, budget, trained)
    facts = machine_facts()
    print("machine:\n" + format_facts(facts))
    against = "its ONNX export in ONNX Runtime"
    if static:
        against += " (onnxruntime) and ONNX Runtime's own int8 quantization of the float model (ort qdq)"
    print(f"\n{what}: minicnn's predict against {against}, {threads} threads each; "
          "ratio = minicnn time / ONNX Runtime time\n")
    headers = ["figure", "unit", "minicnn", "onnxruntime", "ratio"] + (["ort qdq", "ratio qdq"] if static else [])
    print(format_table(headers, rows))
    print(f"same class on {num(100 * same)}% of the {len(x_test):,} mnist10k test images"
          f"{'' if trained else ' (untrained weights: nearly tied logits, not required)'}; "
          f"max relative logit error {check['max_relative_error']:.2g}; ONNX file {onnx_bytes:,} bytes")
    if static:
        acc, agree = static["accuracy"], static["agreement_with_float"]
        print(f"ort qdq: quantize_static, {static['format']}, per-channel {static['weight_type']} weights, "
              f"{static['activation_type']} activations, reduce_range {static['reduce_range']},\n"
              f"  {static['calibration']}; ONNX file {static['onnx_bytes']:,} bytes")
        print(textwrap.fill("ONNX Runtime runs it as: " + ", ".join(static["ops_run"]), 118,
                            initial_indent="  ", subsequent_indent="    "))
        # two decimals: one image in 2,000 is 0.05%
        print(f"  test accuracy: float {100 * acc['float']:.2f}%, minicnn int8 {100 * acc['minicnn']:.2f}%, "
              f"ort qdq {100 * acc['onnxruntime_qdq']:.2f}%")
        print(f"  same class as the float model: minicnn int8 {100 * agree['minicnn']:.2f}%, "
              f"ort qdq {100 * agree['onnxruntime_qdq']:.2f}%; as each other {100 * static['int8_agreement']:.2f}%")
        print(f"  the float export (the quantizer's input) against minicnn's float predict: same class on "
              f"{100 * static['float_export']['argmax_agreement']:.2f}%,\n  max relative logit error "
              f"{static['float_export']['max_relative_error']:.2g}")
    result = {"benchmark": "export", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "budget": vars(budget), "machine": facts, "threads": threads, "model": what, "trained": trained,
              "onnx_bytes": onnx_bytes, "argmax_agreement": same, "max_relative_error": check["max_relative_error"],
              "validation_images": len(x_test), "figures": result_rows, "ort_static": static,
              "seconds": time.perf_counter() - started}
    write_json(args.json, result)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
