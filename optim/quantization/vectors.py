"""The int32x16 vector of the int8 kernels: 16 int32 sums in one register, and what the kernels do with them.

x86's VNNI instruction vpdpbusd adds to each int32 lane the dot product of
4 unsigned bytes with 4 signed bytes, exactly (no saturation): on 512-bit
registers, 16 lanes, 64 multiply-adds per instruction, 4x float32's FMA.
Numba does not emit it from loops (LLVM's vectoriser keeps to vpmaddwd,
int16 products), and it does not vectorise the fixed-point requantization
either (a loop of int64 shifts, multiplies and selects stays scalar, ~1 ns
an output). So the kernels say both outright, on LLVM's <16 x i32> (v an
int32x16, i an index):

    zeros16()                         [0] * 16
    load16(a, i)                      a[i : i + 16]                  (a int32)
    max16(u, v)                       maximum(u, v)
    add16(u, v)                       u + v                          (wrapping, as the machine adds)
    dot4_add(v, x, wp, i)             v[l] + sum_j u_j wp[i + 4 l + j], l < 16, u the 4 bytes of x (uint32),
                                      unsigned; wp int8 (without VNNI: wp[i + 32 (j // 2) + 2 l + j % 2],
                                      kernels.pack_weights' layout for vpmaddwd)
    requantize16(v, m0, shift, i, z, lo, hi)
                                      clamp(MultiplyByQuantizedMultiplier(v, m0[i : i + 16], shift[i : i + 16])
                                      + z, lo, hi): `fixedpoint`'s arithmetic on int32 lanes (m0 >= 0, as
                                      quantize_multiplier makes it; z, lo, hi int32 with lo - z and hi - z
                                      in int32, as the codes' bytes are)
    store16(out, i, v)                out[i : i + 16] = v              (out int32)
    finish16(out, i, v, bias, m0, shift, f, z, lo, hi, n)
                                      a GEMM's epilogue: out[i : i + n] = the first n lanes (none if n <= 0;
                                      out may end before i + 16) of requantize16(v + bias[f : f + 16], m0,
                                      shift, f, z, lo, hi) (out uint8), or with m0 empty of
                                      maximum(v + bias[f : f + 16], lo) (out int32). One operation, not a
                                      Numba function: one taking these arrays, where LLVM did not inline
                                      it (AVX2's longer code), paid their reference counts on every call.

The activations are int8 codes q but vpdpbusd wants unsigned bytes: the
kernels read and write u = q + 128 in [0, 255] (the sign bit flipped, at the
model's input), and each layer's bias holds the constant -128 sum_k w_k that
this adds to a sum. Sixteen lanes are one register with
AVX-512 and two with AVX2, where LLVM splits every operation in halves: a
CPU with AVX-VNNI alone (256-bit) runs dot4_add as two vpdpbusd, and one
without VNNI the same arithmetic spelled as widening multiplies and adds.
(With 256-bit vpdpbusd on AVX-512 registers' halves, the int8 kernels ran
at half the rate: this CPU retires two 512-bit vpdpbusd per cycle, as many
as 256-bit ones.)

No bounds checks: callers guarantee 0 <= i and i + 16 <= a.size (i + n for
finish16's out, f + 16 <= bias.size, and m0.size and shift.size where m0 is
not empty). requantize16 is the epilogue's arithmetic alone, for the tests.
With NUMBA_DISABLE_JIT=1 the operations are the NumPy expressions at the
end. Numba's cache does not see this file: after editing it, delete the
__pycache__ folders.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from minicnn.simd import HAS_VNNI, HAS_VNNI_512

from .fixedpoint import INT32_MAX, multiply_by_quantized_multiplier

LANES = 16


class Int32x16(types.Type):
    def __init__(self):
        super().__init__(name="int32x16")


int32x16 = Int32x16()
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V16I32, _V64I8 = ir.VectorType(_I32, LANES), ir.VectorType(ir.IntType(8), 64)
_V16I8 = ir.VectorType(ir.IntType(8), LANES)


@register_model(Int32x16)
class _Int32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16I32)


def _pointer(context, builder, array_type, array, index, lanes_type):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), lanes_type.as_pointer())


def _splat(builder, value, lanes_type):
    """value (a scalar of the lanes' type) in all of them."""
    one = builder.insert_element(ir.Constant(lanes_type, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, lanes_type.count), [0] * lanes_type.count))


def _indices(values):
    values = list(values)
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


@intrinsic
def zeros16(typingctx):
    return int32x16(), lambda context, builder, sig, args: ir.Constant(_V16I32, None)


