"""Inference: the layers fused into stages, channels last, in buffers kept between calls.

`Sequential.forward` runs one layer (or conv and pool) at a time in NCHW and keeps what
backward needs. Inference needs none of that, so `Sequential.predict`
runs the same layers as stages:

    Conv2D [ReLU] [MaxPool2D(2)] [ReLU]   one direct conv (conv_block_runner): bias, ReLU and pool
                                          in its epilogue
    [Flatten] Dense [ReLU]                narrow.narrow_dense for at most 16 outputs (it reads a
                                          channels-last input in Flatten's order), else
                                          direct.dense_block (their runners); never BLAS, whose
                                          threads and Numba's would take turns at the cores
    any other layer                       its own forward, in NCHW

Activations stay channels last (N, H, W, C) from one conv stage to the next,
so no layer transposes its input or output. Each stage writes into a buffer
it keeps for the next call: a new buffer of a few MB costs a page fault per
4 KB, and at batch 1 the whole network takes tens of microseconds.

A conv stage reads its weights in direct.pack_filters' layout. It keeps the
packed copy with a copy of the weights it came from, and packs again when
they differ bit for bit (training and pruning change weights in place, so
nothing short of looking can tell): comparing is a contiguous read, a fifth
of the time packing takes.

The first call with inputs of a shape binds the stages to it: each stage's
buffers and its kernel's sizes are worked out once (direct's and narrow's
*_runner functions), and later calls of that shape run only the bound
steps (kept for the last MAX_BOUND shapes). At batch 1 the checks and sizes
of every kernel call cost as much as a small layer's arithmetic.

A batch below CHAIN_BATCH of a network of float32 Conv2D stages (padded in
the first alone) and Dense stages runs as one step: minicnn.chain, every
stage's tasks in a single parallel loop, when there is work enough to run
threaded (at batch 1, every threaded kernel paid a few microseconds to start
its loop: LeNet-5's predict went 63 -> 52 us). Its tasks are the stages' own
kernels, so the numbers are the same bits. A layer of another class joins
a chain if its chain_params() gives (W, b) in the float layer's layout
(float32, kept between calls while they do not change): optim's weight-shared
and pruned layers do, where predict would run them on their dense weights.

A small batch of another network of fused stages can run as one step that
a layer's class offers: the first layer whose class has

    network_chain(stages, shape) -> chain or None     (stages: a tuple of Stage, shape: x's)

gives a chain, or None and the stages run one by one. chain(x) is the last
stage's output for x of that shape (NCHW after a conv), and chain.runs()
whether minicnn.parallel's rule lets it run now: the chain is bound with
the shape, the rule read at each call, and where it says no, the stages run.
optim's packed binary layers offer it (optim/binary/chain.py: their serial
kernels and minicnn.chain's tasks in one compiled call).

A stage runs float32 layers of exactly the types above, and layers of
other libraries that offer a stage their own kernel: a layer whose `fused`
is true and that has

    fused_conv(padded_shape, relu, pool) -> run(xp, out)   (a Conv2D's out_channels, kernel_size,
                                                             stride, padding)
    fused_dense(shape, relu) -> run(x, out)                 (a Dense's out_features)

where run writes the stage's output into out and returns it: xp (N, Hp,
Wp, C) padded and channels last, float32. A dense stage's x has `shape`:
(N, K), or after a Flatten (N, H, W, C) channels last, whose values the
Flatten's (C, H, W) order puts where narrow.input_order says. The stage
checks the input's channels or features against the layer's. optim's
sparse and weight-shared layers offer them (their dense weights, or the
sparse kernel where it is faster), and so do its packed binary layers
(XNOR-popcount where their inputs are binary too). Everything else (float64
models, optim's other layers) runs its own forward. The results agree with
Sequential.forward to float32 rounding (tests/test_inference.py; a binary
input's sign can flip where rounding moves a value across 0).
Docs: docs/techniques.md, "The float32 baseline".
"""

