"""How fast is minicnn's own machinery, and how far is it from PyTorch?

Measured in one run, side by side:

1. Training throughput (samples/s) of LeNet-5 and the seed CNN at batch 64
   and 256: a full step is forward, cross-entropy, backward, Adam(1e-3).
2. Inference: batch-1 latency (ms per `model.predict`) and batch-256
   throughput (images/s).
3. The kernels on the zoo's conv shapes at batch 64: GFLOP/s of the fused
   conv (+ ReLU) + 2x2 max-pool that predict runs (`direct.conv_block`,
   2 * MACs of the conv), as a fraction of the float32 peak that a probe
   kernel measures in the same run (bench/peak.py); then training's: a
   Conv2D's forward (the direct conv, 2 * MACs) and backward (im2row, two
   GEMMs, dW and d(rows): 4 * MACs), which a conv without a 2x2 pool after
   it runs, and the conv + pool step that minicnn.convpool runs when one
   follows (forward and backward, 6 * MACs as the layers count them), next to
   numpy's float32 matrix product on 1024^3 and on each conv's forward GEMM
   shape. Max-pooling in GB/s.
4. If `import torch` works, the same networks and ops in PyTorch with the
   same number of threads as Numba uses, the same initial weights (checked:
   the logits agree), torch.optim.Adam and F.cross_entropy for training,
   torch.inference_mode() for inference. ONNX Runtime joins the inference
   figures if it is installed.

Every figure is the median over repeats after a warm-up that takes Numba's
compilation out (see bench/common.py). The speed ratio is always
torch time / minicnn time for the same work, so > 1 means minicnn is faster:
for throughput that is minicnn/torch, for latency torch_ms/minicnn_ms.
Ratios are more trustworthy than absolute figures on a shared machine: the
contestants are timed in interleaved rounds, so a busy spell slows both.

The data are random: shape and dtype are all that matter for speed.

    python bench/bench_substrate.py [--quick] [--threads N] [--threading MODE] [--no-torch] [--json PATH]
"""

import argparse
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this working tree's minicnn, not an installed copy

import numba  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import (  # noqa: E402
    add_run_args, format_facts, format_table, load_average, machine_facts, num, parse_run_args, pct, set_threads,
    write_json,
)
from bench.peak import fma_peak  # noqa: E402
from minicnn.timing import FULL, QUICK, compare, measure  # noqa: E402
from minicnn import Conv2D, MaxPool2D, ReLU, convpool, direct, kernels, parallel, zoo  # noqa: E402
from minicnn.losses import cross_entropy  # noqa: E402
from minicnn.optimizers import Adam  # noqa: E402

NETWORKS = ("lenet5", "seed_cnn")
TRAIN_BATCHES = (64, 256)
INFER_BATCH = 256
KERNEL_BATCH = 64
CONVS = (  # name, in channels C, filters F, input size H (= W), kernel K, ReLU after it; stride 1, no padding
    ("lenet5 conv1", 1, 20, 28, 5, False),
    ("lenet5 conv2", 20, 50, 12, 5, False),
    ("seed_cnn conv", 1, 32, 28, 3, True),
)
POOLS = (  # name, input shape of a 2x2, stride-2 max-pool
    ("lenet5 pool1", (KERNEL_BATCH, 20, 24, 24)),
    ("lenet5 pool2", (KERNEL_BATCH, 50, 8, 8)),
    ("seed_cnn pool", (KERNEL_BATCH, 32, 26, 26)),
)


