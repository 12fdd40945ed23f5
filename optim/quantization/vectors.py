"""The int32x8 vector of the int8 kernels: 8 int32 sums in one register, and what the kernels do with them.

x86's VNNI instruction vpdpbusd adds to each of 8 int32 lanes the dot
product of 4 unsigned bytes with 4 signed bytes, exactly (no saturation):
32 multiply-adds per instruction, 4x float32's FMA. Numba does not emit it
from loops (LLVM's vectoriser keeps to vpmaddwd, 16 int16 products), and it
does not vectorise the fixed-point requantization either (a loop of int64
shifts, multiplies and selects stays scalar, ~1 ns an output). So the
kernels say both outright, on LLVM's <8 x i32> (v an int32x8, i an index):

    zeros8(), splat8(s)               [0] * 8, [s] * 8
    load8(a, i)                       a[i : i + 8]                  (a int32)
    add8(u, v), max8(u, v)            u + v (wrapping), maximum(u, v)
    dot4_add(v, x, wp, i)             v[l] + sum_j u_j wp[i + 4 l + j], l < 8, u the 4 bytes of x (uint32),
                                      unsigned; wp int8 (without VNNI: wp[i + 16 (j // 2) + 2 l + j % 2],
                                      kernels.pack_weights' layout for vpmaddwd)
    requantize8(v, m0, shift, i, z, lo, hi)
                                      clamp(MultiplyByQuantizedMultiplier(v, m0[i : i + 8], shift[i : i + 8])
                                      + z, lo, hi): `fixedpoint`'s arithmetic in <8 x i64>
    store8(out, i, v)                 out[i : i + 8] = v              (out int32)
    store_first(out, i, v, n)         out[i : i + n] = v[:n], 0 <= n <= 8, out int8 or int32 (a masked store:
                                      out may end before i + 8)

The activations are int8 but vpdpbusd wants unsigned bytes: flipping the
sign bit maps q to u = q + 128 in [0, 255], and the kernels subtract the
constant 128 * sum_k w_k from each sum. A CPU without VNNI gets the same
arithmetic spelled as widening multiplies and adds, and AVX2 runs the <8 x i64>
of requantize8 as two registers: LLVM compiles both for whatever the CPU has.

No bounds checks: callers guarantee 0 <= i and i + 8 <= a.size (i + n for
store_first). With NUMBA_DISABLE_JIT=1 the operations are the NumPy
expressions at the end. Numba's cache does not see this file: after editing
it, delete the __pycache__ folders.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from minicnn.simd import HAS_VNNI

from .fixedpoint import INT32_MAX, INT32_MIN, multiply_by_quantized_multiplier


class Int32x8(types.Type):
    def __init__(self):
        super().__init__(name="int32x8")


int32x8 = Int32x8()
_I64 = ir.IntType(64)
_V8I32, _V32I8, _V8I64 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.IntType(8), 32), ir.VectorType(_I64, 8)
_V8I8 = ir.VectorType(ir.IntType(8), 8)


@register_model(Int32x8)
class _Int32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8I32)


def _pointer(context, builder, array_type, array, index, lanes_type):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), lanes_type.as_pointer())


def _splat(builder, value, lanes_type):
    """value (a scalar of the lanes' type) in all 8 lanes."""
    one = builder.insert_element(ir.Constant(lanes_type, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(_V8I32, [0] * 8))


@intrinsic
def zeros8(typingctx):
    return int32x8(), lambda context, builder, sig, args: ir.Constant(_V8I32, None)


@intrinsic
def splat8(typingctx, s):
    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.int32), _V8I32)

    return int32x8(s), codegen


@intrinsic
def load8(typingctx, a, i):
    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], _V8I32), align=4)

    return int32x8(a, types.intp), codegen


@intrinsic
def add8(typingctx, u, v):
    return int32x8(int32x8, int32x8), lambda context, builder, sig, args: builder.add(*args)


def _smax(builder, u, v):
    return builder.select(builder.icmp_signed(">", u, v), u, v)


def _smin(builder, u, v):
    return builder.select(builder.icmp_signed("<", u, v), u, v)