from typing import NamedTuple

import numpy as np

from . import direct, narrow
from .chain import Chain, conv_stage, dense_at, dense_stage
from .checks import check_kernel_array, same_bits
from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from .parallel import MIN_MACS

__all__ = ["Inference", "Stage", "checked_params", "float_params"]

MAX_BOUND = 4  # input shapes whose steps are kept: predict's batches and its last, shorter one
CHAIN_BATCH = direct.PIXELS  # smaller batches of a plain conv/dense network run as one minicnn.chain


def _float32(layer):
    return all(p.dtype == np.float32 for p in layer.params.values())


class Stage(NamedTuple):
    """A fused stage as a layer's network_chain sees it (module docstring): a conv (with its ReLU and
    2x2 max-pool, or not) or a dense layer (with its ReLU; after a Flatten when its input is 4-D)."""

    layer: object
    conv: bool
    relu: bool
    pool: bool


class _Buffers:
    """One array per name, kept and reused while calls ask for the same shape or a smaller batch."""

    def __init__(self):
        self.arrays = {}

    def get(self, name, shape, zeroed=False):
        """A float32 array of `shape`; zeroed: made of zeros when new (its caller writes it in part)."""
        a = self.arrays.get(name)
        if a is None or a.shape[1:] != shape[1:] or a.shape[0] < shape[0]:
            a = self.arrays[name] = (np.zeros if zeroed else np.empty)(shape, np.float32)
        return a[: shape[0]]  # a batch-prefix of a C-contiguous array is C-contiguous


class _Conv:
    """Conv2D, or a layer offering fused_conv, with the ReLU and 2x2 max-pool that follow it fused in."""

    channels_last = True

    def __init__(self, conv, relu, pool):
        self.conv, self.relu, self.pool = conv, relu, pool
        self.source = self.w = None

    def weights(self):
        W = self.conv.params["W"]
        if self.source is None or self.source.shape != W.shape or not same_bits(self.source, W):
            self.checked(W, self.conv.params["b"])  # the runner was bound to the layer's geometry
            self.source, self.w = W.copy(), direct.pack_filters(W, self.conv.stride, self.pool)
        return self.w

    def kernel(self, padded):
        """run(xp, out) for padded channels-last inputs of shape `padded`."""
        conv = self.conv
        if type(conv) is not Conv2D:
            return conv.fused_conv(padded, self.relu, self.pool)
        F = conv.out_channels
        float_kernel = direct.conv_block_runner(padded, F, conv.kernel_size, conv.stride, self.relu, self.pool)

        def run(xp, out):
            return float_kernel(xp, self.weights(), check_kernel_array(conv.params["b"], "Conv2D bias", (F,)), out)

        return run

    def bind(self, shape, buffers, name):
        """run(x) for x of shape (N, H, W, C), channels last: writes and returns a buffer."""
        conv = self.conv
        F, K, S, P = conv.out_channels, conv.kernel_size, conv.stride, conv.padding
        N, H, W, C = shape
        if C != conv.in_channels:  # the kernels read C channels per pixel: checked before they run
            raise ValueError(f"{type(conv).__name__} expects {conv.in_channels} input channels, got {C}")
        padded = (N, H + 2 * P, W + 2 * P, C)
        xp = buffers.get(name + " padded", padded, zeroed=True) if P else None
        out = buffers.get(name, direct.output_shape(padded, F, K, S, self.pool))
        kernel = self.kernel(padded)

        def run(x):
            if P:
                xp[:, P : H + P, P : W + P] = x  # the border stays as it was made: zeros
                x = xp
            return kernel(x, out)

        return run

    def checked(self, W, b):
        return checked_params(self.conv, True, W, b)