def random_batch(batch, seed=0):
    """Images in [0, 1) like MNIST's pixels, labels in 0..9."""
    rng = np.random.default_rng(seed)
    return rng.random((batch, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, batch, dtype=np.int64)


# --------------------------------------------------------------------------
# The contestants: each returns zero-argument functions that do one unit of work


class Minicnn:
    label = "minicnn"

    def train_step(self, name, x, y):
        model, opt = zoo.build(name, seed=0), Adam(1e-3)

        def step():
            z = model.forward(x)
            _, dz = cross_entropy(z, y)
            model.backward(dz)
            opt.step(model.layers)

        return step

    def infer(self, name, x):
        model = zoo.build(name, seed=0)
        return lambda: model.predict(x, batch_size=len(x))

    def conv_pool(self, x, W, b, relu):
        """What predict runs for a conv, its ReLU and its 2x2 max-pool: one fused kernel,
        checked against its float64 reference before it is timed."""
        xp, w = x.transpose(0, 2, 3, 1).copy(), direct.pack_filters(W, 1, True)
        out = direct.conv_block(xp, w, b, W.shape[0], W.shape[2], 1, relu, True)
        expected = direct.conv_block_ref(*(a.astype(np.float64) for a in (x, W, b)), 1, 0, relu, True)
        np.testing.assert_allclose(out.transpose(0, 3, 1, 2), expected, rtol=1e-4, atol=1e-4)
        return lambda: direct.conv_block(xp, w, b, W.shape[0], W.shape[2], 1, relu, True, out)

    @staticmethod
    def _conv(W, b):
        conv = Conv2D(W.shape[1], W.shape[0], W.shape[2])
        conv.params.update(W=W, b=b)
        return conv

    def conv_forward(self, x, W, b):
        """What training runs for a Conv2D with no 2x2 pool after it: the direct conv, to NCHW."""
        conv = self._conv(W, b)
        return lambda: conv.forward(x)

    def conv_backward(self, x, W, b, dout):
        """Its backward: im2row of the kept input, two GEMMs and row2im."""
        conv = self._conv(W, b)
        conv.forward(x)
        return lambda: conv.backward(dout)

    def conv_pool_step(self, x, W, b, relu, dout):
        """What training runs for a conv, its ReLU and its 2x2 max-pool: minicnn.convpool's step,
        forward and backward (dx too), checked against the layers one by one before it is timed."""
        layers = [self._conv(W, b), *([ReLU()] if relu else []), MaxPool2D(2)]
        (step,) = convpool.training_steps(layers)
        expected = x
        for layer in layers:
            expected = layer.forward(expected)
        np.testing.assert_array_equal(step.forward(x), expected)

        def run():
            step.forward(x)
            step.backward(dout)

        return run

    def gemm(self, a, w):
        return lambda: a @ w.T  # the conv forward's product: rows @ W.reshape(F, -1).T


class Torch:
    """The same architectures in PyTorch, started from minicnn's initial weights."""

    label = "torch"

    def __init__(self, threads):
        import torch
        import torch.nn.functional as F
        from torch import nn

        self.torch, self.F, self.nn = torch, F, nn
        torch.set_num_threads(threads)  # a fair fight: as many cores as minicnn's Numba uses
        self.version, self.threads = torch.__version__, torch.get_num_threads()

    def build(self, name):
        nn = self.nn
        if name == "lenet5":  # no ReLU after the convs, as in Caffe's LeNet
            net = nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))
        elif name == "seed_cnn":
            net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Flatten(), nn.Linear(32 * 13 * 13, 10))
        else:
            raise ValueError(f"no PyTorch twin for {name!r}")
        self.copy_weights(zoo.build(name, seed=0), net)
        return net

    def copy_weights(self, model, net):
        torch = self.torch
        ours = [layer for layer in model.layers if layer.params]
        theirs = [m for m in net if isinstance(m, (self.nn.Conv2d, self.nn.Linear))]
        with torch.no_grad():
            for layer, module in zip(ours, theirs, strict=True):
                W = layer.params["W"]
                if isinstance(module, self.nn.Linear):
                    W = W.T  # minicnn's Dense is x @ W (in, out); torch's Linear is x @ W.T
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(W)))
                module.bias.copy_(torch.from_numpy(layer.params["b"]))

    def logits_difference(self, name, x):
        """Largest |logit difference| between minicnn and the twin: ~1e-6 if the architectures match."""
        with self.torch.inference_mode():
            theirs = self.build(name)(self.torch.from_numpy(x)).numpy()
        return float(np.abs(zoo.build(name, seed=0).forward(x) - theirs).max())

    def train_step(self, name, x, y):
        torch, F = self.torch, self.F
        net = self.build(name).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(xt), yt).backward()
            opt.step()

        return step

    def infer(self, name, x):
        net, xt = self.build(name).eval(), self.torch.from_numpy(x)

        def run():
            with self.torch.inference_mode():
                net(xt)

        return run

    def conv_pool(self, x, W, b, relu):
        xt, Wt, bt = map(self.torch.from_numpy, (x, W, b))
        F = self.F

        def run():
            with self.torch.inference_mode():
                out = F.conv2d(xt, Wt, bt)
                F.max_pool2d(F.relu(out) if relu else out, 2)

        return run

    def conv_forward(self, x, W, b):
        xt, Wt, bt = map(self.torch.from_numpy, (x, W, b))

        def run():
            with self.torch.inference_mode():
                self.F.conv2d(xt, Wt, bt)

        return run

    def conv_pool_step(self, x, W, b, relu, dout):
        """conv, ReLU, max-pool forward and their backward through autograd (dx too)."""
        torch, F = self.torch, self.F
        xt, Wt, bt, dt = (torch.from_numpy(a).requires_grad_(a is not dout) for a in (x, W, b, dout))

        def run():
            y = F.conv2d(xt, Wt, bt)
            F.max_pool2d(F.relu(y) if relu else y, 2).backward(dt)

        return run

    def conv_backward(self, x, W, b, dout):
        """dx, dW and db at once, like minicnn's conv2d_backward (no forward inside)."""
        xt, Wt, dt = map(self.torch.from_numpy, (x, W, dout))
        backward = self.torch.ops.aten.convolution_backward

        def run():
            with self.torch.inference_mode():
                backward(dt, xt, Wt, [W.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])

        return run

    def gemm(self, a, w):
        at, wt = self.torch.from_numpy(a), self.torch.from_numpy(w)
        return lambda: at @ wt.T