@intrinsic
def max8(typingctx, u, v):
    return int32x8(int32x8, int32x8), lambda context, builder, sig, args: _smax(builder, *args)


def _portable_dpbusd(builder, acc, x, w):
    """vpdpbusd without VNNI, on pack_weights' layout for it: w's first 16 bytes are columns 0 and 1
    of the 8 filters (filter by filter), its last 16 columns 2 and 3. A byte times a byte fits 16
    bits, so the products are the i16 x i16 -> i32 ones that LLVM gives to vpmaddwd, which adds
    neighbours: the 4 bytes of x as the i16 pairs (x0, x1) and (x2, x3), each repeated 8 times,
    against the two halves of w, two vpmaddwd and two adds, exact."""
    i32, v16 = ir.IntType(32), ir.VectorType(ir.IntType(32), 16)
    even = ir.Constant(ir.VectorType(i32, 8), list(range(0, 16, 2)))
    odd = ir.Constant(ir.VectorType(i32, 8), list(range(1, 16, 2)))
    lo = builder.or_(builder.and_(x, ir.Constant(i32, 0xFF)), builder.shl(builder.and_(x, ir.Constant(i32, 0xFF00)),
                                                                           ir.Constant(i32, 8)))
    hi = builder.or_(builder.and_(builder.lshr(x, ir.Constant(i32, 16)), ir.Constant(i32, 0xFF)),
                     builder.and_(builder.lshr(x, ir.Constant(i32, 8)), ir.Constant(i32, 0xFF0000)))
    w = builder.bitcast(w, _V32I8)
    for half, pair in enumerate((lo, hi)):
        u = builder.sext(builder.bitcast(_splat(builder, pair, _V8I32), ir.VectorType(ir.IntType(16), 16)), v16)
        columns = ir.Constant(ir.VectorType(i32, 16), list(range(16 * half, 16 * half + 16)))
        products = builder.mul(u, builder.sext(builder.shuffle_vector(w, w, columns), v16))
        acc = builder.add(acc, builder.add(builder.shuffle_vector(products, products, even),
                                           builder.shuffle_vector(products, products, odd)))
    return acc


@intrinsic
def dot4_add(typingctx, acc, x, wp, i):
    def codegen(context, builder, sig, args):
        acc, x, wp, i = args
        w = builder.load(_pointer(context, builder, sig.args[2], wp, i, _V8I32), align=1)
        if not HAS_VNNI:
            return _portable_dpbusd(builder, acc, x, w)
        xs = _splat(builder, x, _V8I32)
        vpdpbusd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8I32, [_V8I32] * 3), "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(vpdpbusd, [acc, xs, w])

    return int32x8(int32x8, types.uint32, wp, types.intp), codegen


def _requantize_lanes(builder, v, m0, shift, z, lo, hi):
    """fixedpoint.multiply_by_quantized_multiplier(v, m0, shift) + z, clamped to [lo, hi], in <8 x i64>.

    Each rounding of fixedpoint's is one biased arithmetic shift: SaturatingRoundingDoublingHighMul
    (x m0 + 2^30) >> 31 (its nudge and its division toward zero meet there), saturated by a min;
    RoundingDivideByPOT by e (x + 2^(e-1) - [x < 0]) >> e, the bias 0 when e = 0."""
    def const(c):
        return ir.Constant(_V8I64, [c] * 8)

    zero, one = const(0), const(1)
    x, m0, shift = builder.sext(v, _V8I64), builder.sext(m0, _V8I64), builder.sext(shift, _V8I64)
    left, right = _smax(builder, shift, zero), _smax(builder, builder.sub(zero, shift), zero)
    x = _smin(builder, _smax(builder, builder.shl(x, left), const(INT32_MIN)), const(INT32_MAX))
    high = _smin(builder, builder.ashr(builder.add(builder.mul(x, m0), const(1 << 30)), const(31)), const(INT32_MAX))
    mask = builder.sub(builder.shl(one, right), one)
    below = builder.ashr(mask, one)  # 2^(e-1) - 1, or 0
    bias = builder.select(builder.icmp_signed("<", high, zero), below, builder.sub(mask, below))
    q = builder.add(builder.ashr(builder.add(high, bias), right), z)
    return builder.trunc(_smin(builder, _smax(builder, q, lo), hi), _V8I32)


