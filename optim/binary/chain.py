"""A binary network's small batch in one compiled call: its stages' serial kernels, back to back.

Why. Each of predict's stages is a Python call into Numba through a runner,
and a binary-input stage makes two (its input's signs, then the popcounts).
The XNOR LeNet-5 at batch 1 took 28 us in five steps (a layout step, conv1
9.8, conv2 7.1, fc1 5.2, fc2 2.7 us; the Zen 4 of session 17); its fc1 does
0.3 us of popcounts and its fc2 5,000 multiply-adds.

What. When every kernel of a batch would run serial under minicnn.parallel's
rule (at batch 1, for LeNet-5's binary networks), `network_chain` (what the
packed layers offer minicnn.inference) runs the stages as one Numba
function, each on the buffer the stage before wrote (float32, channels
last), in three kinds:

    FLOAT   every task of the stage's minicnn.chain plan row, in order (minicnn.chain.task): a
            Conv2D, whose packed weights first follow W (minicnn.chain.refresh_filters), a Dense,
            a layer that gives float params (minicnn.inference.float_params), or a real-input
            PackedBinaryConv2D on its decoded filters
    XNOR    xnor.window_signs' loops, then xnor_layer's: a binary-input PackedBinaryConv2D, or a
            binary-input PackedBinaryDense, each row a 1 x 1 image of K channels
    ADDSUB  addsub_dense's loops: a real-input PackedBinaryDense below addsub.ADDSUB_BELOW rows

They are the serial builds of the kernels the stages run, on the same
operands, so the output is the stages' bit for bit.

    plan  int64 (S, PLAN_COLUMNS): a stage's kind, its geometry (a FLOAT stage's minicnn.chain row)
          and its arrays' places: [start, stop) of each SLOT in one of four arrays, one per dtype
          (float32, uint32, uint16, int64), every stage's laid end to end (_Pools): the call's
          arguments are six arrays whatever the network
    raw   a tuple of the arrays read in place, two per stage: a float layer's W and b (W empty for
          a packed layer's decoded weights, which never change), a binary layer's alpha and b
"""

import numba
import numpy as np

from minicnn import direct
from minicnn.chain import PLAN_COLUMNS as STAGE_COLUMNS
from minicnn.chain import conv_stage, dense_at, dense_stage, refresh_filters, task
from minicnn.checks import check_kernel_array
from minicnn.inference import float_params
from minicnn.parallel import MIN_MACS, runs_threaded

from . import addsub, xnor

__all__ = ["network_chain"]

FLOAT, XNOR, ADDSUB = range(3)
KIND, GEOMETRY = 0, 1  # columns: the kind, then the geometry (STAGE_COLUMNS of them)
X, OUT, PACKED, SOURCE, SUMS, BETA, BITS, LINES, AT, OFF = range(10)  # the slots
SLOTS = GEOMETRY + STAGE_COLUMNS  # slot k's start and stop are columns SLOTS + 2 k and SLOTS + 2 k + 1
PLAN_COLUMNS = SLOTS + 2 * 10
POOLS = (np.float32, np.uint32, np.uint16, np.int64)  # X .. BETA are float32, BITS uint32 or uint16, AT, OFF int64


@numba.njit(inline="always", cache=True)
def _slot(pool, row, k):
    return pool[row[SLOTS + 2 * k] : row[SLOTS + 2 * k + 1]]