@intrinsic
def load16(typingctx, a, i):
    def codegen(context, builder, sig, args):
        return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1], _V16I32), align=4)

    return int32x16(a, types.intp), codegen


def _smax(builder, u, v):
    return builder.select(builder.icmp_signed(">", u, v), u, v)


def _smin(builder, u, v):
    return builder.select(builder.icmp_signed("<", u, v), u, v)


@intrinsic
def max16(typingctx, u, v):
    return int32x16(int32x16, int32x16), lambda context, builder, sig, args: _smax(builder, *args)


@intrinsic
def add16(typingctx, u, v):
    return int32x16(int32x16, int32x16), lambda context, builder, sig, args: builder.add(*args)


def _portable_dpbusd(builder, acc, x, w):
    """vpdpbusd without VNNI, on pack_weights' layout for it: w's first 32 bytes are columns 0 and 1
    of the 16 filters (filter by filter), its last 32 columns 2 and 3. A byte times a byte fits 16
    bits, so the products are the i16 x i16 -> i32 ones that LLVM gives to vpmaddwd, which adds
    neighbours: the 4 bytes of x as the i16 pairs (x0, x1) and (x2, x3), each repeated 16 times,
    against the two halves of w, two vpmaddwd (four on AVX2) and two adds, exact."""
    v32 = ir.VectorType(_I32, 32)
    lo = builder.or_(builder.and_(x, ir.Constant(_I32, 0xFF)), builder.shl(builder.and_(x, ir.Constant(_I32, 0xFF00)),
                                                                            ir.Constant(_I32, 8)))
    hi = builder.or_(builder.and_(builder.lshr(x, ir.Constant(_I32, 16)), ir.Constant(_I32, 0xFF)),
                     builder.and_(builder.lshr(x, ir.Constant(_I32, 8)), ir.Constant(_I32, 0xFF0000)))
    w = builder.bitcast(w, _V64I8)
    for half, pair in enumerate((lo, hi)):
        u = builder.sext(builder.bitcast(_splat(builder, pair, _V16I32), ir.VectorType(ir.IntType(16), 32)), v32)
        products = builder.mul(u, builder.sext(builder.shuffle_vector(w, w, _indices(range(32 * half, 32 * half + 32))),
                                               v32))
        acc = builder.add(acc, builder.add(builder.shuffle_vector(products, products, _indices(range(0, 32, 2))),
                                           builder.shuffle_vector(products, products, _indices(range(1, 32, 2)))))
    return acc


def _vpdpbusd(builder, acc, xs, w, lanes):
    vector = ir.VectorType(_I32, lanes)
    return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                                       f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"), [acc, xs, w])


@intrinsic
def dot4_add(typingctx, acc, x, wp, i):
    def codegen(context, builder, sig, args):
        acc, x, wp, i = args
        w = builder.load(_pointer(context, builder, sig.args[2], wp, i, _V16I32), align=1)
        if not HAS_VNNI:
            return _portable_dpbusd(builder, acc, x, w)
        xs = _splat(builder, x, _V16I32)
        if HAS_VNNI_512:
            return _vpdpbusd(builder, acc, xs, w, LANES)
        halves = [_vpdpbusd(builder, *(builder.shuffle_vector(v, v, _indices(range(8 * h, 8 * h + 8)))
                                        for v in (acc, xs, w)), 8) for h in (0, 1)]
        return builder.shuffle_vector(*halves, _indices(range(LANES)))

    return int32x16(int32x16, types.uint32, wp, types.intp), codegen


