"""The int8 model: integer ops between one quantization and one dequantization,
its file format, and post-training conversion of a float Sequential.

Jacob et al., CVPR 2018. Floats appear only at the model's input, quantized
once with the calibrated (S_in, Z_in), and at its output: the last layer's
int32 accumulators, dequantized once with S_in S_w. In between every op
(`ops`) maps integer codes to integer codes.

Post-training quantization (`quantize_model`) is `calibration.calibrate`
then `convert`: per compute step, weights to symmetric int8
(`affine.quantize_weights`, per output channel or per tensor), biases to
int32 at S_in S_w, and each op's output (S, Z) from its calibrated range.

File format: kind "quantized_int8", written by `QuantizedModel.save` and read
by `load_quantized`. The meta holds the input shape, input scale and zero
point, per_channel and each op's kind and config; the arrays are
"ops.{i}.{name}" for each op's state(). An op's input (S, Z) is its
predecessor's output, so the file stores it once.
"""

import numpy as np

from minicnn.checks import check_array, check_bool, check_int, check_number, check_positive_int
from minicnn.model import output_shapes
from minicnn.serialization import check_all_used, check_input_shape, check_output_shapes, check_specs, entries, write_npz
from minicnn.summary import format_summary

from . import kernels as K
from .affine import (
    QMAX, QMIN, activation_qparams, affine_quantize, check_bits, check_scale, check_zero_point, quantize_bias,
    quantize_nhwc, quantize_weights,
)
from .calibration import calibrate, observed_points, plan
from .chain import MAPS, TASK_IMAGES, Chain, chains
from .ops import OP_KINDS, IntConv2D, IntDense, IntFlatten, IntMaxPool2D, IntReLU

MAX_BOUND = 4  # input shapes whose steps forward_int keeps: predict's groups (Chain.map), batches, remainders

MODEL_KIND = "quantized_int8"


