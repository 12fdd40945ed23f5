"""The int8 model to ONNX (optim.quantization): an integer graph with the model's own scales,
zero points, int32 biases and ReLU clamps.

Between one QuantizeLinear at the input and one DequantizeLinear at the output every tensor
holds int8 codes q of reals r = S (q - Z), in NCHW (minicnn's integer ops run NHWC on the same
codes). With an op's input (S_in, Z_in), its int8 weights w with per-channel scales S_w (zero
point 0), its int32 bias b of scale S_in S_w and its output (S_out, Z_out):

    input     q = QuantizeLinear(x, S_in, Z_in) = saturate(round(x / S_in) + Z_in)
    conv      q_out = QLinearConv(q, S_in, Z_in, w, S_w, 0, S_out, Z_out, b)
                    = saturate(Z_out + round(S_in S_w / S_out (sum_k (q_k - Z_in) w_k + b)))
    dense     the same QLinearConv on q reshaped to (N, in, 1, 1): a dense layer is a 1x1
              convolution, and QLinearMatMul has no bias input
    ReLU      fused into the layer: Clip(q_out, min = Z_out), Z_out being the code of the real 0
              (an IntReLU of its own: the same Clip)
    max-pool  MaxPool on the codes: requantization is monotone, so the max commutes with it
    flatten   Flatten(axis 1), in C, H, W order as the float model's
    last      the int32 sums, as minicnn keeps them: acc = MatMulInteger(q, w, Z_in) + b
    layer     (ConvInteger for a conv, on codes and weights offset by 128 to uint8), Clip(acc,
              min = 0) if a ReLU is fused; logits = DequantizeLinear(acc, S_in S_w, axis 1)

ONNX Runtime requantizes with a float multiplier S_in S_w / S_out, minicnn with TFLite's fixed
point M0 2^(shift - 31) (fixedpoint.py), which rounds halves differently; it also divides the
input by S_in in float32, minicnn in float64. So a code can differ by one where a scaled value
lands on (or within float rounding of) a half. Given the same input codes, the last layer's
int32 sums are the same.

Weights go through Graph.weight, stored sparse if that is smaller: an int8 weight's zero is
the code 0 (zero point 0), so a pruned model's zeros stay zeros. Not those of a last conv
layer: offset to uint8 for ConvInteger, its zeros are 128, and its weights are always dense.

Operators: https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html, onnx__QLinearConv.html,
onnx__ConvInteger.html, onnx__MatMulInteger.html, onnx__DequantizeLinear.html, onnx__Clip.html,
onnx__MaxPool.html, onnx__Flatten.html, onnx__Reshape.html.
"""

import numpy as np

from ..quantization.ops import IntConv2D, IntDense, IntFlatten, IntMaxPool2D, IntReLU
from .layers import flatten, maxpool2d


def clamp(g, y, lo, name):
    """Clip(y, min = lo) in y's integer dtype (a fused ReLU)."""
    return g.node("Clip", [y, lo], name)


def qlinear_conv(g, op, q, W, name, **attributes):
    """q_out (N, F, Ho, Wo) int8 = QLinearConv of the codes q with the int8 weights W (F, C, KH, KW), ReLU clamped."""
    (S_in, Z_in), (S_out, Z_out) = op.in_q, op.out_q
    F = W.shape[0]
    inputs = [q, g.scalar(f"{name}_x_scale", S_in), g.scalar(f"{name}_x_zero_point", Z_in, np.int8),
              g.weight(f"{name}_W", W), g.constant(f"{name}_W_scale", op.w_scale.astype(np.float32)),
              g.constant(f"{name}_W_zero_point", np.zeros(F, np.int8)),
              g.scalar(f"{name}_y_scale", S_out), g.scalar(f"{name}_y_zero_point", Z_out, np.int8),
              g.constant(f"{name}_b", op.b.astype(np.int32))]
    y = g.node("QLinearConv", inputs, f"{name}_linear" if op.relu else name, **attributes)
    return clamp(g, y, g.scalar(f"{name}_relu_min", Z_out, np.int8), name) if op.relu else y


