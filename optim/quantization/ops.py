"""The integer ops of an int8 model: conv, dense, max-pool, flatten, ReLU.

Jacob et al., CVPR 2018, section 2.3. With codes q_k of the input (S_in,
Z_in), symmetric weight codes w_k (S_w, Z_w = 0) and the int32 bias q_b
(S_b = S_in S_w), one output of a conv or dense layer is (the paper's eq. 7)

    r_out = S_in S_w (sum_k (q_k - Z_in) w_k + q_b)
    q_out = Z_out + M (sum_k q_k w_k  +  q_b - Z_in sum_k w_k),   M = S_in S_w / S_out

The column sums sum_k w_k are constants, so q_b - Z_in sum_k w_k is folded
into one int32 bias when the op is built and the inner loop is a plain int8
dot product accumulated in int32 (`kernels.qgemm`). M, a real number, is
applied as the fixed-point multiplier M0 2^(shift - 31) (`fixedpoint`). A
following ReLU is the clamp q_out >= Z_out, and max-pooling works on the
codes directly (requantization is monotone). The last layer keeps its int32
accumulators, which the model dequantizes once with S_in S_w.

Activations between ops are int8 NHWC (N, H, W, C) or (N, F). Every op has
forward(x, reference=False) (reference=True: the NumPy references instead of
the Numba kernels), bind(x_shape) (the kernels' step for inputs of that
shape, on the codes' unsigned bytes q + 128, `kernels.unsigned`, as the
model runs them between its input and its output), output_shape(in_shape)
in the float model's (C, H, W) convention, output_scale (S, Z) of its output
codes, and state() / config() / from_state(config, arrays, in_q) for the file
format.
"""

import numpy as np

from minicnn.checks import check_bool, check_int, check_number, check_positive_int
from minicnn.kernels import conv_output_size
from minicnn.parallel import MIN_OUTPUTS

from . import kernels as K
from . import windows
from .affine import QMAX, QMIN, WMAX, check_scale, check_zero_point
from .fixedpoint import INT32_MAX, INT32_MIN, quantize_multiplier


class BoundGemm:
    """A conv's (with its 2x2 pool) or a dense layer's kernels' step for inputs of one shape:
    run(u) = qgemm(Words(x32, starts, off), packed, epilogue, window) reshaped to out_shape, x32 the
    words of

        u itself                    copies and rows None: a conv's windows read in place, or a dense
                                    layer's rows of whole words
        copies = M                  windows.shifted_copies(u flat), u's M bytes: a one-channel conv's
                                    lines (windows.line_words)
        rows = (N, H, W, C, KH, KW, stride, padding, fill, width)
                                    windows.im2row_nhwc(u as (N, H, W, C), KH, ...): a conv's windows
                                    copied; a dense layer's rows padded to whole words are those of a
                                    1x1 conv on an image of one pixel and K channels

    starts and off are kept read-only (chain.py's tuples of them must be one array type). load: the
    largest work / break-even of the step's kernels (minicnn.parallel's rule runs one of them threaded
    iff runs_threaded(load, 1)). chain.py reads these fields to run a model's steps in one compiled
    call."""

    def __init__(self, starts, off, packed, epilogue, window, out_shape, copies=None, rows=None):
        starts, off = _read_only(starts), _read_only(off)
        self.starts, self.off, self.packed, self.epilogue = starts, off, packed, epilogue
        self.window, self.out_shape, self.copies, self.rows = window, out_shape, copies, rows
        self.gemm = K.qgemm_runner(starts, off, packed, epilogue, window)
        loads = [K.qgemm_work(starts, off, epilogue.F) / K.MIN_MACS]
        if copies is not None:
            loads.append(windows.shifted_copies_work(copies) / MIN_OUTPUTS)
        if rows is not None:
            loads.append(windows.im2row_work(rows[:4], *rows[4:8], rows[9]) / MIN_OUTPUTS)
        self.load = max(loads)

    def __call__(self, u):
        if self.copies is not None:
            u = windows.shifted_copies(u.reshape(-1))
        elif self.rows is not None:
            u = windows.im2row_nhwc(u.reshape(self.rows[:4]), *self.rows[4:])
        return self.gemm(windows.as_words(u)).reshape(self.out_shape)


def _read_only(a):
    if a.flags.writeable:
        a = a.copy()
        a.flags.writeable = False
    return a