class QuantizedModel:
    """An int8 network: quantize the input once, integer ops, dequantize the output once.

    ops: the integer ops in order; input_q = (S, Z) of the input codes;
    ranges: the calibration report (list of ActivationRange) of a freshly converted
    model, for display; not saved (the scales and zero points are).
    """

    kind = MODEL_KIND

    def __init__(self, ops, input_shape, input_q, per_channel, ranges=()):
        self.layers = list(ops)  # `layers`, so minicnn's summary table reads the ops
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_q = (float(input_q[0]), int(input_q[1]))
        check_scale(self.input_q[0], "input scale")
        check_zero_point(self.input_q[1], "input zero point")
        self.per_channel = bool(per_channel)
        self.ranges = list(ranges)
        self.output_shape = self.output_shapes()[-1]
        # forward_int's steps per input shape, the Chains of predict's float inputs per shape, the ops they are of
        self._bound, self._chains, self._bound_to = {}, {}, tuple(self.layers)

    def output_shapes(self):
        """Per-sample output shape of every op, in the float model's (C, H, W) convention."""
        return output_shapes(self.layers, self.input_shape, "op")

    def quantize_input(self, x):
        """float (N, C, H, W) -> int8 (N, H, W, C) codes (or (N, F) for flat inputs)."""
        return self._quantize(self._check_input(x))

    def _check_input(self, x):
        check_array(x, "model input", ndim=1 + len(self.input_shape))
        if x.shape[1:] != self.input_shape:
            expected = ", ".join(map(str, self.input_shape))
            raise ValueError(f"model expects inputs of shape (N, {expected}), got {x.shape}")
        return x

    def _quantize(self, x, unsigned=False):
        """The input's codes (int8), or their bytes for the kernels (K.unsigned), in one pass if 4-D."""
        if x.ndim == 4:
            return quantize_nhwc(x, *self.input_q, unsigned=unsigned)
        q = affine_quantize(x, *self.input_q)
        return K.unsigned(q) if unsigned else q

    def forward_int(self, q, reference=False):
        """Integer codes in, integer codes out: int8 or the last layer's int32 accumulators.

        reference=True runs the plain NumPy references, op by op. The kernels run steps bound to
        the input's shape (kept for a few shapes: predict's batches and its last, shorter one),
        which take a conv and the max-pool after it together (IntConv2D.bind: the same codes,
        fewer requantized) and a flatten and the dense layer after it (IntDense.bind: no
        reordering pass).
        """
        if reference:
            for op in self.layers:
                q = op.forward(q, reference=True)
            return q
        return K.signed(self._run(K.unsigned(q)))

    def _run(self, u):
        """forward_int on the kernels' bytes: u uint8 (K.unsigned of the input codes) -> the last op's
        bytes, or its int32 sums."""
        steps = self._bound.get(u.shape)
        if steps is None or self._bound_to != tuple(self.layers):  # new shape, or ops changed since
            return self._bind(u)
        for step in steps:
            u = step(u)
        return u

    def _bind(self, u):
        """_run(u), binding each step to the shape it sees; the steps kept for u's shape, and for a
        float input's (predict's) their Chain where they chain."""
        ops = tuple(self.layers)  # one read: another thread may change the ops meanwhile
        if len(self._bound) >= MAX_BOUND or self._bound_to != ops:  # start over
            self._bound, self._chains, self._bound_to = {}, {}, ops
        shape, i, steps = u.shape, 0, []
        while i < len(ops):
            op, after = ops[i], ops[i + 1] if i + 1 < len(ops) else None
            if isinstance(op, IntConv2D) and isinstance(after, IntMaxPool2D):
                step, i = op.bind(u.shape, after), i + 2
            elif isinstance(op, IntFlatten) and isinstance(after, IntDense) and u.ndim == 4:
                step, i = after.bind(u.shape), i + 2
            else:
                step, i = op.bind(u.shape), i + 1
            steps.append(step)
            u = step(u)
        if self._bound_to == ops:  # only now: a failed bind leaves no half-made steps, nor one for other ops
            self._bound[shape] = tuple(steps)
            x_shape = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else None
            if x_shape is not None and x_shape[1:] == self.input_shape and chains(steps):  # predict's inputs
                self._chains[x_shape] = Chain(steps, x_shape, ops[-1].output_scale[0])
        return u

    def chain_for(self, x_shape):
        """The Chain predict runs float batches of x_shape (N, C, H, W) with, when they run, or None:
        made when predict first binds the steps of that shape, if they chain (chain.chains)."""
        return self._chains.get(tuple(x_shape)) if self._bound_to == tuple(self.layers) else None

    def dequantize_output(self, out):
        """The last op's codes (int8, or its int32 accumulators) -> float32 reals, NCHW if 4-D."""
        scale, zero_point = self.layers[-1].output_scale
        # in float64: exact codes, one rounding to float32 (the int32 sums' zero point is 0: no subtraction)
        r = out * scale if zero_point == 0 else (out - np.float64(zero_point)) * scale
        if r.ndim == 4:
            r = r.transpose(0, 3, 1, 2)
        return r.astype(np.float32)

    def predict(self, x, batch_size=256, reference=False):
        """Logits float32 (N, ...) computed in integers between the input and the output."""
        batch_size = check_positive_int(batch_size, "batch_size")
        x = self._check_input(x)  # once, not per batch
        outs = []
        for i in range(0, len(x), batch_size):
            batch = x[i : i + batch_size]
            if reference:
                outs.append(self.dequantize_output(self.forward_int(self._quantize(batch), reference=True)))
            else:
                outs.append(self._predict_fast(batch))
        if not outs:
            return np.zeros((0, *self.output_shape), np.float32)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _predict_fast(self, x):
        """predict's logits of one batch x (N, C, H, W) by the kernels: groups of TASK_IMAGES mapped by
        one chain where there are two or more (with AVX-512: chain.MAPS), else the batch's own chain
        where it runs (`Chain.runs`), else the steps, on the input quantized straight to the kernels'
        bytes. The same bits every way."""
        whole = len(x) // TASK_IMAGES * TASK_IMAGES
        if MAPS and whole >= 2 * TASK_IMAGES and (chain := self._group_chain(x.shape[1:])) is not None:
            out = chain.map(x[:whole], self.input_q)
            return out if whole == len(x) else np.concatenate([out, self._predict_fast(x[whole:])])
        if (chain := self.chain_for(x.shape)) is not None and chain.runs():
            return chain(x, self.input_q)
        return self.dequantize_output(K.signed(self._run(self._quantize(x, unsigned=True))))

    def _group_chain(self, image_shape):
        """The Chain of TASK_IMAGES inputs of image_shape (C, H, W), its steps bound first if they are not
        (on zeros: binding runs them); None if they do not chain (other inputs than images never do)."""
        if len(image_shape) != 3:
            return None
        shape, steps_shape = (TASK_IMAGES, *image_shape), (TASK_IMAGES, *image_shape[1:], image_shape[0])
        if self.chain_for(shape) is None and (steps_shape not in self._bound or self._bound_to != tuple(self.layers)):
            self._run(self._quantize(np.zeros(shape, np.float32), unsigned=True))
        return self.chain_for(shape)

    def summary(self):
        """The quantization settings, then minicnn's per-op table (str)."""
        head = (f"int8 model ({'per-channel' if self.per_channel else 'per-tensor'} weights, int32 biases, "
                f"fixed-point requantization); input scale {self.input_q[0]:.6g}, zero point {self.input_q[1]}")
        return head + "\n" + format_summary(self)

    def save(self, path):
        """Write the int8 model to `path` (.npz) atomically; `minicnn.load` reads it back."""
        meta = {
            "model": MODEL_KIND,
            "input_shape": list(self.input_shape),
            "input_scale": self.input_q[0], "input_zero_point": self.input_q[1],
            "per_channel": self.per_channel,
            "ops": [{"kind": op.kind, "config": op.config()} for op in self.layers],
        }
        arrays = {}
        for i, op in enumerate(self.layers):
            for name, value in op.state().items():
                arrays[f"ops.{i}.{name}"] = value
        write_npz(path, meta, arrays)


