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
    dot64_add(v, x32, xi, wd, wi)     v + the 64 products of x32[xi : xi + 16]'s bytes (unsigned) with
                                      wd[wi : wi + 64] (int8), byte by byte, in some lanes: their sum,
                                      sum16, is the dot product (a row's 64 bytes against a filter's)
    sum16(v)                          the sum of the 16 lanes (wrapping)
    requantize16(v, table, i, z, lo, hi)
                                      clamp(MultiplyByQuantizedMultiplier(v + b[i : i + 16], m0[i : i + 16],
                                      shift[i : i + 16]) + z, lo, hi): `fixedpoint`'s arithmetic, bit for
                                      bit, with table = requantization_table(m0, shift, b) (m0 >= 0, as
                                      quantize_multiplier makes it; v + b within int32, as TFLite's
                                      accumulator, added exactly; z, lo, hi int32 with lo - z and hi - z
                                      within +- CLAMP_LIMIT = 2^30 - 1, as the codes' bytes are)
    store16(out, i, v)                out[i : i + 16] = v              (out int32)
    finish16(out, i, v, bias, table, f, z, lo, hi, n)
                                      a GEMM's epilogue: out[i : i + n] = the first n lanes (none if n <= 0;
                                      out may end before i + 16) of requantize16(v, table, f, z, lo, hi)
                                      (out uint8; the table holds the bias), or with table empty of
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
finish16's out, f + 16 <= bias.size, and 4 f + 64 <= table.size where table is not
empty). requantize16 is the epilogue's arithmetic alone, for the tests.
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

from .fixedpoint import INT32_MAX, SHIFT_RANGE

LANES = 16


class Int32x16(types.Type):
    def __init__(self):
        super().__init__(name="int32x16")


int32x16 = Int32x16()
_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V16I32, _V64I8 = ir.VectorType(_I32, LANES), ir.VectorType(ir.IntType(8), 64)


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
        return _vnni(builder, acc, _splat(builder, x, _V16I32), w)

    return int32x16(int32x16, types.uint32, wp, types.intp), codegen


def _portable_dot64(builder, acc, x, w):
    """vpdpbusd of 64 bytes x and w without VNNI: each half's 32 products, unsigned x by signed w, fit
    16 bits, and are added in neighbouring pairs (vpmaddwd's pattern, as _portable_dpbusd), then in
    pairs again; the lanes hold other sums than vpdpbusd's, but the same total."""
    v32 = ir.VectorType(_I32, 32)
    x, w = builder.bitcast(x, _V64I8), builder.bitcast(w, _V64I8)
    for half in range(2):
        part = _indices(range(32 * half, 32 * half + 32))
        products = builder.mul(builder.zext(builder.shuffle_vector(x, x, part), v32),
                               builder.sext(builder.shuffle_vector(w, w, part), v32))
        acc = builder.add(acc, builder.add(builder.shuffle_vector(products, products, _indices(range(0, 32, 2))),
                                           builder.shuffle_vector(products, products, _indices(range(1, 32, 2)))))
    return acc


def _vnni(builder, acc, xs, w):
    """vpdpbusd on 16 lanes: one 512-bit instruction, or two 256-bit ones (AVX-VNNI)."""
    if HAS_VNNI_512:
        return _vpdpbusd(builder, acc, xs, w, LANES)
    halves = [_vpdpbusd(builder, *(builder.shuffle_vector(v, v, _indices(range(8 * h, 8 * h + 8)))
                                    for v in (acc, xs, w)), 8) for h in (0, 1)]
    return builder.shuffle_vector(*halves, _indices(range(LANES)))


@intrinsic
def dot64_add(typingctx, acc, x32, xi, wd, wi):
    def codegen(context, builder, sig, args):
        acc, x32, xi, wd, wi = args
        x = builder.load(_pointer(context, builder, sig.args[1], x32, xi, _V16I32), align=4)
        w = builder.load(_pointer(context, builder, sig.args[3], wd, wi, _V16I32), align=1)
        return _vnni(builder, acc, x, w) if HAS_VNNI else _portable_dot64(builder, acc, x, w)

    if not (isinstance(x32, types.Array) and x32.dtype == types.uint32 and isinstance(wd, types.Array)
            and wd.dtype == types.int8):  # the indices count their elements: 4-byte words, bytes
        return None
    return int32x16(int32x16, x32, types.intp, wd, types.intp), codegen