class OnnxRuntime:
    """Inference only, on the PyTorch twins exported to ONNX (done here, so that a
    failing export drops this contestant at the start instead of mid-run)."""

    label = "onnxruntime"

    def __init__(self, torch_side, threads):
        import onnxruntime as ort

        self.ort, self.version = ort, ort.__version__
        self.sessions = {name: self.session(torch_side, name, threads) for name in NETWORKS}

    def session(self, torch_side, name, threads):
        torch, buf = torch_side.torch, io.BytesIO()
        torch.onnx.export(torch_side.build(name).eval(), (torch.zeros(1, 1, 28, 28),), buf,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}}, dynamo=False)
        opts = self.ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        return self.ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])

    def infer(self, name, x):
        session = self.sessions[name]
        return lambda: session.run(None, {"x": x})


# --------------------------------------------------------------------------
# Figures


def speed_ratio(timings, other, ours="minicnn"):
    """other's time / our time for the same work: > 1 means minicnn is faster."""
    if other not in timings:
        return None
    return timings[other].median / timings[ours].median


def record(figure, unit, value, timings, **extra):
    """One row for the table and the JSON: value(seconds) turns a median into the figure."""
    return {
        "figure": figure,
        "unit": unit,
        "value": {label: value(t.median) for label, t in timings.items()},
        "speed_ratio": {label: speed_ratio(timings, label) for label in timings if label != "minicnn"},
        "timing": {label: t.to_dict() for label, t in timings.items()},
        **extra,
    }


def network_figures(sides, budget):
    rows = []
    for name in NETWORKS:
        for batch in TRAIN_BATCHES:
            x, y = random_batch(batch)
            fns = {s.label: s.train_step(name, x, y) for s in sides if hasattr(s, "train_step")}
            rows.append(record(f"{name} train b{batch}", "samples/s", lambda t, b=batch: b / t,
                               compare(fns, budget), batch=batch))
        for batch in (1, INFER_BATCH):
            x, _ = random_batch(batch)
            timings = compare({s.label: s.infer(name, x) for s in sides}, budget)
            if batch == 1:
                rows.append(record(f"{name} infer b1 latency", "ms", lambda t: 1e3 * t, timings, batch=1))
            else:
                rows.append(record(f"{name} infer b{batch}", "images/s", lambda t, b=batch: b / t,
                                   timings, batch=batch))
    return rows


def conv_case(C, F, H, K, N=KERNEL_BATCH, seed=0):
    rng = np.random.default_rng(seed)
    Ho = H - K + 1
    x = rng.random((N, C, H, H), dtype=np.float32)
    W = rng.standard_normal((F, C, K, K), dtype=np.float32) / np.float32(np.sqrt(C * K * K))
    b = rng.standard_normal(F, dtype=np.float32)
    dout = rng.standard_normal((N, F, Ho, Ho), dtype=np.float32)
    macs = N * F * Ho * Ho * C * K * K
    return x, W, b, dout, macs


def gflops(flops):
    return lambda t: flops / t / 1e9


