"""Explicit SIMD for Numba kernels: a value type of 16 float32 lanes and what kernels do with it.

Numba hands loops to LLVM, which vectorises an innermost loop by itself but
cannot keep running sums in registers across the loop around it: it cannot
prove that the arrays involved do not overlap, so every pass loads the sums
from memory and stores them back. Numba also leaves LLVM's SLP vectoriser
(the pass that would pack sixteen scalar sums into one register) switched
off. A sparse kernel needs exactly those register-resident sums, so the
kernels of `optim.sparse` say it outright with the type `f32x16`, LLVM's
<16 x float>, and these operations (x is a 1-D float32 array, i an index):

    load(x, i)              x[i : i + 16]
    store(x, i, v)          x[i : i + 16] = v
    splat(s)                [s, s, ..., s]
    broadcast(x, i)         [x[i], x[i], ..., x[i]] (one load: folds into the fma that uses it)
    maximum(a, b)           numpy.maximum(a, b) (NaN where either is)
    load_first(x, i, n)     x[i : i + n] then zeros, 0 <= n <= 16 (a masked load: x may end before i + 16)
    store_first(x, i, v, n) x[i : i + n] = v[:n], 0 <= n <= 16 (a masked store: x may end before i + 16)
    fma(a, b, c)            a * b + c (llvm.fmuladd: one fused instruction where the CPU has FMA)
    add(a, b)               a + b
    mul(a, b)               a * b
    absolute(a)             numpy.abs(a)
    total(a)                a.sum(), float32, its adds in any order (llvm.vector.reduce.fadd, reassociable)
    add_where(a, m, i, b)   a + b in the lanes whose bit of m[i] is 1, a elsewhere (m: uint16 array, lane 0 bit 0)
    permute2(lo, k, j, hi)  concatenate([lo, hi])[k[j : j + 16]]   (k: uint8 array, entries 0..31)

and `transpose16(src, i, ss, dst, j, ds)`, which moves a 16 x 16 block:
dst[j + c*ds + r] = src[i + r*ss + c], in registers (16 loads, 64
two-vector shuffles, 16 stores, where a scalar loop takes 256 of each);
and `aligned_empty(n)`, a float32 array whose first element sits on a 64-byte
boundary: a vector load that straddles two cache lines costs two
(docs/techniques.md gives what alignment bought the sparse kernels).

Each is a few lines of LLVM IR through `numba.extending.intrinsic`. LLVM
maps the vectors onto what the CPU has: one 512-bit register with AVX-512,
two 256-bit ones with AVX2, four 128-bit ones otherwise. `permute2` is the
exception: it is AVX-512's vpermi2ps, a 16-lane table lookup into 32 floats
held in two registers, and exists only where `HAS_PERMUTE` is true; a
kernel that uses it must not even be compiled elsewhere.

The helpers `is_array_of` (a typing test), `lanes_at` (a pointer to array[i] seen as lanes)
and `first_lanes` (the mask of the first n lanes) serve other modules' intrinsics too
(optim.binary.lanes).

No bounds checks: callers guarantee 0 <= i and i + 16 <= x.size (j
likewise for k; i + n <= x.size for load_first and store_first). tests/test_simd.py checks each operation against NumPy.
With NUMBA_DISABLE_JIT=1 the operations are those NumPy expressions (the
`_python` versions at the end), so the kernels run as plain Python. Numba's
cache does not see this file: after editing it, delete the __pycache__
folders, or kernels compiled against the old version keep running.
"""

import llvmlite.binding
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16

_FLOATS = ir.VectorType(ir.FloatType(), LANES)
_INTS = ir.VectorType(ir.IntType(32), LANES)
_BYTES = ir.VectorType(ir.IntType(8), LANES)


def host_features():
    """The features of the CPU this process runs on, whatever Numba is told to compile for."""
    return {name for name, on in llvmlite.binding.get_host_cpu_features().items() if on}


def target_features():
    """The CPU features Numba compiles for: the host's, unless NUMBA_CPU_NAME or NUMBA_CPU_FEATURES
    name another target (portable caches do, and so can a test that wants the portable kernels):
    then those NUMBA_CPU_FEATURES lists, and none for a CPU named without them."""
    if numba.config.CPU_FEATURES is not None:
        return {f[1:] for f in numba.config.CPU_FEATURES.split(",") if f.startswith("+")}
    if numba.config.CPU_NAME not in (None, "host"):
        return set()
    return host_features()


