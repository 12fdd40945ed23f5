"""How fast are k-means and Huffman coding? Kernels against their references, in one run.

1. The k-means assignment step on LeNet-5's fc1 (400,000 weights, k = 32 and
   k = 256): the Numba binary-search kernel (`clustering.assign`) against the
   NumPy reference (`clustering.assign_ref`, brute-force argmin, the definition)
   and against np.searchsorted on the midpoints (the best plain-NumPy way).
   Validated first: all three give the same labels.
2. A whole k-means (linear init, Lloyd to convergence) of fc1 at k = 32.
3. Huffman coding of fc1's weight indices (k = 32, as the pipeline stores
   them, unpruned): encode (NumPy) and decode (Numba kernel and, on a slice,
   the Python reference), in millions of symbols per second, with the bits
   per symbol against the entropy.

Weights: those of --model (a trained LeNet-5) or a fresh LeNet-5's.
Every figure is the median over repeats after warm-up (bench/common.py).

    python bench/bench_sharing.py [--quick] [--threads N] [--threading MODE] [--model lenet5.npz] [--json PATH]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree, not an installed copy

import numpy as np  # noqa: E402

import minicnn  # noqa: E402
from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, machine_facts, parse_run_args, set_threads, write_json,
)
from minicnn.timing import FULL, QUICK, measure  # noqa: E402
from optim import sharing  # noqa: E402
from optim.sharing import clustering, huffman  # noqa: E402

REFERENCE_SLICE = 20_000  # symbols decoded by the pure-Python reference (it runs ~100x slower)


def fc1_weights(path):
    model = minicnn.load(path) if path else minicnn.zoo.lenet5(seed=0)
    return model.layers[5].params["W"].reshape(-1).astype(np.float64)


def searchsorted_assign(w, centroids):
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, w, side="left")


def bench_assign(w, budget):
    rows, out = [], []
    for k in (32, 256):
        centroids = clustering.init_centroids(w, k, "linear")
        labels = clustering.assign_ref(w, centroids)
        np.testing.assert_array_equal(clustering.assign(w, centroids), labels)
        np.testing.assert_array_equal(searchsorted_assign(w, centroids), labels)
        ref = measure(lambda: clustering.assign_ref(w, centroids), budget)
        ss = measure(lambda: searchsorted_assign(w, centroids), budget)
        nb = measure(lambda: clustering.assign(w, centroids), budget)
        rows.append((f"k = {k}", ref.median * 1e3, ss.median * 1e3, nb.median * 1e3,
                     ref.median / nb.median, ss.median / nb.median))
        out.append({"k": k, "n": w.size, "reference": ref.to_dict(), "searchsorted": ss.to_dict(),
                    "numba": nb.to_dict(), "speedup_vs_reference": ref.median / nb.median,
                    "speedup_vs_searchsorted": ss.median / nb.median})
    return rows, out


def bench_kmeans(w, budget):
    result = sharing.kmeans(w, 32)
    t = measure(lambda: sharing.kmeans(w, 32), budget)
    return {"k": 32, "iterations": len(result.objective), "seconds": t.to_dict()}


def bench_huffman(w, budget):
    labels = sharing.kmeans(w, 32).labels
    counts = np.bincount(labels, minlength=32)
    p = counts[counts > 0] / labels.size
    entropy = float(-(p * np.log2(p)).sum())
    lengths = huffman.code_lengths(counts)
    payload, bits = huffman.encode(labels, lengths)
    np.testing.assert_array_equal(huffman.decode(payload, lengths, labels.size), labels)
    head = labels[:REFERENCE_SLICE]
    head_payload, _ = huffman.encode(head, lengths)
    np.testing.assert_array_equal(huffman.decode_ref(head_payload, lengths, head.size), head)
    enc = measure(lambda: huffman.encode(labels, lengths), budget)
    dec = measure(lambda: huffman.decode(payload, lengths, labels.size), budget)
    ref = measure(lambda: huffman.decode_ref(head_payload, lengths, head.size), budget)
    rate = {"encode": labels.size / enc.median / 1e6, "decode": labels.size / dec.median / 1e6,
            "decode_ref": head.size / ref.median / 1e6}
    rows = [(name, value) for name, value in rate.items()]
    return rows, {"symbols": labels.size, "bits_per_symbol": bits / labels.size, "entropy": entropy,
                  "msymbols_per_s": rate, "encode": enc.to_dict(), "decode": dec.to_dict(),
                  "decode_ref": ref.to_dict(), "decode_speedup": rate["decode"] / rate["decode_ref"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(parser, "sharing", "short timings (a smoke test)")
    parser.add_argument("--model", default=None, help="a trained LeNet-5 file (default: fresh weights)")
    args = parse_run_args(parser, argv)
    set_threads(args.threads)
    budget = QUICK if args.quick else FULL
    w = fc1_weights(args.model)

    rows, assign = bench_assign(w, budget)
    print(f"\n1. k-means assignment of LeNet-5 fc1 ({w.size:,} weights), ms per pass")
    print(format_table(["", "reference", "searchsorted", "numba", "x reference", "x searchsorted"], rows))

    km = bench_kmeans(w, budget)
    print(f"\n2. k-means of fc1, k = 32, linear init: {km['iterations']} Lloyd iterations, "
          f"{km['seconds']['median_s']:.3f} s")

    rows, huff = bench_huffman(w, budget)
    print(f"\n3. Huffman coding of fc1's {huff['symbols']:,} weight indices (k = 32): "
          f"{huff['bits_per_symbol']:.3f} bits/symbol, entropy {huff['entropy']:.3f}")
    print(format_table(["", "M symbols/s"], rows))
    print(f"decode: Numba kernel {huff['decode_speedup']:.0f}x the Python reference")

    facts = machine_facts()
    print("\nmachine:\n" + format_facts(facts))
    write_json(args.json, {"assign": assign, "kmeans": km, "huffman": huff, "machine": facts,
                           "budget": "quick" if args.quick else "full"})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
