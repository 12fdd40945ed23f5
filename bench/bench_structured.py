"""Do narrower and shallower networks run faster? Structured pruning and cutting, measured.

Side by side in one run:

1. LeNet-5 and LeNet-5 with >= 50% of its conv filters and fc1 neurons
   removed (optim.structured): MACs per image, parameters, bytes on disk,
   test accuracy, batch-1 latency (ms per `predict` of one image) and
   batch-256 throughput (images/s).
2. deep_cnn and deep_cnn with blocks cut (optim.cutting): the same figures.

Pass the trained and compressed files made by the CLI to get their accuracy
(see README); without them the benchmark builds the pairs itself (a fresh
LeNet-5 pruned by L1 norm at 60%, a fresh deep_cnn with its two
least-distant blocks cut): speed depends on the shapes only, so the timings
hold, but accuracies are then of untrained networks and are not reported.

Validation first: the compressed networks must have the expected shapes
and give the same logits one image at a time as in a batch. Timing: after
warm-up (bench/common.py), the two models are timed in alternation, one
run of calls of A, then one of B, repeat after repeat, so a burst of load
from another job hits both sides; times are medians over repeats, the
speed-up is the median of the per-repeat ratios. The ratio of the best
times is printed below it: on a busy machine it is the better estimate of
what each network costs by itself.

    python bench/bench_structured.py [--quick] [--threads N] [--threading MODE] [--lenet5 F --pruned F] [--deep F --cut F] [--json PATH]
"""

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree's code, not an installed copy

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, machine_facts, num, parse_run_args, set_threads, write_json,
)
from minicnn.layers import weight_layers  # noqa: E402
from minicnn.timing import FULL, QUICK, Timing, compare  # noqa: E402
from optim import cutting, structured  # noqa: E402

ROUNDS = 3
LATENCY_BATCH, THROUGHPUT_BATCH = 1, 256


def disk_bytes(model):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.npz")
        model.save(path)
        return os.path.getsize(path)


def units(model):
    return {i: structured.num_units(model.layers[i]) for i in weight_layers(model.layers)}


def load_pair(base_path, small_path, build, compress):
    """(base, small, trained?) from files, or built here when no files are given."""
    if (base_path is None) != (small_path is None):
        raise SystemExit("give both files of a pair, or neither")
    if base_path is None:
        base = build()
        return base, compress(base), False
    return minicnn.load(base_path), minicnn.load(small_path), True


def validate(base, small, x):
    """Same logits one image at a time as in a batch; finite outputs."""
    for model in (base, small):
        batch = model.predict(x)
        single = np.concatenate([model.predict(x[i : i + 1]) for i in range(len(x))])
        assert np.isfinite(batch).all(), "non-finite logits"
        assert np.allclose(single, batch, rtol=1e-4, atol=1e-4), "batch-1 and batch logits differ"


def check_lenet5_pruning(base, small):
    before, after = units(base), units(small)
    removed = {i: 1 - after[i] / before[i] for i in (0, 2, 5)}
    assert all(r >= 0.5 for r in removed.values()), f"expected >= 50% removed per layer, got {removed}"
    return removed


def check_cut(base, small):
    removed = len(base.layers) - len(small.layers)
    cut_weighted = len(weight_layers(base.layers)) - len(weight_layers(small.layers))
    assert cut_weighted >= 2, f"expected at least two weighted layers cut, got {cut_weighted}"
    return {"layers_removed": removed, "weighted_layers_removed": cut_weighted}


def speed(base, small, budget):
    """Batch-1 latency and batch-256 throughput of both models, measured in alternation."""
    rng = np.random.default_rng(0)
    one = rng.random((LATENCY_BATCH, *base.input_shape), dtype=np.float32)
    many = rng.random((THROUGHPUT_BATCH, *base.input_shape), dtype=np.float32)
    result = {}
    for what, x in (("latency", one), ("batch", many)):
        # common.compare alternates the two sides, so a burst of load hits both.
        timings = compare({"base": lambda: base.predict(x), "small": lambda: small.predict(x)},
                          dataclasses.replace(budget, repeats=ROUNDS * budget.repeats))
        a, b = timings["base"].times, timings["small"].times
        ratios = [ta / tb for ta, tb in zip(a, b)]
        result[what] = {
            "base_s": statistics.median(a), "small_s": statistics.median(b),
            "speedup": statistics.median(ratios),  # median of the per-repeat ratios
            "speedup_of_best": min(a) / min(b),  # best vs best: what each costs without interference
            "spread": {"base": Timing(a, 1).spread, "small": Timing(b, 1).spread},
        }
    return {
        "latency_ms": {"base": 1e3 * result["latency"]["base_s"], "small": 1e3 * result["latency"]["small_s"]},
        "throughput_ips": {"base": THROUGHPUT_BATCH / result["batch"]["base_s"],
                           "small": THROUGHPUT_BATCH / result["batch"]["small_s"]},
        "latency_speedup": result["latency"]["speedup"],
        "throughput_speedup": result["batch"]["speedup"],
        "latency_speedup_of_best": result["latency"]["speedup_of_best"],
        "throughput_speedup_of_best": result["batch"]["speedup_of_best"],
        "detail": result,
    }