_FEATURES = target_features()
HAS_PERMUTE = "avx512f" in _FEATURES  # vpermi2ps
# vpdpbusd on 256-bit vectors: AVX-VNNI, or AVX512-VNNI with AVX512-VL; on 512-bit ones: AVX512-VNNI.
HAS_VNNI = "avxvnni" in _FEATURES or {"avx512vnni", "avx512vl"} <= _FEATURES
HAS_VNNI_512 = "avx512vnni" in _FEATURES


class F32x16(types.Type):
    """Numba's type for 16 float32 lanes, held in registers like any scalar."""

    def __init__(self):
        super().__init__(name="f32x16")


f32x16 = F32x16()


@register_model(F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _FLOATS)


@numba.njit(cache=True)
def aligned_empty(n):
    """An uninitialised (n,) float32 array starting on a 64-byte boundary (a cache line)."""
    spare = np.empty(n + LANES - 1, dtype=np.float32)
    start = (-(spare.ctypes.data // 4)) % LANES
    return spare[start : start + n]


def lanes_at(context, builder, array_type, array, index_type, index, lanes_type):
    """A pointer to array[index], seen as a vector of `lanes_type`."""
    data = context.make_array(array_type)(context, builder, array).data
    index = context.cast(builder, index, index_type, types.intp)  # a signed GEP index, as wide as a pointer
    return builder.bitcast(builder.gep(data, [index]), lanes_type.as_pointer())


def is_array_of(array, dtype, writable=False):
    """A 1-D C-contiguous array of dtype (and writable, if asked): what the operations read 16 at a time."""
    return (isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C"
            and array.dtype == dtype and (array.mutable or not writable))


@intrinsic
def load(typingctx, x, i):
    """x[i : i + 16] as a vector; x is a 1-D float32 array."""
    if not (is_array_of(x, types.float32) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(lanes_at(context, builder, sig.args[0], args[0], sig.args[1], args[1], _FLOATS), align=4)

    return f32x16(x, i), codegen


@intrinsic
def store(typingctx, x, i, v):
    """x[i : i + 16] = v."""
    if not (is_array_of(x, types.float32, writable=True) and isinstance(i, types.Integer) and v == f32x16):
        return None

    def codegen(context, builder, sig, args):
        target = lanes_at(context, builder, sig.args[0], args[0], sig.args[1], args[1], _FLOATS)
        builder.store(args[2], target, align=4)
        return context.get_dummy_value()

    return types.none(x, i, v), codegen


@intrinsic
def splat(typingctx, s):
    """The vector with s in every lane."""
    if not isinstance(s, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[0], sig.args[0], types.float32)
        first = builder.insert_element(ir.Constant(_FLOATS, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(first, ir.Constant(_FLOATS, ir.Undefined), ir.Constant(_INTS, [0] * LANES))

    return f32x16(s), codegen


@intrinsic
def broadcast(typingctx, x, i):
    """x[i] in every lane; x is a 1-D float32 array. LLVM folds the load into the instruction
    that uses it (vbroadcastss, or an fma's {1to16} memory operand)."""
    if not (is_array_of(x, types.float32) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = builder.load(lanes_at(context, builder, sig.args[0], args[0], sig.args[1], args[1], ir.FloatType()))
        first = builder.insert_element(ir.Constant(_FLOATS, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(first, ir.Constant(_FLOATS, ir.Undefined), ir.Constant(_INTS, [0] * LANES))

    return f32x16(x, i), codegen


@intrinsic
def maximum(typingctx, a, b):
    """The larger of a and b lane by lane, NaN where either is: numpy.maximum (llvm.maximum)."""
    if not a == b == f32x16:
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_FLOATS, [_FLOATS] * 2)
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.maximum.v16f32"), args)

    return f32x16(a, b), codegen


def first_lanes(builder, n):
    """The mask of lanes 0 .. n - 1 (n an i32)."""
    first = builder.insert_element(ir.Constant(_INTS, ir.Undefined), n, ir.Constant(ir.IntType(32), 0))
    lanes = builder.shuffle_vector(first, ir.Constant(_INTS, ir.Undefined), ir.Constant(_INTS, [0] * LANES))
    return builder.icmp_signed("<", ir.Constant(_INTS, list(range(LANES))), lanes)


@intrinsic
def load_first(typingctx, x, i, n):
    """[x[i], ..., x[i + n - 1], 0, ..., 0] for 0 <= n <= 16: llvm.masked.load, which reads no
    memory outside the n lanes."""
    if not (is_array_of(x, types.float32) and isinstance(i, types.Integer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        source = lanes_at(context, builder, sig.args[0], args[0], sig.args[1], args[1], _FLOATS)
        mask = first_lanes(builder, context.cast(builder, args[2], sig.args[2], types.int32))
        fnty = ir.FunctionType(_FLOATS, [source.type, ir.IntType(32), mask.type, _FLOATS])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.load.v16f32.p0")
        return builder.call(fn, [source, ir.Constant(ir.IntType(32), 4), mask, ir.Constant(_FLOATS, [0.0] * LANES)])

    return f32x16(x, i, n), codegen


@intrinsic
def store_first(typingctx, x, i, v, n):
    """x[i : i + n] = v[:n] for 0 <= n <= 16: llvm.masked.store, which touches no memory
    outside the n lanes (vmaskmovps, or an AVX-512 masked store)."""
    if not (is_array_of(x, types.float32, writable=True) and isinstance(i, types.Integer) and v == f32x16
            and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        target = lanes_at(context, builder, sig.args[0], args[0], sig.args[1], args[1], _FLOATS)
        mask = first_lanes(builder, context.cast(builder, args[3], sig.args[3], types.int32))
        fnty = ir.FunctionType(ir.VoidType(), [_FLOATS, target.type, ir.IntType(32), mask.type])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v16f32.p0")
        builder.call(fn, [args[2], target, ir.Constant(ir.IntType(32), 4), mask])
        return context.get_dummy_value()

    return types.none(x, i, v, n), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c lane by lane: one fused multiply-add (one rounding) where the CPU has them,
    a multiply and an add elsewhere (llvm.fmuladd, where llvm.fma would call a slow libm routine)."""
    if not a == b == c == f32x16:
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_FLOATS, [_FLOATS] * 3)
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.fmuladd.v16f32"), args)

    return f32x16(a, b, c), codegen


@intrinsic
def add(typingctx, a, b):
    """a + b lane by lane."""
    if not a == b == f32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x16(a, b), codegen


@intrinsic
def mul(typingctx, a, b):
    """a * b lane by lane."""
    if not a == b == f32x16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return f32x16(a, b), codegen


@intrinsic
def absolute(typingctx, a):
    """|a| lane by lane (llvm.fabs: the sign bits cleared)."""
    if a != f32x16:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FLOATS, [_FLOATS]), "llvm.fabs.v16f32")
        return builder.call(fn, args)

    return f32x16(a), codegen


@intrinsic
def total(typingctx, a):
    """The sum of the 16 lanes, float32, in whatever order is fastest (a tree of shuffles and adds)."""
    if a != f32x16:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), _FLOATS]),
                                             "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.Constant(ir.FloatType(), -0.0), args[0]], fastmath=("reassoc",))

    return types.float32(a), codegen


@intrinsic
def add_where(typingctx, a, m, i, b):
    """a + b in the lanes whose bit of m[i] (m a 1-D uint16 array; lane 0: bit 0) is set, a in the
    others: AVX-512's masked add (vaddps with a k-register loaded straight from m); elsewhere LLVM
    spreads the 16 bits over the lanes and blends."""
    if not (a == b == f32x16 and is_array_of(m, types.uint16) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        bits = builder.load(lanes_at(context, builder, sig.args[1], args[1], sig.args[2], args[2], ir.IntType(16)))
        lanes = builder.bitcast(bits, ir.VectorType(ir.IntType(1), LANES))
        return builder.select(lanes, builder.fadd(args[0], args[3]), args[0])

    return f32x16(a, m, i, b), codegen


@intrinsic
def permute2(typingctx, lo, k, j, hi):
    """Lane t is concatenate([lo, hi])[k[j + t]]: a lookup into the 32 floats of two vectors.

    k is a 1-D uint8 array of entries 0..31: a quarter of the bytes of int32 lane numbers, and
    the kernels that use it are bound by what they read. AVX-512 only (HAS_PERMUTE): vpermi2ps.
    """
    if not (lo == hi == f32x16 and is_array_of(k, types.uint8) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        table = builder.load(lanes_at(context, builder, sig.args[1], args[1], sig.args[2], args[2], _BYTES), align=1)
        table = builder.zext(table, _INTS)
        fnty = ir.FunctionType(_FLOATS, [_FLOATS, _INTS, _FLOATS])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpermi2var.ps.512")
        return builder.call(fn, [args[0], table, args[3]])

    return f32x16(lo, k, j, hi), codegen


def _swap_bit(bit):
    """The two shuffle masks that exchange row bit `bit` with column bit `bit` between rows r and r | bit."""
    low = [c if not c & bit else LANES + (c ^ bit) for c in range(LANES)]
    high = [c ^ bit if not c & bit else LANES + c for c in range(LANES)]
    return ir.Constant(_INTS, low), ir.Constant(_INTS, high)


@intrinsic
def transpose16(typingctx, src, i, src_stride, dst, j, dst_stride):
    """dst[j + c*dst_stride + r] = src[i + r*src_stride + c] for r, c in 0..15 (1-D float32 arrays).

    Element (r, c) must end at (c, r): the transpose swaps each bit of the row number with the
    same bit of the column number. One round per bit (8, 4, 2, 1) pairs row r with row r | bit
    and mixes them with two shuffles of constant masks, which LLVM turns into the CPU's shuffles.
    """
    ints = (i, src_stride, j, dst_stride)
    if not (is_array_of(src, types.float32) and is_array_of(dst, types.float32, writable=True)
            and all(isinstance(t, types.Integer) for t in ints)):
        return None

    def codegen(context, builder, sig, args):
        src, i, ss, dst, j, ds = args
        i, ss, j, ds = (context.cast(builder, v, t, types.intp) for v, t in zip((i, ss, j, ds), ints))

        def at(array_type, array, start, stride, k):
            index = builder.add(start, builder.mul(stride, ir.Constant(ss.type, k)))
            return lanes_at(context, builder, array_type, array, types.intp, index, _FLOATS)

        rows = [builder.load(at(sig.args[0], src, i, ss, r), align=4) for r in range(LANES)]
        for bit in (8, 4, 2, 1):
            low, high = _swap_bit(bit)
            for r in range(LANES):
                if not r & bit:
                    a, b = rows[r], rows[r | bit]
                    rows[r], rows[r | bit] = builder.shuffle_vector(a, b, low), builder.shuffle_vector(a, b, high)
        for c in range(LANES):
            builder.store(rows[c], at(sig.args[3], dst, j, ds, c), align=4)
        return context.get_dummy_value()

    return types.none(src, i, src_stride, dst, j, dst_stride), codegen


# --------------------------------------------------------------------------
# The same operations in NumPy: what each one means, and what runs with NUMBA_DISABLE_JIT=1


def _load_python(x, i):
    return x[i : i + LANES].copy()


def _store_python(x, i, v):
    x[i : i + LANES] = v


def _splat_python(s):
    return np.full(LANES, s, np.float32)


def _broadcast_python(x, i):
    return np.full(LANES, x[i], np.float32)


def _maximum_python(a, b):
    return np.maximum(a, b)


def _load_first_python(x, i, n):
    out = np.zeros(LANES, np.float32)
    out[:n] = x[i : i + n]
    return out


def _store_first_python(x, i, v, n):
    x[i : i + n] = v[:n]


def _fma_python(a, b, c):
    return a * b + c


def _add_python(a, b):
    return a + b


def _mul_python(a, b):
    return a * b


def _absolute_python(a):
    return np.abs(a)


def _total_python(a):
    return a.sum(dtype=np.float32)


def _add_where_python(a, m, i, b):
    return np.where((int(m[i]) >> np.arange(LANES)) & 1 == 1, a + b, a)


def _permute2_python(lo, k, j, hi):
    return np.concatenate([lo, hi])[k[j : j + LANES]]


def _transpose16_python(src, i, src_stride, dst, j, dst_stride):
    for r in range(LANES):
        dst[j + r : j + r + LANES * dst_stride : dst_stride] = src[i + r * src_stride : i + r * src_stride + LANES]


if numba.config.DISABLE_JIT:
    load, store, splat, fma, add = _load_python, _store_python, _splat_python, _fma_python, _add_python
    mul, absolute, total = _mul_python, _absolute_python, _total_python
    add_where = _add_where_python
    broadcast, maximum = _broadcast_python, _maximum_python
    load_first, store_first = _load_first_python, _store_first_python
    permute2, transpose16 = _permute2_python, _transpose16_python
