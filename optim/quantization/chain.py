"""An int8 model's batch in compiled calls: its steps' kernels back to back, on groups of images.

Why. Each step of QuantizedModel.predict is a Python call into Numba: the
dispatcher checks a dozen arguments and the step allocates its output and
views its input. A GEMM of no rows costs 1.7 us that way, and LeNet-5's
predict at batch 1 made six such calls (quantize, conv1's shifted copies,
four GEMMs) and dequantized in NumPy: 40.8 us, 26.5 as one call (the seed
CNN 20.3 -> 11.1; the Zen 4 of session 16).

What. A Chain runs a model whose steps are all `ops.BoundGemm` (its convs,
each with its 2x2 pool or none, and its dense layers), ending in a dense
layer's int32 sums, as one Numba function:

    u      = the input quantized to its bytes, NHWC       (affine.quantize_nhwc's loops)
    u      = qgemm(words of u, layer s), s = 0 .. S - 2   (kernels.qgemm's loops; the words are u's
                                                           own, its shifted copies or im2row's rows
                                                           of it: BoundGemm)
    sums   = qgemm(words of u, layer S - 1), int32
    logits = float32(sums * S_in S_w)                     (QuantizedModel.dequantize_output)

These are the serial builds of the kernels the steps call, on the same
operands, so the output is the steps' bit for bit. A chain runs a whole
batch where every one of those kernels would run serial under
minicnn.parallel's rule (`runs`): at small batches, which is where the
calls cost most.

Big batches. With AVX-512 (MAPS), a chain bound to TASK_IMAGES images
(`map`) runs a batch of many such groups as one parallel loop, a group per
task: each task quantizes its images and runs every layer on them, its
buffers small enough to stay in the core's 1 MB L2 (the largest, LeNet-5's
conv2 rows, 16 x 64 x 500 bytes). The steps instead run one threaded kernel
after another, each writing the whole batch's output for the next to read
back (the seed CNN's shifted copies: 800 KB at batch 256). At batch 256 on
the Zen 4 of session 20, the seed CNN's predict took 387-451 us mapped
against 457-695 us as steps, LeNet-5's 2.05-2.12 ms against 2.15-2.30
(alternating rounds, three runs). (The float32 model's minicnn.chain is
another thing: one parallel loop whose tasks are stages of a small batch.)

    plan    int64 (S, PLAN_COLUMNS): per layer the qgemm window, its epilogue's z_out, lo, hi and F,
            where its words come from (OWN, COPIES, ROWS) and BoundGemm's rows (zeros for its
            copies)
    starts, offs, wps, wds, biases, tables
            the layers' qgemm operands (BoundGemm's, wp flattened; wd the narrow kernel's weights where
            the layer runs it, else none), each kind end to end in one array: layer s's are
            [at[s, k], at[s + 1, k]) of the k-th (at int64 (S + 1, 6)). Six arrays, not six tuples of
            S: the call's arguments cost 0.7 us to pass, not 1.9 (six tuples, in session 16).
    scale   float64 (F,): S_in S_w of the last layer's sums
"""

import numba
import numpy as np
from numba import prange

from minicnn.parallel import MIN_OUTPUTS, runs_threaded, twin
from minicnn.simd import HAS_PERMUTE

from .affine import quantize_nhwc_serial, quantize_work
from .kernels import qgemm_serial, uses_narrow
from .ops import BoundGemm
from .windows import im2row_nhwc_serial, shifted_copies_serial

__all__ = ["MAPS", "TASK_IMAGES", "Chain"]

WINDOW, Z_OUT, LO, HI, F_OUT, SOURCE, N_, H_, W_, C_, KH, KW, STRIDE, PAD, FILL, WIDTH = range(16)
PLAN_COLUMNS = 16
OWN, COPIES, ROWS = range(3)  # a layer's words: its input's bytes, their shifted copies, im2row's rows
TASK_IMAGES = 16  # images per task of Chain.map (the module's docstring)
# Where 16 int32 lanes take two registers (AVX2), the GEMM's serial build, which the chain runs,
# ran the seed CNN's conv on 64 images 1.54x slower than its threaded build on one thread (656 us
# against 427, session 20's Zen 4 forced to AVX2; with AVX-512, 148 against 150): mapped, the int8
# predicts at batch 256 took 1.3-1.5x as long as the steps. There predict keeps to the steps.
MAPS = HAS_PERMUTE  # AVX-512F


