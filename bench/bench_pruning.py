"""Does pruning pay off in time? Sparse kernels against the dense ones, in one run.

1. LeNet-5's fc1 (800 -> 500) with 90% of its weights removed at random:
   `SparseDense.forward` (its 16-lane kernels: lanes_matmul at batch 1,
   blocked_matmul at 64, transposes included) against the dense product
   `x @ W + b` with numpy's BLAS (what CSRDense's dense path runs), then
   layer against layer: against Dense.forward (since session 12
   `direct.dense_block`, minicnn's own kernel, so that a zoo network's
   training step calls no BLAS),
   at batch 1 and 64, timed in interleaved rounds. Target: >= 3x. Twice: with the threads of the run
   (BLAS spreads batch 64 over both cores; the sparse kernels run on one,
   as waking Numba's workers costs more than half of their work), then with
   one thread each, kernel against kernel on one core (needs threadpoolctl
   to hold BLAS to one thread).
2. Density sweep: the same two (at batch 1, 2, 4, 16, 64), and LeNet-5's
   convolutions (sparse direct convolution against Conv2D.forward, the
   direct conv since session 12, at batch 1 and 64), over densities 1%..70%: where the sparse kernel stops winning.
   `optim.sparse.csr_layer.SPARSE_BELOW` holds the thresholds the layers use at each
   batch size; the table shows both.
3. The whole LeNet-5 forward at batch 1 and 64: dense against the pruned,
   sparse model (global magnitude pruning, 92%, of --model or of a freshly
   initialised LeNet-5). Target at batch 1: faster.

Every time is the median over repeats after warm-up (bench/common.py);
ratios are dense time / sparse time, > 1 means the sparse side is faster.
Beside the ratio of medians, "best" is the ratio of the fastest repeats: on a
shared machine a repeat is only ever slowed down, never sped up, so the
fastest is the closest to the uncontended cost (timeit's argument). The
density sweep uses that ratio; the medians are in the JSON.

    python bench/bench_pruning.py [--quick] [--threads N] [--threading MODE] [--model lenet5.npz] [--json PATH]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree, not an installed copy

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, has_threadpoolctl, machine_facts, parse_run_args, pct, set_threads,
    write_json,
)
from minicnn.timing import FULL, QUICK, compare  # noqa: E402
from minicnn import Conv2D, Dense  # noqa: E402
from optim import pruning, sparse  # noqa: E402
from optim.sparse import SparseConv2D, SparseDense, csr_layer  # noqa: E402

DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)
BATCHES = (1, 64)
SHAPES = {  # layer, input per sample, batches of the density sweep (fc1's threshold moves most with the batch)
    "fc1 800x500": (lambda: Dense(800, 500, rng=0), (800,), (1, 2, 4, 16, 64)),
    "conv1 1->20 5x5 @28": (lambda: Conv2D(1, 20, 5, rng=0), (1, 28, 28), BATCHES),
    "conv2 20->50 5x5 @12": (lambda: Conv2D(20, 50, 5, rng=0), (20, 12, 12), BATCHES),
}


def with_density(layer, density, seed=0):
    """The layer with exactly round(density * size) weights kept, chosen at random."""
    W = layer.params["W"]
    keep = np.zeros(W.size, dtype=bool)
    keep[np.random.default_rng(seed).permutation(W.size)[: round(density * W.size)]] = True
    W[~keep.reshape(W.shape)] = 0
    return layer


def best(timing):
    return min(timing.times)


def sparse_twin(layer):
    return (SparseDense if isinstance(layer, Dense) else SparseConv2D).from_dense(layer)


def forced_sparse(fn):
    """Run fn with the layers' thresholds lifted, so the sparse kernel runs at any density."""
    saved = dict(csr_layer.SPARSE_BELOW)
    csr_layer.SPARSE_BELOW.update({k: {1: 2.0} for k in saved})
    try:
        return fn()
    finally:
        csr_layer.SPARSE_BELOW.update(saved)


def compare_layer(layer, in_shape, batch, budget):
    """(dense seconds, sparse seconds) for one forward of `layer` and its sparse twin, after validating."""
    x = np.random.default_rng(1).random((batch, *in_shape), dtype=np.float32)
    twin = sparse_twin(layer)
    expected = layer.forward(x)
    ours = forced_sparse(lambda: twin.forward(x))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)
    # Interleaved rounds, as everywhere else; the dense layer does not read SPARSE_BELOW.
    timings = forced_sparse(lambda: compare({"dense": lambda: layer.forward(x), "sparse": lambda: twin.forward(x)},
                                            budget))
    return timings["dense"], timings["sparse"]