def figures(label, base, small, trained, budget, data):
    x_test, y_test = data
    validate(base, small, x_test[:16])
    row = {"pair": label, "trained": trained}
    for name, model in (("base", base), ("small", small)):
        row[name] = {"macs": structured.total_macs(model), "params": structured.num_params(model),
                     "disk_bytes": disk_bytes(model), "units": units(model), "layers": len(model.layers),
                     "accuracy": minicnn.evaluate(model, x_test, y_test) if trained else None}
    row["macs_ratio"] = row["base"]["macs"] / row["small"]["macs"]
    row["speed"] = speed(base, small, budget)
    return row


def table(rows):
    headers = ["model", "layers", "MACs", "params", "disk KB", "test acc", "batch-1 ms", "b256 img/s"]
    body = []
    for r in rows:
        s = r["speed"]
        for name, label in (("base", r["pair"][0]), ("small", r["pair"][1])):
            m = r[name]
            acc = "-" if m["accuracy"] is None else f"{100 * m['accuracy']:.2f}%"
            body.append([label, str(m["layers"]), m["macs"], m["params"], m["disk_bytes"] / 1024, acc,
                         s["latency_ms"][name], s["throughput_ips"][name]])
        body.append(["  ratio", "", f"{num(r['macs_ratio'])}x fewer", "", "", "",
                     f"{num(s['latency_speedup'])}x faster", f"{num(s['throughput_speedup'])}x faster"])
        body.append(["  ratio of bests", "", "", "", "", "",
                     f"{num(s['latency_speedup_of_best'])}x", f"{num(s['throughput_speedup_of_best'])}x"])
    return format_table(headers, body)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "structured")
    p.add_argument("--lenet5", type=Path, help="trained LeNet-5 (.npz)")
    p.add_argument("--pruned", type=Path, help="the same after `minicnn prune --method filters`")
    p.add_argument("--deep", type=Path, help="trained deep_cnn (.npz)")
    p.add_argument("--cut", type=Path, help="the same after `minicnn cut`")
    args = parse_run_args(p, argv)
    set_threads(args.threads)
    return args


def main(argv=None):
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    started = time.perf_counter()
    _, _, x_test, y_test = minicnn.datasets.load("mnist10k")
    lenet = load_pair(args.lenet5, args.pruned, lambda: minicnn.zoo.lenet5(seed=0),
                      lambda m: structured.prune(m, 0.6, "l1"))
    deep = load_pair(args.deep, args.cut, lambda: minicnn.zoo.deep_cnn(seed=0),
                     lambda m: cutting.cut(m, x_test[:200], y_test[:200], "distance", remove=2)[0])
    removed = check_lenet5_pruning(*lenet[:2])
    cut = check_cut(*deep[:2])
    minicnn.zoo.lenet5().predict(x_test[:1])  # starts Numba's pool: names its threading layer
    facts = machine_facts()
    print("machine:\n" + format_facts(facts), flush=True)
    print(f"budget: {ROUNDS * budget.repeats} alternating repeats of >= {budget.min_time * 1e3:.0f} ms per side; "
          f"times are medians, speed-ups medians of per-repeat ratios (and, below them, best time / best time)",
          flush=True)
    print("LeNet-5 units removed per layer: " + ", ".join(f"layer {i} {100 * r:.0f}%" for i, r in removed.items()))
    print(f"deep_cnn: {cut['weighted_layers_removed']} weighted layers cut ({cut['layers_removed']} with their ReLUs)")

    rows = [figures(("lenet5", "lenet5 pruned"), *lenet, budget, (x_test, y_test)),
            figures(("deep_cnn", "deep_cnn cut"), *deep, budget, (x_test, y_test))]
    print()
    print(table(rows))
    for r in rows:
        if r["trained"]:
            drop = 100 * (r["base"]["accuracy"] - r["small"]["accuracy"])
            print(f"{r['pair'][1]}: accuracy loss {drop:.2f} points on {len(y_test)} test images")
        else:
            print(f"{r['pair'][1]}: built here from an untrained model (pass the files for accuracies)")
    result = {"benchmark": "structured", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "budget": vars(budget), "rounds": ROUNDS, "machine": facts, "lenet5_units_removed": removed,
              "deep_cut": cut, "pairs": rows, "seconds": time.perf_counter() - started}
    write_json(args.json, result)
    print(f"\n{result['seconds']:.0f} s; wrote {args.json}")


if __name__ == "__main__":
    main()