@intrinsic
def requantize8(typingctx, v, m0, shift, i, z, lo, hi):
    def codegen(context, builder, sig, args):
        v, m0, shift, i, z, lo, hi = args
        m0 = builder.load(_pointer(context, builder, sig.args[1], m0, i, _V8I32), align=4)
        shift = builder.load(_pointer(context, builder, sig.args[2], shift, i, _V8I8), align=1)
        z, lo, hi = (_splat(builder, context.cast(builder, a, t, types.int64), _V8I64)
                     for a, t in zip((z, lo, hi), sig.args[4:]))
        return _requantize_lanes(builder, v, m0, shift, z, lo, hi)

    if not (isinstance(m0, types.Array) and m0.dtype == types.int32 and isinstance(shift, types.Array)
            and shift.dtype == types.int8):
        return None
    return int32x8(int32x8, m0, shift, types.intp, z, lo, hi), codegen


@intrinsic
def store8(typingctx, out, i, v):
    def codegen(context, builder, sig, args):
        out, i, v = args
        builder.store(v, _pointer(context, builder, sig.args[0], out, i, _V8I32), align=4)
        return context.get_dummy_value()

    return types.none(out, types.intp, int32x8), codegen


@intrinsic
def store_first(typingctx, out, i, v, n):
    if not (isinstance(out, types.Array) and out.dtype in (types.int8, types.int32)):
        return None
    element = ir.IntType(out.dtype.bitwidth)

    def codegen(context, builder, sig, args):
        out, i, v, n = args
        lanes = ir.VectorType(element, 8)
        first = builder.icmp_signed("<", ir.Constant(_V8I32, list(range(8))),
                                    _splat(builder, builder.trunc(n, ir.IntType(32)), _V8I32))
        masked_store = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [lanes, lanes.as_pointer(), ir.IntType(32),
                                                            ir.VectorType(ir.IntType(1), 8)]),
            f"llvm.masked.store.v8i{element.width}.p0v8i{element.width}")
        value = v if element.width == 32 else builder.trunc(v, lanes)
        builder.call(masked_store, [value, _pointer(context, builder, sig.args[0], out, i, lanes),
                                    ir.Constant(ir.IntType(32), 1), first])
        return context.get_dummy_value()

    return types.none(out, types.intp, int32x8, types.intp), codegen


# The same operations in NumPy: what they mean, and what runs with NUMBA_DISABLE_JIT=1.


def _zeros8_python():
    return np.zeros(8, np.int32)


def _splat8_python(s):
    return np.full(8, s, np.int32)


def _load8_python(a, i):
    return a.reshape(-1)[i : i + 8].copy()


def _add8_python(u, v):
    return (u.astype(np.int64) + v).astype(np.int32)  # wraps like the machine's add


def _max8_python(u, v):
    return np.maximum(u, v)


def _dot4_add_python(acc, x, wp, i):
    u = np.array([(int(x) >> (8 * j)) & 255 for j in range(4)], np.int64)
    w = wp.reshape(-1)[i : i + 32]
    w = w.reshape(8, 4) if HAS_VNNI else w.reshape(2, 8, 2).transpose(1, 0, 2).reshape(8, 4)  # pack_weights' layouts
    return (acc + w.astype(np.int64) @ u).astype(np.int32)


def _requantize8_python(v, m0, shift, i, z, lo, hi):
    q = multiply_by_quantized_multiplier(v, m0[i : i + 8], shift[i : i + 8]) + z
    return np.clip(q, lo, hi).astype(np.int32)


def _store8_python(out, i, v):
    out.reshape(-1)[i : i + 8] = v


def _store_first_python(out, i, v, n):
    out.reshape(-1)[i : i + n] = v[:n]


if numba.config.DISABLE_JIT:
    zeros8, splat8, load8, add8, max8 = _zeros8_python, _splat8_python, _load8_python, _add8_python, _max8_python
    dot4_add = _dot4_add_python
    requantize8, store8, store_first = _requantize8_python, _store8_python, _store_first_python