def _requantize_lanes(builder, v, m0, shift, z, lo, hi):
    """fixedpoint.multiply_by_quantized_multiplier(v, m0, shift) + z, clamped to [lo, hi], on the 16
    int32 lanes themselves, for m0 in [0, 2^31) (quantize_multiplier's; int8_epilogue checks it) and
    z, lo and hi int32 with lo - z and hi - z in int32, as the codes' are.

    x 2^left, saturated, is computed only when some lane has left = max(shift, 0) > 0: multipliers
    below 1, every layer's in practice, have none, and the branch goes the same way for every window
    of a layer. Only the product needs 64 bits: x m0 runs as two vpmuldq (32 x 32 -> 64 bits, the even
    lanes, then the odd ones shifted down), and SaturatingRoundingDoublingHighMul's (x m0 + 2^30) >> 31
    (its nudge and its division toward zero meet there) is bits 31..62 of each sum, put back in place
    by a shift and a blend. It fits int32: its one overflow, x = m0 = -2^31, needs a negative m0.
    RoundingDivideByPOT by e is TFLite's (x >> e) + [(x & mask) > (mask >> 1) + [x < 0]], mask =
    2^e - 1, which cannot overflow. About 30 vector instructions per 16 outputs without a left shift;
    about 43 with the saturation always computed, and 58 on <16 x i64> (two registers per value)."""
    def const(c, lanes=LANES, width=32):
        return ir.Constant(ir.VectorType(ir.IntType(width), lanes), [c] * lanes)

    zero, one = const(0), const(1)
    shift = builder.sext(shift, _V16I32)
    right = _smax(builder, builder.sub(zero, shift), zero)
    any_left = builder.icmp_unsigned("!=", builder.bitcast(builder.icmp_signed(">", shift, zero), ir.IntType(LANES)),
                                     ir.Constant(ir.IntType(LANES), 0))
    before = builder.block
    with builder.if_then(any_left, likely=False):
        left = _smax(builder, shift, zero)
        shifted = builder.shl(v, left)  # x 2^left, saturated where it overflows: the sign's extreme
        extreme = builder.xor(builder.ashr(v, const(31)), const(INT32_MAX))
        saturated = builder.select(builder.icmp_signed("!=", builder.ashr(shifted, left), v), extreme, shifted)
        shifted_block = builder.block
    x = builder.phi(_V16I32)
    x.add_incoming(v, before)
    x.add_incoming(saturated, shifted_block)
    v8i64 = ir.VectorType(_I64, 8)
    x64, m64, c32 = builder.bitcast(x, v8i64), builder.bitcast(m0, v8i64), const(32, 8, 64)
    nudge = const(1 << 30, 8, 64)
    even = builder.add(builder.mul(builder.ashr(builder.shl(x64, c32), c32), builder.ashr(builder.shl(m64, c32), c32)),
                       nudge)
    odd = builder.add(builder.mul(builder.ashr(x64, c32), builder.ashr(m64, c32)), nudge)
    even, odd = builder.lshr(even, const(31, 8, 64)), builder.shl(odd, const(1, 8, 64))  # bits 31..62 in place
    high = builder.shuffle_vector(builder.bitcast(even, _V16I32), builder.bitcast(odd, _V16I32),
                                  _indices(l + LANES * (l % 2) for l in range(LANES)))
    mask = builder.sub(builder.shl(one, right), one)
    threshold = builder.add(builder.ashr(mask, one), builder.lshr(high, const(31)))
    up = builder.zext(builder.icmp_signed(">", builder.and_(high, mask), threshold), _V16I32)
    q = builder.add(builder.ashr(high, right), up)
    # clamp(q + z, lo, hi) = clamp(q, lo - z, hi - z) + z: no int32 overflow on the way
    return builder.add(_smin(builder, _smax(builder, q, builder.sub(lo, z)), builder.sub(hi, z)), z)


def _requantized(context, builder, v, m0_type, m0, shift_type, shift, i, z, lo, hi):
    """requantize16's lanes: m0 and shift read from i on, z, lo and hi (int32 values) splat."""
    m0 = builder.load(_pointer(context, builder, m0_type, m0, i, _V16I32), align=4)
    shift = builder.load(_pointer(context, builder, shift_type, shift, i, _V16I8), align=1)
    return _requantize_lanes(builder, v, m0, shift, *(_splat(builder, a, _V16I32) for a in (z, lo, hi)))


def _is_epilogue(m0, shift):
    return isinstance(m0, types.Array) and m0.dtype == types.int32 and isinstance(shift, types.Array) \
        and shift.dtype == types.int8


@intrinsic
def requantize16(typingctx, v, m0, shift, i, z, lo, hi):
    def codegen(context, builder, sig, args):
        v, m0, shift, i, *scalars = args
        z, lo, hi = (context.cast(builder, a, t, types.int32) for a, t in zip(scalars, sig.args[4:]))
        return _requantized(context, builder, v, sig.args[1], m0, sig.args[2], shift, i, z, lo, hi)

    if not _is_epilogue(m0, shift):
        return None
    return int32x16(int32x16, m0, shift, types.intp, z, lo, hi), codegen


@intrinsic
def store16(typingctx, out, i, v):
    def codegen(context, builder, sig, args):
        out, i, v = args
        builder.store(v, _pointer(context, builder, sig.args[0], out, i, _V16I32), align=4)
        return context.get_dummy_value()

    return types.none(out, types.intp, int32x16), codegen