def load_quantized(meta, arrays):
    """A QuantizedModel from a file's meta (dict) and arrays (name -> ndarray): the loader
    `minicnn.load` uses for kind "quantized_int8". Raises ValueError for a damaged file.
    """
    input_shape = check_input_shape(meta.get("input_shape"))
    in_q = (check_number(meta.get("input_scale"), "input_scale"),
            check_int(meta.get("input_zero_point"), "input_zero_point", QMIN, QMAX))
    ops = []
    for i, spec in enumerate(check_specs(meta.get("ops"), "op")):
        if spec["kind"] not in OP_KINDS:
            raise ValueError(f"op {i}: unknown int8 op kind {spec['kind']!r}")
        try:
            ops.append(OP_KINDS[spec["kind"]].from_state(spec["config"], entries(arrays, f"ops.{i}."),
                                                         ops[-1].output_scale if ops else in_q))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"op {i} ({spec['kind']}): {'missing ' if isinstance(e, KeyError) else ''}{e}") from None
    check_all_used(arrays, [f"ops.{i}.{name}" for i, op in enumerate(ops) for name in op.state()])
    model = QuantizedModel(ops, input_shape, in_q, check_bool(meta.get("per_channel"), "per_channel"))
    check_output_shapes(model.output_shapes())
    scale = np.max(ops[-1].output_scale[0])
    if scale * (2.0**31 + 128) > np.finfo(np.float32).max:  # the largest int32 sum, dequantized
        raise ValueError(f"the output scale {scale} makes the logits overflow float32")
    return model


def convert(model, ranges, per_channel=True):
    """The QuantizedModel of a float Sequential, given the ranges `calibrate` returns."""
    steps = plan(model)
    points = observed_points(steps)
    if len(ranges) != 1 + len(points):
        raise ValueError(f"expected {1 + len(points)} activation ranges (input + {len(points)} layers), "
                         f"got {len(ranges)}")
    qparams = [activation_qparams(r.lo, r.hi, r.name) for r in ranges]
    current, ops, point = qparams[0], [], 1
    for n, (op, i, relu) in enumerate(steps):
        layer = model.layers[i]
        if op == "compute":
            last = n == len(steps) - 1
            out_q = None if last else qparams[point]
            point += not last
            conv = layer.kind == "conv2d"
            W = layer.params["W"]
            q, w_scale = quantize_weights(W, axis=0 if conv else 1, per_channel=per_channel)
            b = quantize_bias(layer.params["b"], current[0] * w_scale.astype(np.float64))
            if conv:
                ops.append(IntConv2D(q, w_scale, b, current, out_q, relu, layer.stride, layer.padding))
            else:
                ops.append(IntDense(q, w_scale, b, current, out_q, relu))
            current = ops[-1].output_scale
        elif op == "maxpool2d":
            ops.append(IntMaxPool2D(current, layer.kernel_size, layer.stride))
        elif op == "flatten":
            ops.append(IntFlatten(current))
        else:
            ops.append(IntReLU(current))
    return QuantizedModel(ops, model.input_shape, qparams[0], per_channel, ranges)


def quantize_model(model, x, per_channel=True, method="minmax", percentile=99.99, momentum=0.9, bits=8):
    """Post-training int8 quantization: calibrate on x, then convert. The model is not changed."""
    check_bits(bits)
    return convert(model, calibrate(model, x, method, percentile, momentum), per_channel)