@numba.njit(cache=True)
def _run(plan, f32, u32, u16, i64, raw):
    """The stages of plan in order (module docstring)."""
    for s in range(plan.shape[0]):
        row = plan[s]
        x, out, first, second = _slot(f32, row, X), _slot(f32, row, OUT), raw[2 * s], raw[2 * s + 1]
        if row[KIND] == FLOAT:
            stage, w = row[GEOMETRY:SLOTS], first
            if row[SLOTS + 2 * PACKED + 1] > row[SLOTS + 2 * PACKED]:  # a conv, on packed weights
                w = _slot(f32, row, PACKED)
                if first.size:  # a layer's W, which training changes in place
                    refresh_filters(stage, first, _slot(f32, row, SOURCE), w)
            at = _slot(i64, row, AT)
            for t in range(stage[1]):
                task(stage, t, x, w, second, at, out)
        elif row[KIND] == XNOR:
            N, Hp, Wp, C, K = row[GEOMETRY], row[GEOMETRY + 1], row[GEOMETRY + 2], row[GEOMETRY + 3], row[GEOMETRY + 4]
            S, F, relu, pool, n = row[GEOMETRY + 5], row[GEOMETRY + 6], row[GEOMETRY + 7], row[GEOMETRY + 8], \
                row[GEOMETRY + 9]
            Ho, Wo, side = (Hp - K) // S + 1, (Wp - K) // S + 1, 2 if pool else 1
            lines, beta = _slot(u32, row, LINES), _slot(f32, row, BETA)
            xnor.window_signs_serial(x.reshape((N, Hp, Wp, C)), K, K, S,
                                     lines.reshape((N, Hp, Wo, lines.size // (N * Hp * Wo))), _slot(f32, row, SUMS), beta)
            xnor.xnor_layer_serial(lines, _slot(i64, row, AT), _slot(i64, row, OFF), _slot(u32, row, BITS), n, beta,
                                   first, second, Ho, Wo, relu != 0, pool != 0,
                                   out.reshape((N, Ho // side, Wo // side, F)))
        else:
            N, n, F, relu = row[GEOMETRY], row[GEOMETRY + 1], row[GEOMETRY + 2], row[GEOMETRY + 3]
            lanes = _slot(u16, row, BITS)
            addsub.addsub_dense_serial(x.reshape((N, n)), lanes.reshape((lanes.size // n, n)), first, second, relu != 0,
                                       out.reshape((N, F)))


class _Pools:
    """Arrays laid end to end, one array per dtype of POOLS: add(a) gives a's [start, stop) in its own."""

    def __init__(self):
        self.parts = {np.dtype(t): [] for t in POOLS}
        self.sizes = dict.fromkeys(self.parts, 0)

    def add(self, a):
        a = np.ascontiguousarray(a).reshape(-1)
        start = self.sizes[a.dtype]
        self.parts[a.dtype].append(a)
        self.sizes[a.dtype] += a.size
        return start, start + a.size

    def arrays(self):
        return tuple(np.concatenate(parts) if parts else np.zeros(0, t) for t, parts in self.parts.items())


_EMPTY = np.zeros(0, np.float32)


def _stage(stage, x_shape):
    """(kind, geometry, {slot: array}, raw pair, load, output shape) of a Stage on inputs of x_shape
    (N, H, W, C), or None for a layer of none of the kinds. load: the largest of its kernels' work
    over their break-even (minicnn.parallel's rule)."""
    layer, conv, relu, pool = stage
    N, K = x_shape[0], int(np.prod(x_shape[1:]))
    if conv:
        F, k, S = layer.out_channels, layer.kernel_size, layer.stride
        if x_shape[3] != layer.in_channels:
            raise ValueError(f"{type(layer).__name__} expects {layer.in_channels} input channels, got {x_shape[3]}")
        out_shape = direct.output_shape(x_shape, F, k, S, pool)
    else:
        F, k, S = layer.out_features, 1, 1
        if K != layer.in_features:
            raise ValueError(f"{type(layer).__name__} expects {layer.in_features} input features, got {K}")
        out_shape = (N, F)
    params, binary = float_params(layer), getattr(layer, "binary_input", None)
    if params is not None and conv:
        W, b = _checked(stage, *params)
        slots = {PACKED: direct.pack_filters(W, S, pool), SOURCE: W}
        row, macs = conv_stage(x_shape, F, k, S, relu, pool)
        return FLOAT, row, slots, (W, b), macs / MIN_MACS, out_shape
    if params is not None:
        row, macs = dense_stage(N, K, F, relu)
        return FLOAT, row, {AT: dense_at(x_shape, F)}, _checked(stage, *params), macs / (MIN_MACS // 2), out_shape
    if binary is False and conv:  # its decoded weights, which never change
        row, macs = conv_stage(x_shape, F, k, S, relu, pool)
        return FLOAT, row, {PACKED: layer.filters(pool)}, (_EMPTY, layer.b), macs / MIN_MACS, out_shape
    if binary is False and N < addsub.ADDSUB_BELOW:
        slots = {BITS: layer.in_order("lanes", x_shape)}
        return ADDSUB, [N, K, F, int(relu)], slots, (layer.alpha, layer.b), N * K * F / MIN_MACS, out_shape
    if binary is True:
        xs = x_shape if conv else (N, 1, 1, K)
        lines, sums, beta = xnor.signs_work(xs, k, k, S)
        rows = xnor.window_rows(lines, k, S)
        slots = {SUMS: sums, BETA: beta, LINES: lines, BITS: layer.window_bits(x_shape), AT: rows.starts, OFF: rows.off}
        load = max(np.prod(xs) / xnor.MIN_STEPS, rows.starts.size * rows.off.size * F / xnor.MIN_WORDS)
        return XNOR, [*xs, k, S, F, int(relu), int(pool), layer.n], slots, (layer.alpha, layer.b), load, out_shape
    return None


def network_chain(stages, x_shape):
    """minicnn.inference's offer for a small batch: run(x) -> the last stage's output for x of x_shape
    (N, C, H, W) (a buffer the next call overwrites), the stages (minicnn.inference.Stage) as one
    compiled call; None where a stage is of none of the kinds (a real-input PackedBinaryDense from
    addsub.ADDSUB_BELOW rows on, a layer with a kernel of its own), a conv after the first is
    padded, or a kernel would run threaded (module docstring)."""
    N, C, H, W = x_shape
    if not stages[0].conv or any(s.conv and s.layer.padding for s in stages[1:]):
        return None
    P = stages[0].layer.padding
    shape = (N, H + 2 * P, W + 2 * P, C)
    pools, plan, given, loads = _Pools(), [], [], []
    acts = [pools.add(np.zeros(np.prod(shape), np.float32))]
    for stage in stages:
        made = _stage(stage, shape)
        if made is None:
            return None
        kind, geometry, slots, pair, load, shape = made
        acts.append(pools.add(np.zeros(np.prod(shape), np.float32)))
        row = np.zeros(PLAN_COLUMNS, np.int64)
        row[KIND], row[GEOMETRY : GEOMETRY + len(geometry)] = kind, geometry
        for k, where in ((X, acts[-2]), (OUT, acts[-1]), *((k, pools.add(a)) for k, a in slots.items())):
            row[SLOTS + 2 * k : SLOTS + 2 * k + 2] = where
        plan.append(row)
        given += pair
        loads.append(load)
    if runs_threaded(max(loads), 1):
        return None
    plan, arrays = np.array(plan), pools.arrays()
    inside = arrays[0][slice(*acts[0])].reshape(N, H + 2 * P, W + 2 * P, C)[:, P : H + P, P : W + P]
    out = arrays[0][slice(*acts[-1])].reshape(shape)
    if len(shape) == 4:  # a network that ends in a conv: NCHW, as predict's stages give it
        out = out.transpose(0, 3, 1, 2)
    floats = [s for s, stage in enumerate(stages) if float_params(stage.layer) is not None]
    raw = tuple(a.reshape(-1) for a in given)

    def run(x):
        nonlocal raw
        inside[...] = x.transpose(0, 2, 3, 1)
        for s in floats:  # a layer's arrays replaced since: checked once, then read in place
            W, b = float_params(stages[s].layer)
            if W is not given[2 * s] or b is not given[2 * s + 1]:
                given[2 * s : 2 * s + 2] = _checked(stages[s], W, b)
                raw = tuple(a.reshape(-1) for a in given)
        _run(plan, *arrays, raw)
        return out

    return run


def _checked(stage, W, b):
    """A float layer's (W, b), checked to be the float32 arrays of its geometry the kernels read."""
    layer = stage.layer
    if stage.conv:
        shape = (layer.out_channels, layer.in_channels, layer.kernel_size, layer.kernel_size)
        return check_kernel_array(W, "Conv2D weight", shape), check_kernel_array(b, "Conv2D bias", shape[:1])
    shape = (layer.in_features, layer.out_features)
    return check_kernel_array(W, "Dense weight", shape), check_kernel_array(b, "Dense bias", shape[1:])
