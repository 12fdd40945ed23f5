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
once every task of stage s - 1 is done: counters[s] counts them, read with
acquire ordering; the fetch-and-add that counts a task releases its writes.

Why it cannot deadlock: a thread waits only after claiming a task of stage
s, so every task of stage s - 1 has been claimed, by threads running them.
If the second thread never arrives, the first claims every task in turn and
never waits; the serial build (minicnn.parallel.twin) is the same code.

    plan (S, PLAN_COLUMNS) int64: a row per stage, conv_stage's or dense_stage's
    acts      S + 1 float32 arrays, flat (a tuple, as the three below): stage s reads acts[s] and
              writes acts[s + 1]
              (a conv's input channels last and padded, its output channels last)
    weights   S float32 arrays: pack_filters(W) of a conv, W (in, out) of a dense layer
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

from .direct import BLOCK, ROW_SPAN, conv_row, dense_span
from .kernels import conv_output_size
from .narrow import MAX_OUTPUTS, narrow_row
from .parallel import MIN_MACS, twin

__all__ = ["Chain", "conv_stage", "dense_stage", "run_stages_ref"]

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


@numba.njit(cache=True)
def _task(plan, s, t, acts, weights, biases, at):
    """Task t of stage s."""
    if plan[s, 0] == CONV:
        Hp, Wp, C, F, K, S, relu, pool = plan[s, 2], plan[s, 3], plan[s, 4], plan[s, 5], plan[s, 6], plan[s, 7], \
            plan[s, 8] != 0, plan[s, 9] != 0
        Ho = (Hp - K) // S + 1
        rows, blocks = (Ho // 2 if pool else Ho), (F + BLOCK - 1) // BLOCK
        conv_row(acts[s], Hp, Wp, C, weights[s], K * K * C * BLOCK, BLOCK, biases[s], F, K, S, relu, pool,
                 acts[s + 1], t // (rows * blocks), t // blocks % rows, t % blocks)
    elif plan[s, 0] == DENSE:
        C, F, relu = plan[s, 2], plan[s, 3], plan[s, 4] != 0
        spans = (F + ROW_SPAN - 1) // ROW_SPAN
        dense_span(acts[s], at[s], weights[s], biases[s], relu, acts[s + 1], t // spans, t % spans * ROW_SPAN, C, F)
    else:
        narrow_row(acts[s], at[s], weights[s], biases[s], plan[s, 4] != 0, acts[s + 1], t, plan[s, 2], plan[s, 3])


def run_stages_ref(plan, acts, weights, biases, at):
    """The same tasks one after the other, in order: what the claims amount to."""
    for s in range(len(plan)):
        for t in range(plan[s, 1]):
            _task(plan, s, t, acts, weights, biases, at)


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


def _run_stages_loops(plan, acts, weights, biases, at, counters, claimants):
    S = plan.shape[0]
    total = 0
    for s in range(S):
        total += plan[s, 1]
    for i in range(counters.size):  # a loop, not counters[:] = 0: that would be a parallel loop of its own
        counters[i] = 0
    for _ in prange(claimants):  # one per thread: each takes tasks until none is left
        while True:
            t = _fetch_add(counters, 0, 1)
            if t >= total:
                break
            s, first = 0, 0
            while t >= first + plan[s, 1]:
                first += plan[s, 1]
                s += 1
            if s > 0:
                while _load_acquire(counters, s) < plan[s - 1, 1]:
                    _pause()
            _task(plan, s, t - first, acts, weights, biases, at)
            _fetch_add(counters, s + 1, 1)


_run_stages = twin(_run_stages_loops, min_work=MIN_MACS)


class Chain:
    """The stages of a plan bound to their buffers: set each stage's weights (set_weights), fill
    the first buffer, call; the last buffer holds the output. One thread at a time (the counters
    and buffers are the chain's).

    The arrays go to the kernel as tuples, not typed lists: a typed list's items are counted
    references, and two threads taking them for every task contend for the counts (LeNet-5 at
    batch 1: 57 us through typed lists, 39 through tuples)."""

    def __init__(self, rows, acts, at):
        """rows: [(plan row, multiply-adds)] of conv_stage and dense_stage; acts: the S + 1 buffers
        (any shapes, C-contiguous float32); at: S int64 arrays (empty for a conv)."""
        self.plan = np.array([r for r, _ in rows], np.int64).reshape(-1, PLAN_COLUMNS)
        self.work = sum(m for _, m in rows)
        self.buffers, self.acts, self.at = acts, tuple(a.reshape(-1) for a in acts), tuple(at)
        self.sources = [None] * (2 * len(rows))  # each stage's weights and bias, as set_weights got them
        self.arrays = None  # (weights, biases): tuples of the flat arrays, remade after a change
        self.counters = np.zeros(len(rows) + 1, np.int64)

    def set_weights(self, s, w, b):
        """Stage s reads w and b (float32, C-contiguous) from now on: cheap when they are the arrays it
        reads already."""
        if w is not self.sources[2 * s] or b is not self.sources[2 * s + 1]:
            self.sources[2 * s : 2 * s + 2] = w, b
            self.arrays = None

    def __call__(self):
        if self.arrays is None:
            self.arrays = tuple(tuple(a.reshape(-1) for a in self.sources[k::2]) for k in (0, 1))
        _run_stages(self.work, self.plan, self.acts, *self.arrays, self.at, self.counters, numba.get_num_threads())
        return self.buffers[-1]