def kernel_figures(sides, budget, peak):
    """Conv forward/backward and the GEMMs beneath them, in GFLOP/s; the fused inference
    convs also as a fraction of `peak`, the probe's GFLOP/s."""
    rows = []
    a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    rows.append(record("GEMM 1024^3", "GFLOP/s", gflops(2 * 1024**3),
                       compare({s.label: s.gemm(a, a) for s in sides}, budget), shape="1024x1024x1024"))
    for name, C, F, H, K, relu in CONVS:
        x, W, b, dout, macs = conv_case(C, F, H, K)
        shape = f"{x.shape[0]}x{C}x{H}x{H} * {F}x{C}x{K}x{K}"
        fused = compare({s.label: s.conv_pool(x, W, b, relu) for s in sides}, budget)
        # The peak of the threads the kernel ran on: below its break-even it runs on one.
        threads = numba.get_num_threads() if parallel.runs_threaded(macs, parallel.MIN_MACS) else 1
        of_peak = 2 * macs / fused["minicnn"].median / 1e9 / (peak * threads / numba.get_num_threads())
        rows.append(record(f"{name}{' + relu' if relu else ''} + pool, predict's", "GFLOP/s", gflops(2 * macs),
                           fused, shape=shape, macs=macs, threads=threads, fraction_of_peak=of_peak))
        fwd = compare({s.label: s.conv_forward(x, W, b) for s in sides}, budget)
        bwd = compare({s.label: s.conv_backward(x, W, b, dout) for s in sides}, budget)
        # The forward's GEMM alone, same shapes: rows (N*Ho*Wo, C*K*K) @ W (F, C*K*K).T
        M, Kd = dout.shape[0] * dout.shape[2] * dout.shape[3], C * K * K
        rows_, w = np.random.default_rng(1).random((M, Kd), dtype=np.float32), W.reshape(F, -1)
        gemm = compare({s.label: s.gemm(rows_, w) for s in sides}, budget)
        of_gemm = gemm["minicnn"].median / fwd["minicnn"].median
        rows.append(record(f"{name} fwd", "GFLOP/s", gflops(2 * macs), fwd, shape=shape, macs=macs,
                           fraction_of_own_gemm=of_gemm))
        rows.append(record(f"{name} bwd", "GFLOP/s", gflops(4 * macs), bwd, shape=shape, macs=macs))
        Ho = x.shape[2] - K + 1
        dpool = np.random.default_rng(2).standard_normal((x.shape[0], F, Ho // 2, Ho // 2)).astype(np.float32)
        step = compare({s.label: s.conv_pool_step(x, W, b, relu, dpool) for s in sides}, budget)
        rows.append(record(f"{name}{' + relu' if relu else ''} + pool, training step", "GFLOP/s", gflops(6 * macs),
                           step, shape=shape, macs=macs))
        rows.append(record(f"  GEMM of {name} fwd", "GFLOP/s", gflops(2 * macs), gemm, shape=f"{M}x{Kd}x{F}"))
    return rows


def pool_figures(budget):
    """Max-pool 2x2/2 in GB/s: bytes the kernel must read and write at least."""
    rows = []
    for name, shape in POOLS:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        out, arg = kernels.maxpool_forward(x, 2, 2)
        dout = np.ones_like(out)
        # forward reads x, writes out and argmax (int32); backward reads dout and argmax, writes dx
        fwd_bytes = x.nbytes + out.nbytes + arg.nbytes
        bwd_bytes = dout.nbytes + arg.nbytes + x.nbytes
        fwd = measure(lambda: kernels.maxpool_forward(x, 2, 2), budget)
        bwd = measure(lambda: kernels.maxpool_backward(dout, arg, x.shape), budget)
        rows.append({
            "figure": name, "shape": "x".join(map(str, shape)),
            "fwd_GBps": fwd_bytes / fwd.median / 1e9, "bwd_GBps": bwd_bytes / bwd.median / 1e9,
            "fwd_bytes": fwd_bytes, "bwd_bytes": bwd_bytes,
            "timing": {"fwd": fwd.to_dict(), "bwd": bwd.to_dict()},
        })
    return rows


# --------------------------------------------------------------------------
# Tables


def comparison_table(rows, labels, extras=()):
    """One row per figure: value per contestant, speed ratios, spreads; extras are
    (header, row -> cell) columns added at the end."""
    others = [label for label in labels if label != "minicnn"]
    headers = ["figure", "unit", *labels, *(f"speed vs {o}" for o in others), "spread", *(h for h, _ in extras)]
    body = []
    for r in rows:
        ratios = [r["speed_ratio"].get(o) for o in others]
        spreads = "/".join(pct(r["timing"][label]["spread"]) if label in r["timing"] else "-" for label in labels)
        body.append([r["figure"], r["unit"], *(r["value"].get(label) for label in labels),
                     *(f"{num(x)}x" if x else "-" for x in ratios), spreads, *(f(r) for _, f in extras)])
    return format_table(headers, body)


def pool_table(rows):
    headers = ["max-pool 2x2/2", "input", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s"]
    body = [[r["figure"], r["shape"], 1e3 * r["timing"]["fwd"]["median_s"], r["fwd_GBps"],
             1e3 * r["timing"]["bwd"]["median_s"], r["bwd_GBps"]] for r in rows]
    return format_table(headers, body)


# --------------------------------------------------------------------------
# Main


def contestants(use_torch, threads):
    """minicnn, plus PyTorch and ONNX Runtime when importable; notes say why one is missing."""
    sides, notes, info = [Minicnn()], [], {}
    torch_side = None
    if use_torch:
        try:
            torch_side = Torch(threads)
            sides.append(torch_side)
            info["torch"] = {"version": torch_side.version, "threads": torch_side.threads}
        except ImportError:
            notes.append("torch: not installed, comparison skipped")
    else:
        notes.append("torch: skipped (--no-torch)")
    if torch_side is not None:
        try:
            sides.append(OnnxRuntime(torch_side, threads))
            info["onnxruntime"] = {"version": sides[-1].version, "threads": threads}
        except ImportError:
            notes.append("onnxruntime: not installed, column omitted")
        except Exception as e:  # an optional extra: report why and carry on without it
            notes.append(f"onnxruntime: export or session failed ({type(e).__name__}: {e}), column omitted")
    return sides, notes, info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "substrate", "few short repeats: a ~20 s smoke run")  # torch follows --threads too
    p.add_argument("--no-torch", action="store_true", help="measure minicnn alone")
    args = parse_run_args(p, argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    started = time.perf_counter()
    kernels.maxpool_forward(np.zeros((1, 1, 2, 2), np.float32), 2, 2)  # starts Numba's pool: names its layer
    threads = set_threads(args.threads)
    sides, notes, info = contestants(not args.no_torch, threads)
    facts = {**machine_facts(), **{f"{k}_{f}": v for k, d in info.items() for f, v in d.items()}}
    print("machine:\n" + format_facts(facts), flush=True)
    print(f"budget: {budget.repeats} interleaved repeats of >= {budget.min_time * 1e3:.0f} ms after >= "
          f"{budget.warm_time * 1e3:.0f} ms warm-up; figures are medians", flush=True)
    if (facts["load_avg_1min"] or 0) > 0.5 * facts["usable_cores"]:
        print(f"warning: load average {facts['load_avg_1min']:.1f} on {facts['usable_cores']} cores: "
              "the machine is busy: figures drop and scatter, and so do ratios, since threads that "
              "wait for each other (PyTorch's OpenMP most) suffer most; a quiet machine or --threads 1 helps")
    for note in notes:
        print(note)

    result = {"benchmark": "substrate", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "quick": args.quick, "threads": threads, "budget": vars(budget), "machine": facts, "notes": notes}
    torch_side = next((s for s in sides if s.label == "torch"), None)
    if torch_side is not None:
        diffs = {name: torch_side.logits_difference(name, random_batch(8)[0]) for name in NETWORKS}
        result["torch_logits_max_abs_diff"] = diffs
        print("same weights, same logits? max |minicnn - torch|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))

    labels = [s.label for s in sides]
    result["networks"] = network_figures(sides, budget)
    print("\nnetworks (speed vs X = X's time / minicnn's time: > 1 means minicnn is faster; "
          "spread = IQR/median per column)")
    print(comparison_table(result["networks"], labels), flush=True)

    kernel_sides = [s for s in sides if hasattr(s, "gemm")]
    peak, peak_timing = fma_peak(budget)
    result["float32_peak"] = {"GFLOP/s": peak, "threads": threads, "timing": peak_timing.to_dict()}
    result["kernels"] = kernel_figures(kernel_sides, budget, peak)
    print(f"\nfloat32 peak (bench/peak.py's probe, {threads} threads): {num(peak)} GFLOP/s")
    print(f"kernels at batch {KERNEL_BATCH} (minicnn column = numpy for GEMM rows; predict's = the fused conv "
          "(+ relu) + 2x2 max-pool kernel; fwd = 2*MACs, bwd = 4*MACs, training step (convpool's forward and "
          "backward) = 6*MACs, the layers' dense count, of which the step's backward does a quarter; "
          "'of peak' = minicnn's speed / the probe's on as many threads as the kernel ran on; "
          "'of GEMM' = conv fwd speed / its own GEMM's speed)")
    extras = [("of peak", lambda r: pct(r.get("fraction_of_peak"))),
              ("of GEMM", lambda r: pct(r.get("fraction_of_own_gemm"))), ("shape", lambda r: r["shape"])]
    print(comparison_table(result["kernels"], [s.label for s in kernel_sides], extras), flush=True)

    result["pools"] = pool_figures(budget)
    print("\n" + pool_table(result["pools"]))

    result["seconds"] = time.perf_counter() - started
    result["load_avg_1min_at_end"] = load = load_average()
    write_json(args.json, result)
    print(f"\n{result['seconds']:.0f} s, load average {num(load)} at the end; wrote {args.json}")


if __name__ == "__main__":
    main()