def bench_fc1(budget, threads):
    """Kernel against kernel (the product and bias: BLAS against the sparse kernel SparseDense picks),
    then layer against layer (Dense.forward against SparseDense.forward: input checks added)."""
    rows, out = [], []
    threads_label = f"{threads} thread{'s' * (threads > 1)}"
    for batch in BATCHES:
        layer = with_density(Dense(800, 500, rng=0), 0.1)
        W, b = layer.params["W"], layer.params["b"]
        x = np.random.default_rng(1).random((batch, 800), dtype=np.float32)
        twin = sparse_twin(layer)
        assert twin.uses_sparse_kernel(batch), "at 10% density SparseDense should pick its sparse kernel"
        np.testing.assert_allclose(twin.forward(x), x @ W + b, rtol=1e-4, atol=1e-4)

        def dense():
            y = x @ W
            y += b
            return y

        pairs = {"kernel": (dense, lambda: twin.sparse_forward(x)),
                 "layer": (lambda: layer.forward(x), lambda: twin.forward(x))}
        for level, (dense_fn, sparse_fn) in pairs.items():
            timings = compare({"dense": dense_fn, "sparse": sparse_fn}, budget)  # interleaved rounds
            d, s = timings["dense"], timings["sparse"]
            rows.append((f"{level}, batch {batch}, {threads_label}", d.median * 1e6, s.median * 1e6,
                         d.median / s.median, best(d) / best(s), ">= 3" if level == "kernel" else ""))
            out.append({"level": level, "batch": batch, "threads": threads, "dense": d.to_dict(),
                        "sparse": s.to_dict(), "speedup": d.median / s.median, "speedup_best": best(d) / best(s)})
    return rows, out


def bench_sweep(budget, densities):
    rows, out = [], []
    for name, (make, in_shape, batches) in SHAPES.items():
        family = "dense" if "fc" in name else "conv2d"
        for batch in batches:
            ratios = []
            for density in densities:
                d, s = compare_layer(with_density(make(), density), in_shape, batch, budget)
                ratios.append(best(d) / best(s))
                out.append({"layer": name, "batch": batch, "density": density, "dense_s": d.median,
                            "sparse_s": s.median, "speedup": d.median / s.median, "speedup_best": best(d) / best(s)})
            wins = [dens for dens, r in zip(densities, ratios) if r > 1]
            rows.append((f"{name}, batch {batch}", *ratios, pct(max(wins)) if wins else "-",
                         pct(sparse.sparse_below(family, batch))))
    return rows, out


def pruned_lenet5(path):
    model = minicnn.load(path) if path else minicnn.zoo.lenet5(seed=0)
    masks = pruning.global_masks(model, 0.92)
    pruned = model.copy()
    pruning.apply_masks(pruned, masks)
    return model, sparse.to_sparse(pruned), pruned


def bench_model(budget, path):
    dense_model, sparse_model, pruned = pruned_lenet5(path)
    rows, out = [], []
    for batch in BATCHES:
        x = np.random.default_rng(2).random((batch, 1, 28, 28), dtype=np.float32)
        np.testing.assert_allclose(sparse_model.forward(x), pruned.forward(x), rtol=1e-4, atol=1e-4)
        timings = compare({"dense": lambda: dense_model.forward(x), "sparse": lambda: sparse_model.forward(x)}, budget)
        d, s = timings["dense"], timings["sparse"]
        rows.append((f"batch {batch}", d.median * 1e6, s.median * 1e6, d.median / s.median, best(d) / best(s),
                     "> 1 at batch 1"))
        out.append({"batch": batch, "dense": d.to_dict(), "sparse": s.to_dict(), "speedup": d.median / s.median,
                    "speedup_best": best(d) / best(s)})
    kernels_used = {f"{i}: {type(layer).__name__}": "/".join("sparse" if layer.uses_sparse_kernel(n) else "dense"
                                                            for n in BATCHES)
                    for i, layer in enumerate(sparse_model.layers) if hasattr(layer, "uses_sparse_kernel")}
    return rows, out, kernels_used, sparse_model.summary()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "pruning", "short timings, fewer densities (a smoke test)")
    parser.add_argument("--model", default=None, help="a trained LeNet-5 file to prune for part 3")
    args = parse_run_args(parser, argv)
    threads = set_threads(args.threads)
    budget = QUICK if args.quick else FULL
    densities = (0.05, 0.1, 0.3, 0.5) if args.quick else DENSITIES

    fc_rows, fc = bench_fc1(budget, threads)
    if threads > 1 and has_threadpoolctl():
        set_threads(1)
        rows, more = bench_fc1(budget, 1)
        fc_rows, fc = fc_rows + rows, fc + more
        set_threads(threads)
    print("\n1. fc1 800x500 at 90% sparsity: x @ W + b (BLAS) against SparseDense.forward (16-lane kernels)")
    print(format_table(["", "dense us", "sparse us", "speedup", "best", "target"], fc_rows))

    sweep_rows, sweep = bench_sweep(budget, densities)
    print("\n2. Speedup of the sparse kernel by density (fastest dense repeat / fastest sparse repeat)")
    print(format_table(["layer", *(pct(d) for d in densities), "wins up to", "SPARSE_BELOW"], sweep_rows))

    model_rows, model, kernels_used, summary = bench_model(budget, args.model)
    print(f"\n3. LeNet-5 forward, dense against 92% pruned ({args.model or 'fresh weights'})")
    print(summary)
    print(f"kernels at batch {'/'.join(map(str, BATCHES))}: " + ", ".join(f"{k} {v}" for k, v in kernels_used.items()))
    print(format_table(["", "dense us", "sparse us", "speedup", "best", "target"], model_rows))

    facts = machine_facts()
    print("\nmachine:\n" + format_facts(facts))
    write_json(args.json, {"fc1_90": fc, "sweep": sweep, "lenet5_92": model, "kernels": kernels_used,
                           "sparse_below": csr_layer.SPARSE_BELOW, "machine": facts,
                           "threads": threads, "budget": "quick" if args.quick else "full"})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
