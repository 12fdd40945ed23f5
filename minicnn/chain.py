"""Small batches in one parallel loop: every stage's tasks, claimed one at a time, in order.

Why. Numba's TBB layer makes a task arena for every parallel loop (its
tbbpool.cpp, `parallel_for`). Timed with the time-stamp counter inside a
loop of two iterations, each running 4 tasks of LeNet-5's conv2 at batch 1
(10 us of work): the calling thread started its iteration 3.3 us after the
loop was entered, the other thread 5.2 us after, and the loop returned
1.3 us after the last one ended. So a threaded kernel of ten microseconds
pays half its time again: conv2 took 18.5 us threaded against 21.5 us
serial, and LeNet-5's predict at batch 1 took 63 us for ~37 us of kernels.

What. Below a batch of 8 (a register tile of rows, under which direct's
dense layers read their weights once per row anyway), minicnn.inference
runs a float32 network of convs and dense layers as one parallel loop of
one iteration per thread. The tasks are numbered stage by stage, split as
direct's kernels split them: a conv's task is one output row of one image
for 32 filters (direct.conv_row), a dense layer's 128 outputs of one row
(direct.dense_span), a classifier's row (narrow.narrow_row). Each thread takes the next number with an atomic
fetch-and-add on counters[0] until none is left. A task of stage s starts
once every task numbered before its stage's first is done: counters[1]
counts the tasks done, read with acquire ordering (the fetch-and-add that
counts a task releases its writes), and since no later task can finish
first, the count reaches that number exactly when they have.

A conv reads its weights packed (direct.pack_filters), and training or
pruning change a layer's weights in place, so the packed copy must follow.
Compared in Python before the loop (conv2's 100 KB against a copy of them),
that took 10 of LeNet-5's 55 us at batch 1. So the loop's first tasks do it,
one per block of 32 filters (whose weights are contiguous in (F, C, K, K)):
compare the block with the copy it was packed from and, where they differ,
copy and pack it again (_check_block). They are numbered before stage 0's
tasks, which wait for them.

Why it cannot deadlock: a thread waits only after claiming a task of stage
s, so every task of stage s - 1 has been claimed, by threads running them.
If the second thread never arrives, the first claims every task in turn and
never waits; the serial build (minicnn.parallel.twin) is the same code.

    plan (S, PLAN_COLUMNS) int64: a row per stage, conv_stage's or dense_stage's
    acts      S + 1 float32 arrays, flat (a tuple, as the five below): stage s reads acts[s] and
              writes acts[s + 1]
              (a conv's input channels last and padded, its output channels last)
    raw       S float32 arrays: a conv's W (F, C, K, K) as the layer holds it, a dense layer's W (in, out)
    sources   S float32 arrays: what a conv's packed weights were packed from; empty for a dense layer
    weights   S float32 arrays: pack_filters of a conv's source (its stride and pool); a dense layer's W again
    biases    S float32 arrays
    at        S int64 arrays: where a dense layer's input k lies (direct.dense_span), or which row of
              W a narrow layer's input k meets (narrow.narrow_row); empty for a conv
"""

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from .direct import BLOCK, ROW_SPAN, conv_row, dense_span, filter_strides, pack_filters
from .checks import same_bits
from .kernels import conv_output_size
from .narrow import MAX_OUTPUTS, input_order, narrow_row
from .parallel import MIN_MACS, twin

__all__ = [
    "PLAN_COLUMNS", "Chain", "conv_stage", "dense_at", "dense_stage", "refresh_filters", "run_stages_ref", "task",
]

CONV, DENSE, NARROW = 0, 1, 2
PLAN_COLUMNS = 10