def int32_sums(g, op, q, integer_op, W, bias_shape, name, **attributes):
    """acc int32 = integer_op(q, W, Z_in) + b (MatMulInteger or ConvInteger), clamped at 0 for a fused ReLU."""
    if integer_op == "ConvInteger":
        inputs = offset_to_uint8(g, op, q, W, name)
    else:
        inputs = [q, g.weight(f"{name}_W", W), g.scalar(f"{name}_x_zero_point", op.in_q[1], np.int8)]
    acc = g.node(integer_op, inputs, f"{name}_sums", **attributes)
    b = g.constant(f"{name}_b", op.b.astype(np.int32).reshape(bias_shape))
    y = g.node("Add", [acc, b], f"{name}_biased" if op.relu else name)
    return clamp(g, y, g.scalar(f"{name}_relu_min", 0, np.int32), name) if op.relu else y


def offset_to_uint8(g, op, q, W, name):
    """ConvInteger's inputs with codes and weights offset by 128, to uint8: older ONNX Runtime
    releases (1.19, for one) run ConvInteger on uint8 only. The sums are the same:
    sum (q - Z_in) w = sum ((q + 128) - (Z_in + 128)) ((w + 128) - 128)."""
    wide = g.node("Cast", [q], f"{name}_codes_int32", to=g.onnx.TensorProto.INT32)
    offset = g.node("Add", [wide, g.scalar(f"{name}_128", 128, np.int32)], f"{name}_codes_offset")
    return [g.node("Cast", [offset], f"{name}_codes_uint8", to=g.onnx.TensorProto.UINT8),
            g.weight(f"{name}_W_offset", (W.astype(np.int16) + 128).astype(np.uint8)),
            g.scalar(f"{name}_x_zero_point", op.in_q[1] + 128, np.uint8),
            g.scalar(f"{name}_W_zero_point", 128, np.uint8)]


def int_conv2d(g, op, q, name):
    F, _, KH, KW = op.W.shape
    s, p = op.stride, op.padding
    geometry = dict(kernel_shape=[KH, KW], strides=[s, s], pads=[p, p, p, p])
    if op.out_q is None:
        return int32_sums(g, op, q, "ConvInteger", op.W, (F, 1, 1), name, **geometry)
    return qlinear_conv(g, op, q, op.W, name, **geometry)


def int_dense(g, op, q, name):
    fan_in, F = op.W.shape
    if op.out_q is None:
        return int32_sums(g, op, q, "MatMulInteger", op.W, (F,), name)
    as_image = g.node("Reshape", [q, g.constant(f"{name}_as_image", np.array([0, -1, 1, 1], np.int64))],
                      f"{name}_input_1x1")
    W = np.ascontiguousarray(op.W.T).reshape(F, fan_in, 1, 1)
    y = qlinear_conv(g, op, as_image, W, f"{name}_1x1", kernel_shape=[1, 1])
    return g.node("Reshape", [y, g.constant(f"{name}_flat", np.array([0, -1], np.int64))], name)


def int_relu(g, op, q, name):
    return clamp(g, q, g.scalar(f"{name}_min", op.in_q[1], np.int8), name)


# Every op class of optim.quantization.ops.OP_KINDS (a test checks) -> converter(g, op, q, name), as
# layers.CONVERTERS: max-pool and flatten are the float layers' operators, run on the codes.
OPS = {IntConv2D: int_conv2d, IntDense: int_dense, IntMaxPool2D: maxpool2d, IntFlatten: flatten,
       IntReLU: int_relu}


def build(g, model, x):
    """Add the integer graph of the QuantizedModel `model`, reading the float32 input named x.

    Returns ([(name, dtype, per-sample shape) of each op's output codes], the logits' name).
    """
    S, Z = model.input_q
    q = g.node("QuantizeLinear", [x, g.scalar("input_scale", S), g.scalar("input_zero_point", Z, np.int8)],
               "input_codes")
    outputs, shape = [], model.input_shape
    for i, op in enumerate(model.layers):
        q = OPS[type(op)](g, op, q, f"layer{i}")
        shape = op.output_shape(shape)
        int32 = isinstance(op, (IntConv2D, IntDense)) and op.out_q is None
        outputs.append((q, np.int32 if int32 else np.int8, shape))
    S_out, Z_out = model.layers[-1].output_scale
    if outputs[-1][1] == np.int32:  # one scale S_in S_w per channel, zero point 0
        logits = g.node("DequantizeLinear", [q, g.constant("output_scale", np.asarray(S_out, np.float32))],
                        "logits", axis=1)
    else:
        zero_point = g.scalar("output_zero_point", Z_out, np.int8)
        logits = g.node("DequantizeLinear", [q, g.scalar("output_scale", S_out), zero_point], "logits")
    return outputs, logits
