"""An int8 model's small batch in one compiled call: its steps' kernels, back to back.

Why. Each step of QuantizedModel.predict is a Python call into Numba: the
dispatcher checks a dozen arguments and the step allocates its output and
views its input. A GEMM of no rows costs 1.7 us that way, and LeNet-5's
predict at batch 1 makes seven such calls (quantize, four layers, the last
two with their copies, dequantize) in its 40 us.

What. A Chain runs a model whose steps are all `ops.BoundGemm` (convs whose
windows are read in place or as lines, each with its 2x2 pool or none, and
dense layers on rows of whole words), ending in a dense layer's int32 sums,
as one Numba function:

    u      = the input quantized to its bytes, NHWC       (affine.quantize_nhwc's loops)
    u      = qgemm(words of u, layer s), s = 0 .. S - 2   (kernels.qgemm's loops; the words are u's
                                                           own, or its shifted copies: kernels.shifted_copies)
    sums   = qgemm(words of u, layer S - 1), int32
    logits = float32(sums * S_in S_w)                     (QuantizedModel.dequantize_output)

These are the serial builds of the kernels the steps call, on the same
operands, so the output is the steps' bit for bit. The chain runs only
where every one of those kernels would run serial under minicnn.parallel's
rule (`runs`): at small batches, which is where the calls cost most.

    plan    int64 (S, PLAN_COLUMNS): per layer the qgemm window, its epilogue's z_out, lo, hi and F,
            whether its words are shifted copies, and the copies' N, H, W and width
    starts, offs, wps, biases, m0s, shifts
            the layers' qgemm operands (tuples of S arrays: BoundGemm's, wp flattened)
    scale   float64 (F,): S_in S_w of the last layer's sums
"""

import numba
import numpy as np

from minicnn.parallel import MIN_OUTPUTS, runs_threaded

from .affine import quantize_nhwc_serial
from .kernels import MIN_MACS, ROW_ALIGN, qgemm_serial, shifted_copies_serial
from .ops import BoundGemm

__all__ = ["Chain"]

WINDOW, Z_OUT, LO, HI, F_OUT, COPIES, N_, H_, W_, WIDTH = range(10)
PLAN_COLUMNS = 10


class Chain:
    """predict's batch of float inputs x (N, C, H, W) in one call, for `steps` (a QuantizedModel's,
    bound to x's shape) that are all BoundGemm, the last with int32 sums out and a 2-D output.
    input_q = (S, Z) of the model's input; scale float64 (F,) dequantizes the last layer's sums."""

    def __init__(self, steps, x_shape, input_q, scale):
        if not chains(steps):
            raise ValueError("a chain runs convs and dense layers whose windows are read in place or as lines "
                             "(BoundGemm), ending in a dense layer's int32 sums")
        self.x_shape, self.input_q, self.scale = tuple(x_shape), input_q, np.asarray(scale, np.float64)
        self.plan = np.array([[s.window, s.epilogue.z_out, s.epilogue.lo, s.epilogue.hi, s.epilogue.F,
                               s.copies is not None, *(s.copies or (0, 0, 0, 0))] for s in steps], np.int64)
        self.operands = (tuple(s.starts for s in steps), tuple(s.off for s in steps),
                         tuple(s.packed.wp.reshape(-1) for s in steps),
                         *(tuple(getattr(s.epilogue, name) for s in steps) for name in ("bias", "m0", "shift")))
        # the largest work / break-even among the kernels the steps run: one of them runs threaded iff
        # runs_threaded(load, 1) (the rule: work >= min_work, with more than one thread)
        N, C, H, W = self.x_shape
        loads = [2 * N * C * H * W / MIN_OUTPUTS]  # quantize_nhwc's elements read and written
        for s in steps:
            loads.append(s.starts.size * ROW_ALIGN * s.off.size * s.epilogue.F / MIN_MACS)  # qgemm_runner's work
            if s.copies is not None:
                loads.append(ROW_ALIGN * int(np.prod(s.copies[:3])) / MIN_OUTPUTS)  # shifted_copies'
        self.load = max(loads)

    def runs(self):
        """Whether the chain runs now: every kernel of the steps would run serial (minicnn.parallel)."""
        return not runs_threaded(self.load, 1.0)

    def __call__(self, x):
        """float32 logits (N, F) of x (N, C, H, W) float, x.shape == x_shape."""
        x = np.ascontiguousarray(x, dtype=x.dtype if x.dtype == np.float32 else np.float64)  # as quantize_nhwc
        return _run(x, self.input_q[0], self.input_q[1], self.plan, *self.operands, self.scale)


def chains(steps):
    """Whether a Chain runs these bound steps: all BoundGemm, codes out but for the last, whose int32
    sums come out 2-D (a dense layer's)."""
    return (len(steps) > 0 and all(isinstance(s, BoundGemm) for s in steps)
            and all(s.epilogue.m0.size for s in steps[:-1])
            and steps[-1].epilogue.m0.size == 0 and len(steps[-1].out_shape) == 2)


@numba.njit(cache=True)
def _layer(u, p, starts, off, wp, bias, m0, shift, out):
    """One layer's qgemm (plan row p) on the bytes u (flat) the layer before wrote, into out."""
    if p[COPIES]:
        x32 = shifted_copies_serial(u.reshape((p[N_], p[H_], p[W_])), p[WIDTH]).reshape(-1).view(np.uint32)
    else:
        x32 = u.view(np.uint32)
    qgemm_serial(x32, starts, p[WINDOW], off, wp, bias, m0, shift, p[Z_OUT], p[LO], p[HI], out)


@numba.njit(cache=True)
def _run(x, in_scale, in_zero, plan, starts, offs, wps, biases, m0s, shifts, scale):
    N, C, H, W = x.shape
    u = np.empty(x.size, np.uint8)
    quantize_nhwc_serial(x, in_scale, in_zero, 128, u.reshape((N, H, W, C)))
    last = plan.shape[0] - 1
    for s in range(last):
        out = np.empty((starts[s].size // plan[s, WINDOW], plan[s, F_OUT]), np.uint8)
        _layer(u, plan[s], starts[s], offs[s], wps[s], biases[s], m0s[s], shifts[s], out)
        u = out.reshape(-1)
    sums = np.empty((starts[last].size, plan[last, F_OUT]), np.int32)
    _layer(u, plan[last], starts[last], offs[last], wps[last], biases[last], m0s[last], shifts[last], sums)
    logits = np.empty(sums.shape, np.float32)
    for n in range(sums.shape[0]):
        for f in range(sums.shape[1]):
            logits[n, f] = np.float32(sums[n, f] * scale[f])  # float64 product, one rounding: dequantize_output's
    return logits