class _IntLinear:
    """Shared part of IntConv2D and IntDense: int8 rows times int8 weights, int32
    accumulators, then either requantized to int8 or (last layer) kept int32.

    W int8 in the float layer's layout; w_scale float32 (F,); b int32 (F,);
    multiplier int32 and shift int8 (F,) (absent for int32 output).
    in_q = (S_in, Z_in); out_q = (S_out, Z_out), or None for int32 output.
    """

    def __init__(self, W, w_scale, b, in_q, out_q, relu, multiplier=None, shift=None):
        self.W, self.w_scale, self.b = W, w_scale, b
        self.in_q, self.relu = (float(in_q[0]), int(in_q[1])), bool(relu)
        self.out_q = None if out_q is None else (float(out_q[0]), int(out_q[1]))
        check_scale(self.in_q[0], "input scale")
        check_scale(w_scale, "weight scales")
        self._sums_scale = self.in_q[0] * w_scale.astype(np.float64)  # what dequantizes int32 outputs
        check_zero_point(self.in_q[1], "input zero point")
        if W.size and W.min() < -WMAX:
            raise ValueError(f"{type(self).__name__}: weight codes must lie in [-{WMAX}, {WMAX}], got {W.min()}")
        if self.out_q is not None:
            check_scale(self.out_q[0], "output scale")
            check_zero_point(self.out_q[1], "output zero point")
            expected = [quantize_multiplier(m) for m in self.real_multipliers()]
            if multiplier is None:
                multiplier = np.array([m for m, _ in expected], dtype=np.int32)
                shift = np.array([s for _, s in expected], dtype=np.int8)  # in [-31, 30]
            elif not (np.array_equal(multiplier, [m for m, _ in expected])
                      and np.array_equal(shift, [s for _, s in expected])):
                raise ValueError(f"{type(self).__name__}: multipliers do not match S_in * S_w / S_out")
        self.multiplier, self.shift = multiplier, shift
        wt = self.kernel_weights()
        colsum = wt.astype(np.int64).sum(axis=1)
        folded = b.astype(np.int64) - self.in_q[1] * colsum  # the paper's Z_in * a2 term, once
        worst = wt.shape[1] * 128 * WMAX + np.abs(folded).max(initial=0)
        if worst > INT32_MAX or wt.shape[1] > K.MAX_K:
            raise ValueError(f"{type(self).__name__}: int32 accumulators could overflow "
                             f"({wt.shape[1]} products per output, bias up to {np.abs(folded).max()})")
        self.wt = K.pad_columns(wt, K.padded_width(wt.shape[1]))
        self.packed = K.pack_weights(self.wt)
        self.folded_bias = folded.astype(np.int32)
        if self.out_q is None:
            self.epilogue = K.int32_epilogue(self.packed, self.folded_bias, 0 if self.relu else INT32_MIN)
        else:
            self.epilogue = K.int8_epilogue(self.packed, self.folded_bias, multiplier, shift, self.out_q[1],
                                            self._lowest_code(), QMAX)

    def real_multipliers(self):
        """M = S_in S_w / S_out per output channel, computed from the stored float32 scales."""
        return self.in_q[0] * self.w_scale.astype(np.float64) / self.out_q[0]

    @property
    def output_scale(self):
        """(scale per channel, zero point) of this op's output codes: S_in S_w for the int32 sums."""
        if self.out_q is None:
            return self._sums_scale, 0
        return self.out_q

    def matmul_ref(self, rows):
        """The NumPy references' product: int8 rows (M, K) (im2row's, or a dense layer's inputs,
        padded to wt's columns) -> int8 (M, F) requantized, or int32 (M, F) for the last layer.
        The kernels run the same through `bind`."""
        if self.out_q is None:
            return K.qgemm_int32_ref(rows, self.wt, self.folded_bias, 0 if self.relu else INT32_MIN)
        return K.qgemm_ref(rows, self.wt, self.folded_bias, self.multiplier, self.shift, self.out_q[1],
                           self._lowest_code(), QMAX)

    def _lowest_code(self):
        """The clamp's low end: Z_out under a ReLU (the code of the real 0), else QMIN."""
        return self.out_q[1] if self.relu else QMIN

    def stats(self):
        """What minicnn's summary table reads: params, nonzero, bits_per_weight, bytes (as stored)."""
        arrays = self.state().values()
        params = self.W.size + self.b.size
        nbytes = sum(a.nbytes for a in arrays)
        return {"params": params, "nonzero": int(np.count_nonzero(self.W) + np.count_nonzero(self.b)),
                "bits_per_weight": 8.0 * nbytes / params, "bytes": nbytes}

    def state(self):
        """The arrays the file stores for this op, by name (see _arrays for their dtypes and shapes)."""
        arrays = {"W": self.W, "w_scale": self.w_scale, "b": self.b}
        if self.out_q is not None:
            arrays.update(multiplier=self.multiplier, shift=self.shift)
        return arrays

    def _base_config(self):
        return {"relu": self.relu, "out_scale": None if self.out_q is None else self.out_q[0],
                "out_zero_point": None if self.out_q is None else self.out_q[1]}

    @classmethod
    def _arrays(cls, config, arrays, in_q):
        """Check the stored arrays against each other and the config; return the
        constructor's keyword arguments."""
        relu = check_bool(config.get("relu"), "relu")
        int32_out = config.get("out_scale") is None
        if not int32_out:
            check_number(config["out_scale"], "out_scale")
            check_int(config["out_zero_point"], "out_zero_point", QMIN, QMAX)
        W = arrays.get("W")
        if W is None or W.dtype != np.int8 or W.ndim != cls.weight_ndim:
            got = "nothing" if W is None else f"{W.dtype} {W.shape}"
            raise ValueError(f"{cls.kind} op 'W': expected int8 weights of rank {cls.weight_ndim}, got {got}")
        F = W.shape[cls.out_axis]
        spec = {"w_scale": (np.float32, (F,)), "b": (np.int32, (F,))}
        if not int32_out:
            spec.update(multiplier=(np.int32, (F,)), shift=(np.int8, (F,)))
        for name, (dtype, shape) in spec.items():
            a = arrays.get(name)
            if a is None:
                raise ValueError(f"{cls.kind} op is missing its {name!r} array")
            if a.dtype != dtype or a.shape != shape:
                raise ValueError(f"{cls.kind} op {name!r}: expected {np.dtype(dtype)} {shape} "
                                 f"for {F} output channels, got {a.dtype} {a.shape}")
        out_q = None if int32_out else (config["out_scale"], config["out_zero_point"])
        return dict(W=arrays["W"], w_scale=arrays["w_scale"], b=arrays["b"],
                    in_q=in_q, out_q=out_q, relu=relu,
                    multiplier=arrays.get("multiplier"), shift=arrays.get("shift"))