class _Dense:
    """Dense, or a layer offering fused_dense, with the ReLU after it and, if `flatten`, the Flatten
    before it fused in.

    A float32 Dense of at most 16 outputs (a classifier) goes to narrow.narrow_dense, which reads a
    channels-last input where Flatten's order puts it; wider ones to direct.dense_block, after a
    transposed copy of a channels-last input (LeNet-5's is 800 floats per image); other layers to
    the kernel they offer, which takes the input as the stage receives it.
    """

    def __init__(self, dense, relu, flatten):
        self.dense, self.relu, self.channels_last = dense, relu, flatten

    def weights(self):
        return self.checked(self.dense.params["W"], self.dense.params["b"])

    def bind(self, shape, buffers, name):
        """run(x) for x of shape (N, K) or, after a Flatten, (N, ...): (N, H, W, C) channels last if 4-D."""
        dense = self.dense
        N, K, O = shape[0], int(np.prod(shape[1:])), dense.out_features
        if K != dense.in_features:  # the kernels read K values per row: checked before they run
            raise ValueError(f"{type(dense).__name__} expects {dense.in_features} input features, got {K}")
        out = buffers.get(name, (N, O))
        if type(dense) is not Dense:
            kernel = dense.fused_dense(shape, self.relu)
            return lambda x: kernel(x, out)
        if O <= narrow.MAX_OUTPUTS:
            order = narrow.input_order(shape)
            kernel = narrow.narrow_dense_runner((N, K), O, self.relu)
            return lambda x: kernel(x.reshape(N, K), order, *self.weights(), out)
        kernel = direct.dense_block_runner((N, K), O, self.relu)
        if len(shape) < 4:
            return lambda x: kernel(x.reshape(N, K), *self.weights(), out)
        flat = buffers.get(name + " flat", (N, K))
        nchw = flat.reshape(N, shape[3], shape[1], shape[2])

        def run(x):
            nchw[...] = x.transpose(0, 3, 1, 2)
            return kernel(flat, *self.weights(), out)

        return run

    def checked(self, W, b):
        return checked_params(self.dense, False, W, b)


class _Layer:
    """Any other layer: its own forward, in NCHW."""

    channels_last = False

    def __init__(self, layer):
        self.layer = layer

    def bind(self, shape, buffers, name):
        def run(x):
            out = self.layer.forward(x)
            self.layer.cache = None  # inference keeps no activations alive
            return out

        return run


def _fuses(layer, kind):
    """Whether layer runs as a stage of `kind` (Conv2D or Dense): a float32 layer of exactly that type,
    or a layer of that geometry whose `fused` is true and which offers the stage's kernel."""
    if type(layer) is kind:
        return _float32(layer)
    return bool(getattr(layer, "fused", False)) and hasattr(layer, "fused_conv" if kind is Conv2D else "fused_dense")


def _stages(layers):
    """The layer list as a list of stages, fusing what the module docstring lists."""
    stages, i = [], 0

    def next_is(kind, **config):
        return i < len(layers) and type(layers[i]) is kind and all(
            getattr(layers[i], k) == v for k, v in config.items())

    while i < len(layers):
        layer = layers[i]
        i += 1
        if _fuses(layer, Conv2D):
            relu = pool = False
            if next_is(ReLU):
                relu, i = True, i + 1
            if next_is(MaxPool2D, kernel_size=2, stride=2):
                pool, i = True, i + 1
                if next_is(ReLU):
                    relu, i = True, i + 1
            stages.append(_Conv(layer, relu, pool))
        elif _fuses(layer, Dense):
            relu = next_is(ReLU)
            i += relu
            stages.append(_Dense(layer, relu, flatten=False))
        elif type(layer) is Flatten and i < len(layers) and _fuses(layers[i], Dense):
            dense, i = layers[i], i + 1
            relu = next_is(ReLU)
            i += relu
            stages.append(_Dense(dense, relu, flatten=True))
        else:
            stages.append(_Layer(layer))
    return stages


