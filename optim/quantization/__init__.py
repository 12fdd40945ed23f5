"""Int8 quantization with integer-only inference (Jacob et al., "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
CVPR 2018), with the TFLite / gemmlowp fixed-point arithmetic.

A real r is stored as an int8 code q with r = S (q - Z). A float Sequential
becomes an integer model: the input is quantized once, every conv and dense
layer is an int8 dot product summed in int32 and scaled back to int8 by a
fixed-point multiplier, and the last layer's int32 sums are dequantized once.

What lives where:
    affine.py       r = S (q - Z): scales, zero points, weights per channel, int32 biases, the
                    model's input quantized into NHWC in one Numba pass
    calibration.py  the integer graph of a model (plan) and the activation ranges
                    (min/max, EMA, percentile)
    fixedpoint.py   TFLite's requantization: M = M0 2^(shift - 31), rounding high multiply
                    and rounding shift, in NumPy (the references' arithmetic)
    vectors.py      int32x16: 16 int32 sums in a register, VNNI's 4-byte dot product, and the
                    requantization on 16 lanes at once (LLVM IR through Numba intrinsics)
    kernels.py      Numba kernels on int8 NHWC: int8 GEMM on VNNI with int32 sums, a 2x2
                    max-pool and the requantization in its epilogue (one block of 16 filters or
                    pairs of them), max-pool; a NumPy reference for each
    narrow.py       the GEMM of a layer of at most 12 filters (a classifier): its dot products
                    along the lanes, each row's 64 bytes at a time
    windows.py      the GEMM's rows as words: copied by im2row, read from a one-channel image's
                    shifted copies, or a conv's windows read in place
    chain.py        predict's kernels back to back in one compiled call: a small batch, or groups
                    of 16 images of a big one in one parallel loop
    ops.py          IntConv2D, IntDense, IntMaxPool2D, IntFlatten, IntReLU
    model.py        QuantizedModel, its file format (kind "quantized_int8"), convert and
                    post-training quantize_model
    qat.py          quantization-aware training: fake quantization with the
                    straight-through estimator

The public API is below; tests and benchmarks that need internals import the
submodule (`from optim.quantization import kernels`).
"""

from .calibration import METHODS, ActivationRange, calibrate, format_ranges
from .model import QuantizedModel, convert, load_quantized, quantize_model
from .qat import quantization_aware_training

__all__ = [
    "METHODS", "ActivationRange", "QuantizedModel", "calibrate", "convert", "format_ranges", "load_quantized",
    "quantization_aware_training", "quantize_model",
]