class IntConv2D(_IntLinear):
    """Integer convolution: int8 (N, H, W, C) -> int8 (N, Ho, Wo, F) or int32 accumulators."""

    kind = "conv2d"
    weight_ndim, out_axis = 4, 0

    def __init__(self, W, w_scale, b, in_q, out_q, relu, stride, padding, multiplier=None, shift=None):
        self.stride, self.padding = check_positive_int(stride, "stride"), check_positive_int(padding, "padding", 0)
        super().__init__(W, w_scale, b, in_q, out_q, relu, multiplier, shift)
        self._line_packed = None  # windows.line_weights(W), made on first use by a one-channel input

    def kernel_weights(self):
        """wt (F, KH*KW*C): the columns in im2row_nhwc's (kh, kw, c) order (before padding)."""
        F = self.W.shape[0]
        return np.ascontiguousarray(self.W.transpose(0, 2, 3, 1).reshape(F, -1))

    def forward(self, x, reference=False):
        if reference:
            _, _, KH, KW = self.W.shape
            rows = windows.im2row_nhwc_ref(x, KH, KW, self.stride, self.padding, self.in_q[1], self.wt.shape[1])
            return self.matmul_ref(rows).reshape(self._output_nhwc(x.shape))
        return K.signed(self.bind(x.shape)(K.unsigned(x)))

    def bind(self, x_shape, pool=None):
        """run(u): forward, then the IntMaxPool2D `pool` if given, on the kernels' bytes (u =
        K.unsigned(x) in, the same of the codes out, or the int32 sums), for inputs x of x_shape
        (N, H, W, C), with the windows' layout, offsets and weights chosen once: a BoundGemm whose
        windows are read in place or as lines (windows.py), else copied by im2row.

        A 2x2 pool of stride 2 is taken inside the GEMM, on each window's 4 int32 sums before they
        are requantized: the same codes (requantization and its clamp never decrease, so the
        maximum commutes with them), a quarter of the requantizations, and no full-size output
        written."""
        if pool is not None and (pool.kernel_size, pool.stride) != (2, 2):
            conv = self.bind(x_shape)
            return lambda x: pool.forward(conv(x))  # the bytes keep the codes' order
        N, Ho, Wo, F = self._output_nhwc(x_shape)
        side = 2 if pool is not None else 1
        _, _, KH, KW = self.W.shape
        S, out_shape, sample = self.stride, (N, Ho // side, Wo // side, F), np.zeros(x_shape, np.uint8)
        if windows.conv_fits_words(x_shape, self.padding):  # the windows' lines are whole words of the input
            w = windows.conv_words(sample, KH, KW, S, side)
            return BoundGemm(w.starts, w.off, self.packed, self.epilogue, side * side, out_shape)
        if windows.line_fits_words(x_shape, KW, self.padding):  # one channel: lines in 4 shifted copies
            if self._line_packed is None:  # (its column sums are self.packed's: self.epilogue serves it)
                self._line_packed = windows.line_weights(self.W)
            w = windows.line_words(sample, KH, KW, S, side)
            return BoundGemm(w.starts, w.off, self._line_packed, self.epilogue, side * side, out_shape,
                             sample.size)
        # else im2row's rows, padding read as the code of the real 0 (its byte), pixel by pixel: in pool order
        rows = (*x_shape, KH, KW, S, self.padding, self.in_q[1] + 128, self.wt.shape[1])
        w = windows.rows_words(windows.im2row_nhwc(sample, *rows[4:]), self.packed)
        return BoundGemm(w.starts[windows.pool_order(N, Ho, Wo, side)], w.off, self.packed, self.epilogue,
                         side * side, out_shape, rows=rows)

    def _output_nhwc(self, x_shape):
        N, H, W, C = x_shape
        F, Ho, Wo = self.output_shape((C, H, W))
        return N, Ho, Wo, F

    def output_shape(self, in_shape):
        F, C, KH, KW = self.W.shape
        p = self.padding
        if len(in_shape) != 3 or in_shape[0] != C or min(in_shape[1] + 2 * p - KH, in_shape[2] + 2 * p - KW) < 0:
            raise ValueError(f"IntConv2D ({C} channels in, {KH}x{KW} kernel, padding {p}) cannot take inputs "
                             f"of shape {tuple(in_shape)}")
        return (F, conv_output_size(in_shape[1], KH, self.stride, self.padding),
                conv_output_size(in_shape[2], KW, self.stride, self.padding))

    def macs(self, in_shape):
        _, Ho, Wo = self.output_shape(in_shape)
        return self.W.size * Ho * Wo

    def config(self):
        return {**self._base_config(), "stride": self.stride, "padding": self.padding}

    @classmethod
    def from_state(cls, config, arrays, in_q):
        return cls(**cls._arrays(config, arrays, in_q), stride=config["stride"], padding=config["padding"])


class IntDense(_IntLinear):
    """Integer dense layer: int8 (N, in) -> int8 (N, out) or int32 accumulators."""

    kind = "dense"
    weight_ndim, out_axis = 2, 1

    def __init__(self, W, w_scale, b, in_q, out_q, relu, multiplier=None, shift=None):
        super().__init__(W, w_scale, b, in_q, out_q, relu, multiplier, shift)
        self._nhwc = None  # (H, W, C), and the weights packed for inputs of that shape: see bind

    def kernel_weights(self):
        return np.ascontiguousarray(self.W.T)  # (out, in): each output one contiguous dot product

    def forward(self, x, reference=False):
        """x int8 (N, in); for the kernels also (N, H, W, C), the codes an IntFlatten would flatten
        (see bind)."""
        if reference:
            return self.matmul_ref(K.pad_columns(x, self.wt.shape[1]))
        return K.signed(self.bind(x.shape)(K.unsigned(x)))

    def bind(self, x_shape):
        """run(u): forward on the kernels' bytes (as IntConv2D.bind) for inputs of x_shape, (N, in) or
        (N, H, W, C): then the flatten before this layer is in the weights, their columns put in NHWC
        order once per shape, not the activations in (C, H, W) order every call."""
        N, K_ = x_shape[0], self.W.shape[0]
        packed = self.packed
        if len(x_shape) == 4:
            H, W, C = x_shape[1:]
            if H * W * C != K_:
                raise ValueError(f"IntDense expects {K_} inputs, got {H}x{W}x{C} = {H * W * C}")
            known = self._nhwc  # one read: another thread may bind another shape meanwhile
            if known is None or known[0] != x_shape[1:]:
                wt = self.kernel_weights().reshape(-1, C, H, W).transpose(0, 2, 3, 1).reshape(self.W.shape[1], -1)
                known = self._nhwc = x_shape[1:], K.pack_weights(K.pad_columns(wt, self.wt.shape[1]))
            packed = known[1]
        elif tuple(x_shape[1:]) != (K_,):
            self.output_shape(x_shape[1:])  # raises, naming the shape
        sample, width = windows.rows_words(np.zeros((N, K_), np.uint8), packed), 4 * packed.wp.shape[1]
        rows = None if K_ == width else (N, 1, 1, K_, 1, 1, 1, 0, 0, width)  # else the input's own bytes
        return BoundGemm(sample.starts, sample.off, packed, self.epilogue, 1, (N, self.W.shape[1]), rows=rows)

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.W.shape[0],):
            raise ValueError(f"IntDense expects inputs of shape ({self.W.shape[0]},), got {tuple(in_shape)}")
        return (self.W.shape[1],)

    def macs(self, in_shape):
        return self.W.size

    def config(self):
        return self._base_config()

    @classmethod
    def from_state(cls, config, arrays, in_q):
        return cls(**cls._arrays(config, arrays, in_q))