def _store_first(context, builder, out_type, out, i, v, n):
    """out[i : i + n] = v[:n] (truncated to out's bytes): a plain store when n >= 16 (AVX2 has no
    byte-masked store, and LLVM spells one as 16 branches), else a masked one (none for n <= 0)."""
    lanes = ir.VectorType(ir.IntType(out_type.dtype.bitwidth), LANES)
    value, at = builder.trunc(v, lanes) if lanes != v.type else v, _pointer(context, builder, out_type, out, i, lanes)
    with builder.if_else(builder.icmp_signed(">=", n, ir.Constant(n.type, LANES))) as (whole, part):
        with whole:
            builder.store(value, at, align=1)
        with part:
            first = builder.icmp_signed("<", _indices(range(LANES)), _splat(builder, builder.trunc(n, _I32), _V16I32))
            masked_store = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [lanes, lanes.as_pointer(), _I32,
                                                                ir.VectorType(ir.IntType(1), LANES)]),
                f"llvm.masked.store.v{LANES}i{lanes.element.width}.p0v{LANES}i{lanes.element.width}")
            builder.call(masked_store, [value, at, ir.Constant(_I32, 1), first])


@intrinsic
def finish16(typingctx, out, i, v, bias, m0, shift, f, z, lo, hi, n):
    if not (_is_epilogue(m0, shift) and isinstance(out, types.Array) and out.dtype in (types.uint8, types.int32)
            and isinstance(bias, types.Array) and bias.dtype == types.int32):
        return None

    def codegen(context, builder, sig, args):
        out, i, v, bias, m0, shift, f, *scalars, n = args
        z, lo, hi = (context.cast(builder, a, t, types.int32) for a, t in zip(scalars, sig.args[7:10]))
        v = builder.add(v, builder.load(_pointer(context, builder, sig.args[3], bias, f, _V16I32), align=4))
        codes = builder.icmp_signed(">", context.make_array(sig.args[4])(context, builder, m0).nitems,
                                    ir.Constant(_I64, 0))
        with builder.if_else(codes) as (requantized, sums):
            with requantized:
                _store_first(context, builder, sig.args[0], out, i,
                             _requantized(context, builder, v, sig.args[4], m0, sig.args[5], shift, f, z, lo, hi), n)
            with sums:
                _store_first(context, builder, sig.args[0], out, i, _smax(builder, v, _splat(builder, lo, _V16I32)), n)
        return context.get_dummy_value()

    return types.none(out, types.intp, int32x16, bias, m0, shift, types.intp, z, lo, hi, types.intp), codegen


# The same operations in NumPy: what they mean, and what runs with NUMBA_DISABLE_JIT=1.


def _zeros16_python():
    return np.zeros(LANES, np.int32)


def _load16_python(a, i):
    return a.reshape(-1)[i : i + LANES].copy()


def _max16_python(u, v):
    return np.maximum(u, v)


def _add16_python(u, v):
    return (u.astype(np.int64) + v).astype(np.int32)  # wraps like the machine's add


def _dot4_add_python(acc, x, wp, i):
    u = np.array([(int(x) >> (8 * j)) & 255 for j in range(4)], np.int64)
    w = wp.reshape(-1)[i : i + 4 * LANES]
    w = w.reshape(LANES, 4) if HAS_VNNI else w.reshape(2, LANES, 2).transpose(1, 0, 2).reshape(LANES, 4)
    return (acc + w.astype(np.int64) @ u).astype(np.int32)  # w[l, j], pack_weights' layouts


def _requantize16_python(v, m0, shift, i, z, lo, hi):
    q = multiply_by_quantized_multiplier(v, m0[i : i + LANES], shift[i : i + LANES]) + z
    return np.clip(q, lo, hi).astype(np.int32)


def _store16_python(out, i, v):
    out.reshape(-1)[i : i + LANES] = v


def _finish16_python(out, i, v, bias, m0, shift, f, z, lo, hi, n):
    v = (v.astype(np.int64) + bias[f : f + LANES]).astype(np.int32)  # wraps like the machine's add
    v = _requantize16_python(v, m0, shift, f, z, lo, hi) if m0.size else np.maximum(v, lo)
    if n > 0:
        out.reshape(-1)[i : i + n] = v[:n].astype(out.dtype)


if numba.config.DISABLE_JIT:
    zeros16, load16, max16, add16 = _zeros16_python, _load16_python, _max16_python, _add16_python
    dot4_add = _dot4_add_python
    requantize16, store16, finish16 = _requantize16_python, _store16_python, _finish16_python