class Inference:
    """The stages of a layer list: call it on x (N, C, H, W) for the last layer's output.

    The output is a buffer the next call overwrites: copy what you keep
    (Sequential.predict does). One thread at a time: the stages share their
    buffers (Sequential.predict keeps one Inference per thread).
    """

    def __init__(self, layers):
        self.layers = tuple(layers)
        self.stages = _stages(self.layers)
        self.buffers = _Buffers()
        self.bound = {}  # input shape -> its steps
        self.chains = _chains(self.stages)

    def __call__(self, x):
        steps = self.bound.get(x.shape)
        if steps is None:
            return self._bind(x)
        for step in steps:
            x = step(x)
        return x

    def _bind(self, x):
        """Run the stages on x, binding each step to the shape it sees."""
        shape = x.shape
        chain = None
        if x.ndim == 4 and len(x) < CHAIN_BATCH:
            chain = self._bind_chain(shape) if self.chains else self._offered_chain(shape)
        if chain is not None:
            steps, x = [chain], chain(x)
        else:
            steps, x = self._bind_stages(x)
        if len(self.bound) >= MAX_BOUND:  # a caller of ever new batch sizes: start over, not hoard buffers
            self.bound.clear()
        self.bound[shape] = tuple(steps)  # only now: a failed bind leaves no half-made steps
        return x

    def _bind_stages(self, x):
        """(steps, output): a step per stage, and the layout steps between them."""
        steps = []
        channels_last = made_here = False  # x's layout when it has 4 axes; whether a fused stage wrote x
        for i, stage in enumerate(self.stages):
            fused = not isinstance(stage, _Layer)
            axes = None
            if x.ndim == 4 and stage.channels_last != channels_last:
                axes = (0, 2, 3, 1) if stage.channels_last else (0, 3, 1, 2)
            if axes is not None or (fused and not made_here):
                bound = x.shape if axes is None else tuple(x.shape[a] for a in axes)
                steps.append(_layout(axes, fused, bound))
                x = steps[-1](x)
            steps.append(stage.bind(x.shape, self.buffers, f"stage {i}"))
            x = steps[-1](x)
            channels_last, made_here = stage.channels_last and x.ndim == 4, fused
        if channels_last:  # a network that ends in a conv
            steps.append(_layout((0, 3, 1, 2), False, None))
            x = steps[-1](x)
        return steps, x

    def _bind_chain(self, shape):
        """The one step of a small batch of shape (N, C, H, W): every stage a list of tasks in one
        minicnn.chain, writing buffers of its own (the border of the padded input stays zero). None
        when the work is too little to run threaded: one parallel loop is then no gain, and the
        stages one by one are as fast (the seed CNN at batch 1: 18 us, 21 as a chain)."""
        N, C, H, W = shape
        P = self.stages[0].conv.padding
        x_shape = (N, H + 2 * P, W + 2 * P, C)
        shapes, rows, at = [x_shape], [], []
        for stage in self.stages:
            if isinstance(stage, _Conv):
                conv = stage.conv
                if x_shape[3] != conv.in_channels:
                    raise ValueError(f"Conv2D expects {conv.in_channels} input channels, got {x_shape[3]}")
                F, K, S = conv.out_channels, conv.kernel_size, conv.stride
                rows.append(conv_stage(x_shape, F, K, S, stage.relu, stage.pool))
                x_shape, where = direct.output_shape(x_shape, F, K, S, stage.pool), np.zeros(0, np.int64)
            else:
                K, O = int(np.prod(x_shape[1:])), stage.dense.out_features
                if K != stage.dense.in_features:
                    raise ValueError(f"Dense expects {stage.dense.in_features} input features, got {K}")
                rows.append(dense_stage(N, K, O, stage.relu))  # a 4-D input is a Flatten's: read in its order
                where, x_shape = dense_at(x_shape, O), (N, O)
            shapes.append(x_shape)
            at.append(where)
        if sum(macs for _, macs in rows) < MIN_MACS:
            return None
        acts = [self.buffers.get(f"chain {i}", shape, zeroed=i == 0) for i, shape in enumerate(shapes)]
        chain, inside = Chain(rows, acts, at), acts[0][:, P : H + P, P : W + P]
        layers = [(stage, stage.conv if isinstance(stage, _Conv) else stage.dense) for stage in self.stages]

        def run(x):
            inside[...] = x.transpose(0, 2, 3, 1)
            for s, (stage, layer) in enumerate(layers):
                W, b = float_params(layer)
                if not chain.knows(s, W, b):  # a new array: checked once (its values are read in place)
                    chain.set_arrays(s, *stage.checked(W, b))
            return chain()

        return run

    def _offered_chain(self, shape):
        """The one step of a small batch of shape (N, C, H, W) that a layer's class offers for these
        stages (the first layer whose class has network_chain; none if a stage is not fused), or
        None: its chain while chain.runs(), else the stages, bound at the first such call."""
        offer = next((type(layer).network_chain for layer in self.layers if hasattr(type(layer), "network_chain")),
                     None)
        if offer is None or any(isinstance(stage, _Layer) for stage in self.stages):
            return None
        stages = tuple(Stage(stage.conv, True, stage.relu, stage.pool) if isinstance(stage, _Conv)
                       else Stage(stage.dense, False, stage.relu, False) for stage in self.stages)
        chain = offer(stages, shape)
        if chain is None:
            return None
        steps = None

        def run(x):
            nonlocal steps
            if chain.runs():
                return chain(x)
            if steps is None:  # the rule says threaded now (a forced mode, more threads): the stages
                steps, out = self._bind_stages(x)
                return out
            for step in steps:
                x = step(x)
            return x

        run.chain = chain
        return run