class Chain:
    """predict's batch of float inputs x (N, C, H, W) in one call, for `steps` (a QuantizedModel's,
    bound to the codes of x's shape) that are all BoundGemm, the last with int32 sums out and a 2-D
    output; scale float64 (F,) dequantizes the last layer's sums."""

    def __init__(self, steps, x_shape, scale):
        if not chains(steps):
            raise ValueError("a chain runs convs and dense layers (BoundGemm), ending in a dense layer's int32 sums")
        self.x_shape, self.scale = tuple(x_shape), np.asarray(scale, np.float64)
        self.plan = np.array([_plan_row(s) for s in steps], np.int64)
        kinds = [[s.starts, s.off, s.packed.wp.reshape(-1), _narrow_weights(s), s.epilogue.bias, s.epilogue.table]
                 for s in steps]
        self.at = np.zeros((len(steps) + 1, len(kinds[0])), np.int64)
        self.at[1:] = np.cumsum([[a.size for a in arrays] for arrays in kinds], axis=0)
        self.operands = tuple(np.concatenate(arrays) for arrays in zip(*kinds))
        for a in self.operands[:2]:
            a.flags.writeable = False  # as BoundGemm's starts and off: the kernels' one signature
        self.load = max(quantize_work(x_shape) / MIN_OUTPUTS, *(s.load for s in steps))  # see BoundGemm

    def runs(self):
        """Whether the chain runs now: every kernel of the steps would run serial (minicnn.parallel)."""
        return not runs_threaded(self.load, 1.0)

    def __call__(self, x, input_q):
        """float32 logits (N, F) of x (N, C, H, W) float, x.shape == x_shape (the kernels check no index),
        quantized with input_q = (S, Z) (the model's, read as its steps read it: at each call)."""
        if x.shape != self.x_shape:
            raise ValueError(f"this chain runs inputs of shape {self.x_shape}, got {x.shape}")
        x = np.ascontiguousarray(x, dtype=x.dtype if x.dtype == np.float32 else np.float64)  # as quantize_nhwc
        return _run(x, float(input_q[0]), int(input_q[1]), self.plan, self.at, *self.operands, self.scale)

    def map(self, x, input_q):
        """The chain on each group of B = x_shape[0] images of x (M B, C, H, W), as __call__: float32
        logits (M B, F), in one parallel loop over the groups when their work is worth it (`runs`'s rule)."""
        B = self.x_shape[0]
        if x.shape[1:] != self.x_shape[1:] or len(x) % B:
            raise ValueError(f"this chain maps groups of inputs of shape {self.x_shape}, got {x.shape}")
        x = np.ascontiguousarray(x, dtype=x.dtype if x.dtype == np.float32 else np.float64)
        out = np.empty((len(x), self.plan[-1, F_OUT]), np.float32)
        return _map(self.load * (len(x) // B), x, B, float(input_q[0]), int(input_q[1]), self.plan, self.at,
                    *self.operands, self.scale, out)


def chains(steps):
    """Whether a Chain runs these bound steps: all BoundGemm, codes out but for the last, whose int32
    sums come out 2-D (a dense layer's)."""
    return (len(steps) > 0 and all(isinstance(s, BoundGemm) for s in steps)
            and all(s.epilogue.table.size for s in steps[:-1])
            and steps[-1].epilogue.table.size == 0 and len(steps[-1].out_shape) == 2)


def _narrow_weights(step):
    """A BoundGemm's narrow weights, flattened, where its GEMM runs the narrow kernel; else none."""
    narrow = uses_narrow(step.packed, step.off, step.window)
    return step.packed.wd.reshape(-1) if narrow else np.zeros(0, np.int8)


def _plan_row(step):
    """A BoundGemm's row of the plan (the module's docstring)."""
    e = step.epilogue
    if step.copies is not None:
        source, geometry = COPIES, (0,) * 10
    else:
        source, geometry = (OWN, (0,) * 10) if step.rows is None else (ROWS, step.rows)
    return [step.window, e.z_out, e.lo, e.hi, e.F, source, *geometry]


@numba.njit(cache=True)
def _layer(u, p, at, starts, offs, wps, wds, biases, tables, out):
    """One layer's qgemm (plan row p, its operands from at[0] to at[1]) on the bytes u (flat) the layer
    before wrote, into out."""
    if p[SOURCE] == COPIES:
        x32 = shifted_copies_serial(u).reshape(-1).view(np.uint32)
    elif p[SOURCE] == ROWS:
        x32 = im2row_nhwc_serial(u.reshape((p[N_], p[H_], p[W_], p[C_])), p[KH], p[KW], p[STRIDE], p[PAD], p[FILL],
                                 p[WIDTH]).reshape(-1).view(np.uint32)
    else:
        x32 = u.view(np.uint32)
    a, b = at[0], at[1]
    qgemm_serial(x32, starts[a[0] : b[0]], p[WINDOW], offs[a[1] : b[1]], wps[a[2] : b[2]], wds[a[3] : b[3]],
                 biases[a[4] : b[4]], tables[a[5] : b[5]], p[Z_OUT], p[LO], p[HI], out)


@numba.njit(cache=True)
def _run(x, in_scale, in_zero, plan, at, starts, offs, wps, wds, biases, tables, scale):
    """The chain's logits float32 (N, F) of x float (N, C, H, W): see the module's docstring."""
    N, C, H, W = x.shape
    u = np.empty(x.size, np.uint8)
    quantize_nhwc_serial(x, in_scale, in_zero, 128, u.reshape((N, H, W, C)))
    last = plan.shape[0] - 1
    for s in range(last):
        rows = (at[s + 1, 0] - at[s, 0]) // plan[s, WINDOW]
        out = np.empty((rows, plan[s, F_OUT]), np.uint8)
        _layer(u, plan[s], at[s : s + 2], starts, offs, wps, wds, biases, tables, out)
        u = out.reshape(-1)
    sums = np.empty((at[last + 1, 0] - at[last, 0], plan[last, F_OUT]), np.int32)
    _layer(u, plan[last], at[last:], starts, offs, wps, wds, biases, tables, sums)
    logits = np.empty(sums.shape, np.float32)
    for n in range(sums.shape[0]):
        for f in range(sums.shape[1]):
            logits[n, f] = np.float32(sums[n, f] * scale[f])  # float64 product, one rounding: dequantize_output's
    return logits


def _map_loops(x, B, in_scale, in_zero, plan, at, starts, offs, wps, wds, biases, tables, scale, out):
    """out (M B, F) = _run on each group of B images of x (M B, C, H, W), one task per group."""
    for k in prange(len(x) // B):
        out[k * B : (k + 1) * B] = _run(x[k * B : (k + 1) * B], in_scale, in_zero, plan, at, starts, offs, wps,
                                        wds, biases, tables, scale)
    return out


_map = twin(_map_loops, 1.0)  # work: in units of each kernel's break-even, as Chain.load
