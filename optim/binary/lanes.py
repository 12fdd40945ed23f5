"""Sixteen (or eight) popcounts in one register: the XNOR kernels' register tile.

An XNOR product's inner step is d += popcount(a XOR w) (xnor.py). With the
weights of 16 filters side by side, 32 bits each, one step serves all 16:

    count_add(d, x, wt, i)     d + popcount(x XOR wt[i : i + 16]), lane by lane

(d the int32 lanes of 16 filters' counts, x one uint32 word of the input row, the same in every
lane, wt uint32), and the counts stay in registers across the whole row: a loop over an array of
sums loads and stores them at every step, as LLVM cannot keep them in registers by itself (see
minicnn.simd). With AVX-512 VPOPCNTDQ that is three instructions, vpxord (its broadcast folded in
from memory), vpopcntd and vpaddd, on 512 bits; without it LLVM spells the popcount with byte
table lookups (vpshufb) on two 256-bit halves. Also

    zeros()                    [0] * 16
    zeros8(), widen(d)         [0] * 8, the counts of a block of at most 8 filters (count_add reads 8
                               weights for them: half the lane work on a 256-bit register), and
                               d's 8 lanes followed by 8 zeros: counts of 16 lanes again (16 counts
                               are returned as they are)
    dots(d, n)                 n - 2 d: the products of the rows of n signs whose bits differ in d places
    to_float(d)                float32(d), minicnn.simd's f32x16, for the layers' scaling
    store_first(out, i, d, m)  out[i : i + m] = d[:m], 0 <= m <= 16 (out int32; a masked store:
                               out may end before i + 16)
    sign_bits(v, m)            the uint32 whose bit l is v[l] >= 0 for l < m, 0 above (v minicnn.simd's
                               f32x16, 0 <= m <= 16: a compare and the mask's bits, vcmpps into a
                               k-register and kmovw, where a loop tests and shifts value by value)

No bounds checks: callers guarantee 0 <= i and i + 16 <= wt.size (i + 8 for 8 counts), i + m <= out.size. With
NUMBA_DISABLE_JIT=1 the operations are the NumPy expressions at the end. Numba's cache does not see this file: after
editing it, delete the __pycache__ folders.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from minicnn.simd import f32x16, first_lanes, is_array_of, lanes_at

__all__ = ["LANES", "count_add", "counts8", "counts16", "dots", "sign_bits", "store_first", "to_float", "widen",
           "zeros", "zeros8"]

LANES = 16

_I32 = ir.IntType(32)
_COUNTS = ir.VectorType(_I32, LANES)
_COUNTS8 = ir.VectorType(_I32, LANES // 2)


class Counts(types.Type):
    """Numba's type for `lanes` int32 counts (16, or 8), held in registers like any scalar."""

    def __init__(self, lanes):
        self.lanes = lanes
        super().__init__(name=f"counts{lanes}")


counts16, counts8 = Counts(LANES), Counts(LANES // 2)


@register_model(Counts)
class _CountsModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_I32, fe_type.lanes))


def _splat(builder, value, lanes_type=_COUNTS):
    """The i32 value in all lanes."""
    one = builder.insert_element(ir.Constant(lanes_type, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(lanes_type, [0] * lanes_type.count))


def _counts_at(context, builder, array_type, array, index, lanes_type=_COUNTS):
    return lanes_at(context, builder, array_type, array, types.intp, index, lanes_type)


@intrinsic
def zeros(typingctx):
    return counts16(), lambda context, builder, sig, args: ir.Constant(_COUNTS, None)


@intrinsic
def zeros8(typingctx):
    return counts8(), lambda context, builder, sig, args: ir.Constant(_COUNTS8, None)


@intrinsic
def widen(typingctx, d):
    if d == counts16:  # already 16 lanes: the same value
        return counts16(counts16), lambda context, builder, sig, args: args[0]
    if d != counts8:
        return None

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], ir.Constant(_COUNTS8, None), ir.Constant(_COUNTS, list(range(LANES))))

    return counts16(counts8), codegen


@intrinsic
def count_add(typingctx, d, x, wt, i):
    if not (isinstance(d, Counts) and isinstance(x, types.Integer) and is_array_of(wt, types.uint32)):
        return None

    def codegen(context, builder, sig, args):
        d, x, wt, i = args
        counts = d.type
        w = builder.load(_counts_at(context, builder, sig.args[2], wt, i, counts), align=4)
        xs = _splat(builder, x, counts)
        ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(counts, [counts]),
                                               f"llvm.ctpop.v{counts.count}i32")
        return builder.add(d, builder.call(ctpop, [builder.xor(xs, w)]))

    return d(d, types.uint32, wt, types.intp), codegen


@intrinsic
def dots(typingctx, d, n):
    if not (d == counts16 and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ns = _splat(builder, context.cast(builder, args[1], sig.args[1], types.int32))
        return builder.sub(ns, builder.shl(args[0], ir.Constant(_COUNTS, [1] * LANES)))

    return counts16(counts16, n), codegen


@intrinsic
def to_float(typingctx, d):
    if d != counts16:
        return None
    return f32x16(counts16), lambda context, builder, sig, args: builder.sitofp(args[0], ir.VectorType(
        ir.FloatType(), LANES))


@intrinsic
def store_first(typingctx, out, i, d, m):
    if not (d == counts16 and is_array_of(out, types.int32, writable=True)):
        return None

    def codegen(context, builder, sig, args):
        out, i, d, m = args
        first = first_lanes(builder, context.cast(builder, m, sig.args[3], types.int32))
        target = _counts_at(context, builder, sig.args[0], out, i)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.VoidType(), [_COUNTS, target.type, _I32, first.type]), "llvm.masked.store.v16i32.p0")
        builder.call(fn, [d, target, ir.Constant(_I32, 4), first])
        return context.get_dummy_value()

    return types.none(out, types.intp, counts16, m), codegen


@intrinsic
def sign_bits(typingctx, v, m):
    if not (v == f32x16 and isinstance(m, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v, m = args
        positive = builder.and_(builder.fcmp_ordered(">=", v, ir.Constant(v.type, [0.0] * LANES)),
                                first_lanes(builder, context.cast(builder, m, sig.args[1], types.int32)))
        return builder.zext(builder.bitcast(positive, ir.IntType(LANES)), _I32)

    return types.uint32(f32x16, m), codegen


def _zeros_python():
    return np.zeros(LANES, np.int32)


def _zeros8_python():
    return np.zeros(LANES // 2, np.int32)


def _widen_python(d):
    return np.concatenate([d, np.zeros(LANES - d.size, np.int32)])


def _count_add_python(d, x, wt, i):
    n = d.size
    bits = np.unpackbits((np.uint32(x) ^ wt.reshape(-1)[i : i + n]).view(np.uint8).reshape(n, 4), axis=1)
    return (d + bits.sum(axis=1)).astype(np.int32)


def _dots_python(d, n):
    return (n - 2 * d).astype(np.int32)


def _to_float_python(d):
    return d.astype(np.float32)


def _store_first_python(out, i, d, m):
    out.reshape(-1)[i : i + m] = d[:m]


def _sign_bits_python(v, m):
    return np.uint32(sum(1 << l for l in range(m) if v[l] >= 0))


if numba.config.DISABLE_JIT:
    zeros, count_add, dots, to_float = _zeros_python, _count_add_python, _dots_python, _to_float_python
    zeros8, widen = _zeros8_python, _widen_python
    store_first, sign_bits = _store_first_python, _sign_bits_python
