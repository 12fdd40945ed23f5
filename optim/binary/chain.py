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
    XNOR    windows.window_signs' loops, then xnor.xnor_layer's: a binary-input PackedBinaryConv2D, or a
            binary-input PackedBinaryDense, each row a 1 x 1 image of K channels
    ADDSUB  addsub_dense's loops: a real-input PackedBinaryDense below addsub.ADDSUB_BELOW rows

They are the serial builds of the kernels the stages run, on the same
operands, so the output is the stages' bit for bit.

    plan  int64 (S, PLAN_COLUMNS): a stage's kind, its geometry (a FLOAT stage's minicnn.chain row)
          and its arrays' places: [start, stop) of each slot in one of four arrays, one per dtype
          (float32, uint32, uint16, int64), every stage's laid end to end, each from a 64-byte
          boundary (_Pools): the call's arguments are six arrays whatever the network
    raw   a tuple of the arrays read in place, two per stage: a float layer's W and b (W empty for
          a packed layer's decoded weights), a binary layer's alpha and b. A float layer's follow
          the layer (training changes them); a packed layer's are fixed once it is packed, as in
          predict's stages.
"""

import numba
import numpy as np

from minicnn import direct, narrow, simd
from minicnn.chain import PLAN_COLUMNS as STAGE_COLUMNS
from minicnn.chain import conv_stage, dense_at, dense_stage, refresh_filters, task
from minicnn.inference import checked_params, float_params
from minicnn.parallel import MIN_MACS, runs_threaded

from . import addsub, windows, xnor

__all__ = ["Chain", "network_chain"]

FLOAT, XNOR, ADDSUB = range(3)
KIND, GEOMETRY = 0, 1  # columns: the kind, then the geometry (STAGE_COLUMNS of them)
SLOT_NAMES = ("X", "OUT", "PACKED", "SOURCE", "SUMS", "BETA", "BITS", "LINES", "AT", "OFF")
X, OUT, PACKED, SOURCE, SUMS, BETA, BITS, LINES, AT, OFF = range(len(SLOT_NAMES))
SLOTS = GEOMETRY + STAGE_COLUMNS  # slot k's start and stop are columns SLOTS + 2 k and SLOTS + 2 k + 1
PLAN_COLUMNS = SLOTS + 2 * len(SLOT_NAMES)
# X .. BETA are float32, BITS uint32 (XNOR) or uint16 (ADDSUB), LINES uint32, AT and OFF int64
POOLS = (np.float32, np.uint32, np.uint16, np.int64)


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
            windows.window_signs_serial(x.reshape((N, Hp, Wp, C)), K, K, S,
                                        lines.reshape((N, Hp, Wo, windows.line_slot(K, K, C))),
                                        _slot(f32, row, SUMS), beta)
            xnor.xnor_layer_serial(lines, _slot(i64, row, AT), _slot(i64, row, OFF), _slot(u32, row, BITS), n, beta,
                                   first, second, Ho, Wo, relu != 0, pool != 0,
                                   out.reshape((N, Ho // side, Wo // side, F)))
        else:
            N, n, F, relu = row[GEOMETRY], row[GEOMETRY + 1], row[GEOMETRY + 2], row[GEOMETRY + 3]
            lanes = _slot(u16, row, BITS)
            addsub.addsub_dense_serial(x.reshape((N, n)), lanes.reshape(((F + 15) // 16, n)), first, second,
                                       relu != 0, out.reshape((N, F)))


class _Pools:
    """Arrays laid end to end, one array per dtype of POOLS, each from a 64-byte boundary (where
    pack_filters puts a conv's weights: a vector load then reads one cache line, not two):
    add(a) gives a's [start, stop) in its dtype's array."""

    def __init__(self):
        self.parts = {np.dtype(t): [] for t in POOLS}  # dtype -> [(start, array)]
        self.sizes = dict.fromkeys(self.parts, 0)

    def add(self, a):
        a = np.ascontiguousarray(a).reshape(-1)
        if a.dtype not in self.parts:
            raise TypeError(f"a chain's arrays are {', '.join(map(str, self.parts))}: got {a.dtype}")
        start, line = self.sizes[a.dtype], 64 // a.dtype.itemsize
        self.parts[a.dtype].append((start, a))
        self.sizes[a.dtype] += -(-a.size // line) * line
        return start, start + a.size

    def arrays(self):
        arrays = []
        for dtype, parts in self.parts.items():
            pool = simd.aligned_empty(self.sizes[dtype] * dtype.itemsize // 4).view(dtype)
            pool[...] = 0  # the first input's border, and what the padding between parts holds
            for start, a in parts:
                pool[start : start + a.size] = a
            arrays.append(pool)
        return tuple(arrays)


_EMPTY = np.zeros(0, np.float32)


def _kind(stage, N):
    """FLOAT, XNOR or ADDSUB: how the chain runs a Stage on batches of N rows; None: it does not."""
    layer, binary = stage.layer, getattr(stage.layer, "binary_input", None)
    if float_params(layer) is not None or (binary is False and stage.conv):
        return FLOAT
    if binary is False and N < addsub.ADDSUB_BELOW:
        return ADDSUB
    return XNOR if binary is True else None


def _stage(stage, x_shape):
    """(kind, geometry, {slot: array}, raw pair, load, output shape) of a Stage on inputs of x_shape
    ((N, H, W, C), or (N, K) after a dense layer), the stage of one of the kinds (_kind). load: the
    largest of its kernels' work over their break-even (minicnn.parallel's rule)."""
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
    kind, params = _kind(stage, N), float_params(layer)
    if kind == FLOAT and conv:
        row, macs = conv_stage(x_shape, F, k, S, relu, pool)
        if params is None:  # a real-input packed conv: its decoded filters
            return kind, row, {PACKED: layer.filters(pool)}, (_EMPTY, layer.b), macs / MIN_MACS, out_shape
        W, b = checked_params(layer, True, *params)
        return kind, row, {PACKED: direct.pack_filters(W, S, pool), SOURCE: W}, (W, b), macs / MIN_MACS, out_shape
    if kind == FLOAT:
        row, macs = dense_stage(N, K, F, relu)
        even = narrow.NARROW_MIN_MACS if F <= narrow.MAX_OUTPUTS else direct.DENSE_MIN_MACS
        slots = {AT: dense_at(x_shape, F).astype(np.int64)}
        return kind, row, slots, checked_params(layer, False, *params), macs / even, out_shape
    if kind == ADDSUB:
        slots = {BITS: layer.in_order("lanes", x_shape)}
        return kind, [N, K, F, int(relu)], slots, (layer.alpha, layer.b), N * K * F / MIN_MACS, out_shape
    xs = x_shape if conv else (N, 1, 1, K)
    lines, sums, beta = windows.signs_work(xs, k, k, S)
    rows = windows.window_rows(lines, k, k, xs[3], S)
    wb = xnor.check_blocked(layer.window_bits(x_shape), F, rows.off.size)
    xnor.check_alpha(layer.alpha)
    slots = {SUMS: sums, BETA: beta, LINES: lines, BITS: wb, AT: rows.starts.astype(np.int64),
             OFF: rows.off.astype(np.int64)}
    load = max(np.prod(xs) / xnor.MIN_STEPS, rows.starts.size * rows.off.size * F / xnor.MIN_WORDS)
    return kind, [*xs, k, S, F, int(relu), int(pool), layer.n], slots, (layer.alpha, layer.b), load, out_shape


class Chain:
    """The stages (minicnn.inference.Stage) for inputs of x_shape (N, C, H, W) in one compiled call:
    chain(x) is the last stage's output (NCHW after a conv; a buffer the next call overwrites),
    while runs(): minicnn.parallel's rule runs every one of its kernels serial. One thread at a
    time (the buffers are the chain's). network_chain makes one where the stages allow it."""

    def __init__(self, stages, x_shape):
        N, C, H, W = x_shape
        P = stages[0].layer.padding
        shape = (N, H + 2 * P, W + 2 * P, C)
        pools, plan, self.given, loads = _Pools(), [], [], []
        acts = [pools.add(np.zeros(np.prod(shape), np.float32))]
        for stage in stages:
            kind, geometry, slots, pair, load, shape = _stage(stage, shape)
            acts.append(pools.add(np.zeros(np.prod(shape), np.float32)))
            row = np.zeros(PLAN_COLUMNS, np.int64)
            row[KIND], row[GEOMETRY : GEOMETRY + len(geometry)] = kind, geometry
            for k, where in ((X, acts[-2]), (OUT, acts[-1]), *((k, pools.add(a)) for k, a in slots.items())):
                row[SLOTS + 2 * k : SLOTS + 2 * k + 2] = where
            plan.append(row)
            self.given += pair
            loads.append(load)
        self.plan, self.arrays, self.load, self.stages = np.array(plan), pools.arrays(), max(loads), stages
        self.inside = self.arrays[0][slice(*acts[0])].reshape(N, H + 2 * P, W + 2 * P, C)[:, P : H + P, P : W + P]
        out = self.arrays[0][slice(*acts[-1])].reshape(shape)
        self.out = out.transpose(0, 3, 1, 2) if len(shape) == 4 else out  # a network that ends in a conv
        self.floats = [s for s, stage in enumerate(stages) if float_params(stage.layer) is not None]
        self.raw = tuple(a.reshape(-1) for a in self.given)

    def runs(self):
        """Whether minicnn.parallel's rule runs every kernel of the stages serial now."""
        return not runs_threaded(self.load, 1)

    def __call__(self, x):
        self.inside[...] = x.transpose(0, 2, 3, 1)
        for s in self.floats:  # a layer's arrays replaced since: checked once, then read in place
            stage, given = self.stages[s], self.given
            W, b = float_params(stage.layer)
            if W is not given[2 * s] or b is not given[2 * s + 1]:
                given[2 * s : 2 * s + 2] = checked_params(stage.layer, stage.conv, W, b)
                self.raw = tuple(a.reshape(-1) for a in given)
        _run(self.plan, *self.arrays, self.raw)
        return self.out


def network_chain(stages, x_shape):
    """minicnn.inference's offer for a small batch of x_shape (N, C, H, W): the stages as a Chain, or
    None where they make none (an empty batch, a first stage that is not a conv, a conv after the
    first that is padded, a stage of none of the kinds: a real-input PackedBinaryDense from
    addsub.ADDSUB_BELOW rows on, a layer with a kernel of its own) or where the rule runs one of
    their kernels threaded (module docstring)."""
    N = x_shape[0]
    if N == 0 or not stages[0].conv or any(s.conv and s.layer.padding for s in stages[1:]) or any(
            _kind(s, N) is None for s in stages):
        return None
    chain = Chain(stages, x_shape)
    return chain if chain.runs() else None