def conv_stage(xp_shape, F, K, stride, relu, pool):
    """The plan row of direct.conv_block on padded inputs of xp_shape (N, Hp, Wp, C), and its
    multiply-adds: tasks = N x output rows (pooled rows with pool) x blocks of 32 filters."""
    N, Hp, Wp, C = xp_shape
    Ho, Wo = conv_output_size(Hp, K, stride, 0), conv_output_size(Wp, K, stride, 0)
    tasks = N * (Ho // 2 if pool else Ho) * -(-F // BLOCK)
    return [CONV, tasks, Hp, Wp, C, F, K, stride, int(relu), int(pool)], N * Ho * Wo * F * K * K * C


def dense_stage(N, C, F, relu):
    """The plan row of a dense layer of C inputs and F outputs on N rows, and its multiply-adds:
    tasks = N x spans of 128 outputs (direct.dense_span), or N rows (narrow.narrow_row) for a
    classifier of at most 16 outputs, whose sums fit one register."""
    if F <= MAX_OUTPUTS:
        return [NARROW, N, C, F, int(relu), 0, 0, 0, 0, 0], N * C * F
    return [DENSE, N * -(-F // ROW_SPAN), C, F, int(relu), 0, 0, 0, 0, 0], N * C * F


def dense_at(x_shape, F):
    """A dense stage's `at` for inputs of x_shape (N, ...) (a 4-D one a Flatten's, channels last) and F
    outputs: which row of W input k meets (narrow.narrow_row), or where input k lies (direct.dense_span)."""
    order = input_order(x_shape)
    return order if F <= MAX_OUTPUTS else np.argsort(order)


@numba.njit(cache=True)
def task(row, t, x, w, b, at, out):
    """Task t of the stage whose plan row is `row` (conv_stage's or dense_stage's), on its flat arrays:
    x its input, w and b its weights (a conv's packed) and bias, out its output (float32), at its
    input order (int64, dense_at's; empty for a conv)."""
    if row[0] == CONV:
        Hp, Wp, C, F, K, S, relu, pool = row[2], row[3], row[4], row[5], row[6], row[7], row[8] != 0, row[9] != 0
        Ho = (Hp - K) // S + 1
        rows, blocks = (Ho // 2 if pool else Ho), (F + BLOCK - 1) // BLOCK
        block_stride, tap_stride = filter_strides(C, F, K, S, pool)
        conv_row(x, Hp, Wp, C, w, block_stride, tap_stride, b, F, K, S, relu, pool, out,
                 t // (rows * blocks), t // blocks % rows, t % blocks)
    elif row[0] == DENSE:
        C, F, relu = row[2], row[3], row[4] != 0
        spans = (F + ROW_SPAN - 1) // ROW_SPAN
        dense_span(x, at, w, b, relu, out, t // spans, t % spans * ROW_SPAN, C, F)
    else:
        narrow_row(x, at, w, b, row[4] != 0, out, t, row[2], row[3])


def run_stages_ref(plan, acts, weights, biases, at):
    """The same tasks one after the other, in order: what the claims amount to."""
    for s in range(len(plan)):
        for t in range(plan[s, 1]):
            task(plan[s], t, acts[s], weights[s], biases[s], at[s], acts[s + 1])


@intrinsic
def _fetch_add(typingctx, a, i, v):
    """a[i] += v atomically (sequentially consistent); returns the value before."""
    def codegen(context, builder, sig, args):
        a, i, v = args
        data = context.make_array(sig.args[0])(context, builder, a).data
        return builder.atomic_rmw("add", builder.gep(data, [i]), v, "seq_cst")

    return types.int64(a, types.intp, types.int64), codegen


@intrinsic
def _load_acquire(typingctx, a, i):
    """a[i], read with acquire ordering: the writes released before the value was stored are seen."""
    def codegen(context, builder, sig, args):
        a, i = args
        data = context.make_array(sig.args[0])(context, builder, a).data
        return builder.load_atomic(builder.gep(data, [i]), "acquire", 8)

    return types.int64(a, types.intp), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _pause(typingctx):
    """The spin-wait hint (x86's pause): the waiting thread yields the core's resources a moment."""
    def codegen(context, builder, sig, args):
        if _X86:
            pause = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.none(), codegen


@numba.njit(cache=True)
def _check_block(W, source, packed, F, C, K, S, pool, blk):
    """Filters 32 blk .. 32 blk + 31 of a conv (stride S, pool or not): where W differs from source (bit
    for bit), source becomes W and packed becomes direct.pack_filters(W, S, pool) for those filters."""
    f0, f1, taps = blk * BLOCK, min(F, (blk + 1) * BLOCK), C * K * K
    if same_bits(W[f0 * taps : f1 * taps], source[f0 * taps : f1 * taps]):
        return
    source[f0 * taps : f1 * taps] = W[f0 * taps : f1 * taps]
    block_stride, tap_stride = filter_strides(C, F, K, S, pool)
    repeat = tap_stride // BLOCK  # copies of each weight: 4 for one input channel (direct.QUAD)
    for f in range(f0, f1):
        for c in range(C):
            for kh in range(K):
                for kw in range(K):
                    at = blk * block_stride + ((kh * K + kw) * C + c) * tap_stride + (f - f0) * repeat
                    packed[at : at + repeat] = W[((f * C + c) * K + kh) * K + kw]


@numba.njit(cache=True)
def refresh_filters(row, W, source, packed):
    """A conv stage's packed weights made to follow W (flat): every block of 32 filters where W differs
    from source (what packed was packed from) copied and packed again (the serial form of the check tasks)."""
    for blk in range((row[5] + BLOCK - 1) // BLOCK):
        _check_block(W, source, packed, row[5], row[4], row[6], row[7], row[9] != 0, blk)


@numba.njit(cache=True)
def _checks(plan, t, raw, sources, weights):
    """Check task t: the t-th block of 32 filters, counting the conv stages' blocks in order."""
    for s in range(plan.shape[0]):
        if plan[s, 0] == CONV:
            blocks = (plan[s, 5] + BLOCK - 1) // BLOCK
            if t < blocks:
                _check_block(raw[s], sources[s], weights[s], plan[s, 5], plan[s, 4], plan[s, 6], plan[s, 7],
                             plan[s, 9] != 0, t)
                return
            t -= blocks


def _run_stages_loops(plan, acts, raw, sources, weights, biases, at, counters, claimants):
    checks = total = 0
    for s in range(plan.shape[0]):
        total += plan[s, 1]
        if plan[s, 0] == CONV:
            checks += (plan[s, 5] + BLOCK - 1) // BLOCK
    total += checks
    counters[0] = counters[1] = 0  # the next task's number; the tasks done
    for _ in prange(claimants):  # one per thread: each takes tasks until none is left
        while True:
            t = _fetch_add(counters, 0, 1)
            if t >= total:
                break
            if t < checks:
                _checks(plan, t, raw, sources, weights)
            else:
                s, first = 0, checks  # task t is task t - first of stage s
                while t >= first + plan[s, 1]:
                    first += plan[s, 1]
                    s += 1
                # Every task before `first` done: no task from `first` on finishes before they all
                # have, so the count reaches `first` exactly when they have.
                while _load_acquire(counters, 1) < first:
                    _pause()
                task(plan[s], t - first, acts[s], weights[s], biases[s], at[s], acts[s + 1])
            _fetch_add(counters, 1, 1)


_run_stages = twin(_run_stages_loops, min_work=MIN_MACS)


class Chain:
    """The stages of a plan bound to their buffers: give each stage its layer's arrays (set_arrays),
    fill the first buffer, call; the last buffer holds the output. One thread at a time (the
    counters, buffers and packed weights are the chain's).

    The arrays go to the kernel as tuples, not typed lists: a typed list's items are counted
    references, and two threads taking them for every task contend for the counts (LeNet-5 at
    batch 1: 57 us through typed lists, 39 through tuples)."""

    def __init__(self, rows, acts, at):
        """rows: [(plan row, multiply-adds)] of conv_stage and dense_stage; acts: the S + 1 buffers
        (any shapes, C-contiguous float32); at: S int64 arrays (empty for a conv)."""
        self.plan = np.array([r for r, _ in rows], np.int64).reshape(-1, PLAN_COLUMNS)
        self.work = sum(m for _, m in rows)
        self.buffers, self.acts, self.at = acts, tuple(a.reshape(-1) for a in acts), tuple(at)
        S = len(rows)
        self.given = [None] * (2 * S)  # each stage's W and b, as set_arrays got them
        self.packs = [None] * S  # a conv's (source, packed weights), flat; None for a dense layer
        self.arrays = None  # the kernel's tuples (raw, sources, weights, biases), remade after a change
        self.counters = np.zeros(2, np.int64)

    def knows(self, s, W, b):
        """Whether stage s reads these arrays already (their values may have changed since: the loop
        reads them in place, and checks a conv's W against its packed copy)."""
        return W is self.given[2 * s] and b is self.given[2 * s + 1]

    def set_arrays(self, s, W, b):
        """Stage s reads the layer's W and b (float32, C-contiguous, of the layer's shapes, checked by
        the caller) from now on; a conv's W new to it is copied and packed here."""
        if self.plan[s, 0] == CONV and W is not self.given[2 * s]:
            self.packs[s] = W.reshape(-1).copy(), pack_filters(W, self.plan[s, 7], self.plan[s, 9] != 0)
        self.given[2 * s : 2 * s + 2] = W, b
        self.arrays = None

    def __call__(self):
        if self.arrays is None:
            empty = np.zeros(0, np.float32)
            raw, biases = (tuple(a.reshape(-1) for a in self.given[k::2]) for k in (0, 1))
            sources = tuple(empty if p is None else p[0] for p in self.packs)
            weights = tuple(w if p is None else p[1] for w, p in zip(raw, self.packs))
            self.arrays = raw, sources, weights, biases
        _run_stages(self.work, self.plan, self.acts, *self.arrays, self.at, self.counters, numba.get_num_threads())
        return self.buffers[-1]
