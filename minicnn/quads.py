"""Vectors of 4 x 4 lanes: the tile of a conv of one input channel (minicnn.direct's quad_row).

Lane 4a + b of a minicnn.simd f32x16 is row a, column b: for the conv,
filter a of a group of 4 at pixel b of a quad of 4 neighbours. A tap's
inputs are one row of 4 floats repeated in the 4 rows (16 bytes loaded and
broadcast), its weights each filter's weight repeated along its row
(pack_filters stores them so), and their product is one fused multiply-add
for 16 outputs. What the tile needs:

    quad_first(x, i, n)           the row [x[i], ..., x[i + n - 1], 0, ...] (4 lanes, 0 <= n <= 4) in all
                                  4 rows (a masked 16-byte load and a broadcast)
    swap_pairs(a)                 a with columns 0 and 1, 2 and 3 exchanged (a 2x2 pool's pairs)
    transpose4(a)                 lane 4b + a takes lane 4a + b (each pixel's 4 filters side by side)
    store_quarter(x, i, a, q, n)  x[i : i + n] = a[4q : 4q + n], 0 <= n <= 4 (a masked 16-byte store)

All are constant shuffles or masked loads and stores in LLVM IR, so LLVM
picks the CPU's instructions (AVX-512 or AVX2). No bounds checks: callers
guarantee 0 <= i and i + n <= x.size. With NUMBA_DISABLE_JIT=1 they are the
NumPy expressions at the end. Numba's cache does not see this file: after
editing it, delete the __pycache__ folders.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import LANES, f32x16, is_array_of, lanes_at

__all__ = ["quad_first", "store_quarter", "swap_pairs", "transpose4"]

_QUAD = ir.VectorType(ir.FloatType(), 4)
_INTS = ir.VectorType(ir.IntType(32), LANES)


def _first4(builder, n):
    """The mask of lanes 0 .. n - 1 of 4 (n an i32)."""
    ints = ir.VectorType(ir.IntType(32), 4)
    one = builder.insert_element(ir.Constant(ints, None), n, ir.Constant(ir.IntType(32), 0))
    return builder.icmp_signed("<", ir.Constant(ints, [0, 1, 2, 3]),
                               builder.shuffle_vector(one, one, ir.Constant(ints, [0] * 4)))


@intrinsic
def quad_first(typingctx, x, i, n):
    """[x[i], .., x[i + n - 1], 0, ..] (4 lanes, 0 <= n <= 4) repeated 4 times: a masked 16-byte
    load and a broadcast."""
    if not (is_array_of(x, types.float32) and isinstance(i, types.Integer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        start = lanes_at(context, builder, sig.args[0], args[0], sig.args[1], args[1], _QUAD)
        mask = _first4(builder, context.cast(builder, args[2], sig.args[2], types.int32))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            _QUAD, [start.type, ir.IntType(32), mask.type, _QUAD]), "llvm.masked.load.v4f32.p0")
        row = builder.call(fn, [start, ir.Constant(ir.IntType(32), 4), mask, ir.Constant(_QUAD, None)])
        return builder.shuffle_vector(row, row, ir.Constant(_INTS, [0, 1, 2, 3] * 4))

    return f32x16(x, i, n), codegen


def _shuffle(lanes, doc):
    """The intrinsic a -> a[lanes] (a constant permutation: one shuffle instruction, or two)."""
    @intrinsic
    def shuffle(typingctx, a):
        if a != f32x16:
            return None
        return f32x16(a), lambda context, builder, sig, args: builder.shuffle_vector(
            args[0], args[0], ir.Constant(_INTS, lanes))

    shuffle.__doc__ = doc
    return shuffle


swap_pairs = _shuffle([lane ^ 1 for lane in range(LANES)], "a with columns 0 and 1, 2 and 3 exchanged.")
transpose4 = _shuffle([4 * (lane % 4) + lane // 4 for lane in range(LANES)], "Lane 4b + a takes lane 4a + b.")


@intrinsic
def store_quarter(typingctx, x, i, a, q, n):
    """x[i : i + n] = a[4q : 4q + n], 0 <= n <= 4: a masked 16-byte store (q constant where it is
    called, so the choice of quarter folds away)."""
    if not (is_array_of(x, types.float32, writable=True) and a == f32x16
            and all(isinstance(v, types.Integer) for v in (i, q, n))):
        return None

    def codegen(context, builder, sig, args):
        x, i, a, q, n = args
        target = lanes_at(context, builder, sig.args[0], x, sig.args[1], i, _QUAD)
        q = context.cast(builder, q, sig.args[3], types.int32)
        quarters = [builder.shuffle_vector(a, a, ir.Constant(ir.VectorType(ir.IntType(32), 4),
                                                             [4 * k + l for l in range(4)])) for k in range(4)]
        quarter = quarters[3]
        for k in (2, 1, 0):
            quarter = builder.select(builder.icmp_signed("==", q, ir.Constant(ir.IntType(32), k)), quarters[k], quarter)
        mask = _first4(builder, context.cast(builder, n, sig.args[4], types.int32))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [_QUAD, target.type, ir.IntType(32), mask.type]), "llvm.masked.store.v4f32.p0")
        builder.call(fn, [quarter, target, ir.Constant(ir.IntType(32), 4), mask])
        return context.get_dummy_value()

    return types.none(x, i, a, q, n), codegen


# --------------------------------------------------------------------------
# The same operations in NumPy: what each one means, and what runs with NUMBA_DISABLE_JIT=1


def _quad_first_python(x, i, n):
    row = np.zeros(4, np.float32)
    row[:n] = x[i : i + n]
    return np.tile(row, 4)


def _swap_pairs_python(a):
    return a[[lane ^ 1 for lane in range(LANES)]]


def _transpose4_python(a):
    return a.reshape(4, 4).T.reshape(-1).copy()


def _store_quarter_python(x, i, a, q, n):
    x[i : i + n] = a[4 * q : 4 * q + n]


if numba.config.DISABLE_JIT:
    quad_first, swap_pairs = _quad_first_python, _swap_pairs_python
    transpose4, store_quarter = _transpose4_python, _store_quarter_python