class _IntPassThrough:
    """Ops without weights; their output codes keep the input's (S, Z). bind(x_shape) gives the
    step on the kernels' bytes (K.unsigned): forward itself, the bytes keeping the codes' order
    (and a last layer's int32 sums passing as they are), where no zero point is read."""

    def __init__(self, in_q):
        self.in_q = (float(in_q[0]), int(in_q[1]))

    @property
    def output_scale(self):
        return self.in_q

    def macs(self, in_shape):
        return 0

    def stats(self):
        return {"params": 0, "nonzero": 0, "bits_per_weight": 0.0, "bytes": 0}

    def state(self):
        return {}

    def config(self):
        return {}

    @classmethod
    def from_state(cls, config, arrays, in_q):
        return cls(in_q, **config)

    def bind(self, x_shape):
        return self.forward


class IntMaxPool2D(_IntPassThrough):
    """Max over k x k windows of int8 codes, NHWC."""

    kind = "maxpool2d"

    def __init__(self, in_q, kernel_size, stride):
        super().__init__(in_q)
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        self.stride = check_positive_int(stride, "stride")

    def forward(self, x, reference=False):
        fn = K.maxpool_nhwc_ref if reference else K.maxpool_nhwc
        return fn(x, self.kernel_size, self.stride)

    def output_shape(self, in_shape):
        if len(in_shape) != 3 or min(in_shape[1:]) < self.kernel_size:
            raise ValueError(f"IntMaxPool2D ({self.kernel_size}x{self.kernel_size}) cannot pool inputs of shape {in_shape}")
        C, H, W = in_shape
        k, s = self.kernel_size, self.stride
        return (C, conv_output_size(H, k, s, 0), conv_output_size(W, k, s, 0))

    def config(self):
        return {"kernel_size": self.kernel_size, "stride": self.stride}


class IntFlatten(_IntPassThrough):
    """NHWC codes -> (N, C*H*W) in the float model's C, H, W order."""

    kind = "flatten"

    def forward(self, x, reference=False):
        if x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x).reshape(len(x), -1)

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)


class IntReLU(_IntPassThrough):
    """A ReLU not fused into a layer: max(q, Z), the code of the real 0."""

    kind = "relu"

    def forward(self, x, reference=False):
        return np.maximum(x, np.int8(self.in_q[1]))

    def bind(self, x_shape):
        zero = self.in_q[1]  # the bytes' is zero + 128; int32 sums (after a last layer) keep zero itself
        return lambda u: np.maximum(u, np.uint8(zero + 128) if u.dtype == np.uint8 else u.dtype.type(zero))

    def output_shape(self, in_shape):
        return tuple(in_shape)


# The class of each op kind a file names, for load_quantized.
OP_KINDS = {cls.kind: cls for cls in (IntConv2D, IntDense, IntMaxPool2D, IntFlatten, IntReLU)}