def checked_params(layer, conv, W, b):
    """(W, b) of a conv (conv true) or dense layer, checked to be what the float32 kernels of a stage
    of the layer's geometry read: C-contiguous float32 arrays of a Conv2D's or a Dense's shapes."""
    if conv:
        shape = (layer.out_channels, layer.in_channels, layer.kernel_size, layer.kernel_size)
        return check_kernel_array(W, "Conv2D weight", shape), check_kernel_array(b, "Conv2D bias", shape[:1])
    shape = (layer.in_features, layer.out_features)
    return check_kernel_array(W, "Dense weight", shape), check_kernel_array(b, "Dense bias", shape[1:])


def float_params(layer):
    """(W, b) of a stage's layer as the float32 kernels read them: a Conv2D's or a Dense's params, or
    what another layer's chain_params() gives (None when it runs a kernel of its own)."""
    if type(layer) in (Conv2D, Dense):
        return layer.params["W"], layer.params["b"]
    offer = getattr(layer, "chain_params", None)
    return None if offer is None else offer()


def _chains(stages):
    """Whether the stages can run as one minicnn.chain: float32 Conv2D stages (padded in the first
    alone: a later stage's input is the buffer an earlier one wrote), then Dense stages, the first
    of them after a Flatten; each stage's layer giving its float_params."""
    convs = [s for s in stages if isinstance(s, _Conv)]
    denses = stages[len(convs):]
    return bool(convs and denses) and stages[: len(convs)] == convs and denses[0].channels_last and all(
        s is convs[0] or s.conv.padding == 0 for s in convs) and all(isinstance(s, _Dense) for s in denses) and all(
        float_params(s.conv if isinstance(s, _Conv) else s.dense) is not None for s in stages)


def _layout(axes, fused, shape):
    """The step that puts a stage's input in its layout: transposed by axes and, for a fused stage,
    made the contiguous float32 array of `shape` its kernels were bound to (a layer of its own
    forward before it could return another shape: named, not read past its end)."""
    def step(x):
        if axes is not None:
            x = x.transpose(axes)
        if fused:
            x = np.ascontiguousarray(x, dtype=np.float32)
            if x.shape != shape:
                raise ValueError(f"inference bound a stage to inputs of shape {shape}, got {x.shape}")
        return x

    return step