@intrinsic
def sum16(typingctx, v):
    def codegen(context, builder, sig, args):
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_V16I32]),
                                                "llvm.vector.reduce.add.v16i32")
        return builder.call(reduce, args)

    return types.int32(int32x16), codegen


def requantization_table(m0, shift, bias=None):
    """The per-filter constants of requantize16, int64 (n // 16, 8, 8) flattened, for multipliers m0
    int32 in [0, 2^31) (quantize_multiplier's), shifts int8 in SHIFT_RANGE and the biases int32 added
    to the sums first (none: 0), n = len(m0) a multiple of 16.

    TFLite's two roundings of x M0 2^(shift - 31) for a right shift e = -shift > 0 are one:

        h = floor((x M0 + 2^30) / 2^31)                       SaturatingRoundingDoublingHighMul
        q = floor((h + 2^(e-1) - [h < 0]) / 2^e)              RoundingDivideByPOT
          = floor((x M0 + A - C [x M0 < -2^30]) / 2^S)        (floor(floor(y) / 2^e) = floor(y / 2^e))

    with S = 31 + e, A = 2^30 + 2^(30 + e), C = 2^31. For a left shift l = shift >= 0 (no second
    rounding) h = floor((x 2^l M0 + 2^30) / 2^31) = floor((x M0 + 2^(30 - l)) / 2^(31 - l)): S = 31 - l,
    A = 2^(30 - l), C = 0. Where x 2^l overflows int32, TFLite saturates x and the result is about M0
    in size, which for l > 0 is at least 2^30 (quantize_multiplier's, and checked here); this one is
    larger still, of the same sign: a clamp within +- CLAMP_LIMIT makes both the same.

    x is a sum s plus the bias b, and (s + b) M0 = s M0 + b M0 (|b M0| < 2^62): the table takes b into A
    and into the correction's test, s M0 < T = -2^30 - b M0 (T = -2^63, never, where C = 0), so the
    lanes need not add it. Per 16 filters 8 rows of 8, in the lanes' order for 64-bit arithmetic (the
    even filters' 8 values, then the odd ones'): M0, M0; A + b M0, A + b M0; T, T; then S, S, or,
    where every one of the 16 shifts right (S >= 32: a real multiplier below 1/2, as a layer's nearly
    always is), the short path's row: S - 32 for the 16 filters in order, as int32 pairs, and a row of
    zeros (never S's, which are >= 1). A filter with M0 = 0, whose result is 0 whatever its shift,
    counts as shifting right."""
    m0, shift = np.asarray(m0, np.int64), np.asarray(shift, np.int64)
    bias = np.zeros_like(m0) if bias is None else np.asarray(bias, np.int64)
    if not m0.shape == shift.shape == bias.shape or m0.ndim != 1 or m0.size % LANES:
        raise ValueError(f"one multiplier, shift and bias per filter, a multiple of {LANES} of them: got "
                         f"{m0.shape}, {shift.shape} and {bias.shape}")
    if m0.size and not (0 <= m0.min() and m0.max() <= INT32_MAX):
        raise ValueError("the requantization multipliers must lie in [0, 2^31) (quantize_multiplier's)")
    if shift.size and not SHIFT_RANGE[0] <= shift.min() <= shift.max() <= SHIFT_RANGE[1]:
        raise ValueError(f"requantization shifts must lie in {SHIFT_RANGE}, got {shift.min()} .. {shift.max()}")
    if np.any((shift > 0) & (m0 < 1 << 30)):
        raise ValueError("a multiplier with a left shift must be at least 2^30 (quantize_multiplier's M0)")
    if bias.size and not (-INT32_MAX - 1 <= bias.min() and bias.max() <= INT32_MAX):
        raise ValueError("the biases must be int32")
    shift = np.where(m0 == 0, -1, shift)
    S, right = 31 - shift, shift < 0
    A = (1 << (S - 1)) + np.where(right, 1 << 30, 0) + bias * m0
    T = np.where(right, -(1 << 30) - bias * m0, np.iinfo(np.int64).min)
    groups = m0.size // LANES
    rows = np.stack([m0, A, T, S], axis=1).reshape(groups, LANES // 2, 2, 4)  # (block, pair, even/odd, row)
    table = np.ascontiguousarray(rows.transpose(0, 3, 2, 1)).reshape(groups, 8, 8)
    by_group = S.reshape(groups, LANES)
    short = by_group.min(axis=1) >= 32
    table[short, 6] = (by_group[short] - 32).astype(np.int32).view(np.int64).reshape(-1, 8)
    table[short, 7] = 0
    return table.reshape(-1)


CLAMP_LIMIT = 2**30 - 1  # requantize16's clamp must lie within z +- CLAMP_LIMIT (codes' lie within 255)


def _requantize_lanes(builder, x, row, z, lo, hi):
    """clamp(fixedpoint.multiply_by_quantized_multiplier(x + b, m0, shift) + z, lo, hi) on the 16 int32
    lanes x, row(k) loading the k-th of the 8 rows of requantization_table(m0, shift, b) for these 16
    filters (<8 x i64>), z, lo and hi int32 with lo - z and hi - z within +- CLAMP_LIMIT, as the
    codes' are.

    requantization_table's single rounding: x M0 as two vpmuldq (32 x 32 -> 64 bits, the even lanes,
    then the odd ones shifted down), + A + b M0, - 2^31 where x M0 < T, then the shift by S. The
    correction matters only for results below 0: a clamp at lo >= z (a fused ReLU) makes them all lo,
    corrected or not, and skips it. Where every S >= 32 (the table's short row), the sums' high 32-bit
    halves are floor(sum / 2^32): one shuffle puts them in order, one 32-bit shift by S - 32 ends the
    division, and the clamp runs on 16 lanes, not 2 x 8. Else each 64-bit sum is shifted by S and
    clamped (a left shift's result may not fit 32 bits) before its low half is kept. No branch on a
    lane. About 10 vector instructions per 16 outputs on the short path, 13 on the long one (4 more
    with the correction), against 15 before the table held the bias and the short row (the seed CNN's
    conv on 16 images: 37 -> 32 us), and 30 for TFLite's two roundings spelled out on the int32 lanes."""
    def const(c, lanes=LANES, width=32):
        return ir.Constant(ir.VectorType(ir.IntType(width), lanes), [c] * lanes)

    v8i64, c32 = ir.VectorType(_I64, 8), const(32, 8, 64)
    x64 = builder.bitcast(x, v8i64)

    def low(u):  # the low 32 bits, sign-extended: what vpmuldq multiplies
        return builder.ashr(builder.shl(u, c32), c32)

    products = [builder.mul(low(x64), low(row(0))), builder.mul(builder.ashr(x64, c32), low(row(1)))]
    sums = [builder.add(p, row(2 + h)) for h, p in enumerate(products)]
    negative = builder.icmp_signed("<", lo, z)
    before = builder.block
    with builder.if_then(negative):
        corrected = [builder.select(builder.icmp_signed("<", p, row(4 + h)), builder.sub(t, const(1 << 31, 8, 64)), t)
                     for h, (p, t) in enumerate(zip(products, sums))]
        corrected_block = builder.block
    for h in range(2):
        phi = builder.phi(v8i64)
        phi.add_incoming(sums[h], before)
        phi.add_incoming(corrected[h], corrected_block)
        sums[h] = phi
    # clamp(q + z, lo, hi) = clamp(q, lo - z, hi - z) + z: no overflow on the way
    lo_z, hi_z = builder.sub(lo, z), builder.sub(hi, z)
    short = builder.icmp_signed("==", row(7, scalar=True), ir.Constant(_I64, 0))
    with builder.if_else(short) as (high, wide):
        with high:
            halves = [builder.bitcast(t, _V16I32) for t in sums]
            q = builder.shuffle_vector(*halves, _indices(l + 1 if l % 2 == 0 else LANES + l for l in range(LANES)))
            q = builder.ashr(q, builder.bitcast(row(6), _V16I32))
            q_short = _smin(builder, _smax(builder, q, _splat(builder, lo_z, _V16I32)), _splat(builder, hi_z, _V16I32))
            short_block = builder.block
        with wide:
            bounds = [_splat(builder, builder.sext(b, _I64), v8i64) for b in (lo_z, hi_z)]
            even, odd = (builder.bitcast(_smin(builder, _smax(builder, builder.ashr(t, row(6 + h)), bounds[0]),
                                               bounds[1]), _V16I32) for h, t in enumerate(sums))
            q_wide = builder.shuffle_vector(even, odd, _indices(l // 2 * 2 + LANES * (l % 2) for l in range(LANES)))
            wide_block = builder.block
    q = builder.phi(_V16I32)
    q.add_incoming(q_short, short_block)
    q.add_incoming(q_wide, wide_block)
    return builder.add(q, _splat(builder, z, _V16I32))


def _requantized(context, builder, v, table_type, table, i, z, lo, hi):
    """requantize16's lanes: the 16 filters' rows of table from 4 i on, z, lo and hi int32 scalars."""
    at = builder.mul(i, ir.Constant(i.type, 4))

    def row(k, scalar=False):
        pointer = _pointer(context, builder, table_type, table, builder.add(at, ir.Constant(i.type, 8 * k)),
                           _I64 if scalar else ir.VectorType(_I64, 8))
        return builder.load(pointer, align=8)

    return _requantize_lanes(builder, v, row, z, lo, hi)


def _is_table(table):
    return isinstance(table, types.Array) and table.dtype == types.int64


@intrinsic
def requantize16(typingctx, v, table, i, z, lo, hi):
    def codegen(context, builder, sig, args):
        v, table, i, *scalars = args
        z, lo, hi = (context.cast(builder, a, t, types.int32) for a, t in zip(scalars, sig.args[3:]))
        return _requantized(context, builder, v, sig.args[1], table, i, z, lo, hi)

    if not _is_table(table):
        return None
    return int32x16(int32x16, table, types.intp, z, lo, hi), codegen


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
def finish16(typingctx, out, i, v, bias, table, f, z, lo, hi, n):
    if not (_is_table(table) and isinstance(out, types.Array) and out.dtype in (types.uint8, types.int32)
            and isinstance(bias, types.Array) and bias.dtype == types.int32):
        return None

    def codegen(context, builder, sig, args):
        out, i, v, bias, table, f, *scalars, n = args
        z, lo, hi = (context.cast(builder, a, t, types.int32) for a, t in zip(scalars, sig.args[6:9]))
        codes = builder.icmp_signed(">", context.make_array(sig.args[4])(context, builder, table).nitems,
                                    ir.Constant(_I64, 0))
        with builder.if_else(codes) as (requantized, sums):
            with requantized:  # the table holds the bias
                _store_first(context, builder, sig.args[0], out, i,
                             _requantized(context, builder, v, sig.args[4], table, f, z, lo, hi), n)
            with sums:
                v = builder.add(v, builder.load(_pointer(context, builder, sig.args[3], bias, f, _V16I32), align=4))
                _store_first(context, builder, sig.args[0], out, i, _smax(builder, v, _splat(builder, lo, _V16I32)), n)
        return context.get_dummy_value()

    return types.none(out, types.intp, int32x16, bias, table, types.intp, z, lo, hi, types.intp), codegen


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


def _dot64_add_python(acc, x32, xi, wd, wi):
    x = x32.reshape(-1)[xi : xi + LANES].view(np.uint8).astype(np.int64).reshape(LANES, 4)
    return (acc + (x * wd.reshape(-1)[wi : wi + 4 * LANES].reshape(LANES, 4)).sum(axis=1)).astype(np.int32)


def _sum16_python(v):
    return v.astype(np.int64).sum().astype(np.int32)  # wraps like the machine's adds


def _requantize16_python(v, table, i, z, lo, hi):
    rows = table[4 * i : 4 * i + 4 * LANES].reshape(8, 8)
    m0, a, t, s = rows.reshape(4, 2, LANES // 2).transpose(0, 2, 1).reshape(4, LANES)  # lane order
    p = v.astype(np.int64) * m0
    sums = p + a - (1 << 31) * ((p < t) & (lo < z))  # the correction, which a clamp at lo >= z skips
    if rows[7, 0] == 0:  # the short path: the high 32 bits, shifted by S - 32
        q = (sums >> 32).astype(np.int32) >> rows[6].view(np.int32)
    else:
        q = sums >> s
    return (np.clip(q, lo - z, hi - z) + z).astype(np.int32)


def _store16_python(out, i, v):
    out.reshape(-1)[i : i + LANES] = v


def _finish16_python(out, i, v, bias, table, f, z, lo, hi, n):
    if table.size:
        v = _requantize16_python(v, table, f, z, lo, hi)
    else:
        v = np.maximum((v.astype(np.int64) + bias[f : f + LANES]).astype(np.int32), lo)  # wraps like the machine's add
    if n > 0:
        out.reshape(-1)[i : i + n] = v[:n].astype(out.dtype)


if numba.config.DISABLE_JIT:
    zeros16, load16, max16, add16 = _zeros16_python, _load16_python, _max16_python, _add16_python
    dot4_add, dot64_add, sum16 = _dot4_add_python, _dot64_add_python, _sum16_python
    requantize16, store16, finish16 = _requantize16_python, _store16_python, _finish16_python
