"""Input checks shared by layers, losses, training and file readers.

Every public entry point validates its arguments here, so that a wrong rank,
shape, dtype or a NaN is reported where it enters, with the offending value
in the message, instead of surfacing as an obscure error deep in a kernel.
"""

import math

import numba
import numpy as np


def check_array(x, name, ndim=None, kind="f", finite=True):
    """Return `x` as an ndarray after checking rank, dtype kind and finiteness.

    kind: "f" floating, "i" integer (signed or unsigned), None for any.
    Raises TypeError for a wrong type or dtype, ValueError for a wrong rank
    or non-finite values.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}")
    if kind == "f" and x.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")
    if kind == "i" and x.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if finite and x.dtype.kind == "f" and not _finite(x):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name} has non-finite values (first at index {tuple(bad)})")
    return x


def _finite(x):
    """Whether a float array holds no inf or NaN: np.isfinite(x).all() without the temporary
    boolean array, which at batch 1 costs predict as much as a small layer (4 us against 0.3)."""
    if x.dtype not in (np.float32, np.float64):
        return np.isfinite(x).all()
    return _count_not_finite(x.reshape(-1)) == 0


@numba.njit(cache=True)
def _count_not_finite(x):
    bad = 0
    for i in range(x.size):  # a sum, not an early exit: LLVM vectorises it
        bad += x[i] - x[i] != 0  # inf - inf and NaN - NaN are NaN
    return bad


def check_labels(y, n, num_classes, name="y"):
    """Check integer labels: shape (n,), values in [0, num_classes)."""
    check_array(y, name, ndim=1, kind="i")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} labels for {n} samples")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values in [{y.min()}, {y.max()}]"
        )
    return y


def check_int(v, name, minimum, maximum):
    """v as an int, checked to be an integer (not a bool) in minimum..maximum."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not minimum <= v <= maximum:
        raise ValueError(f"{name} must be an integer in {minimum}..{maximum}, got {v!r}")
    return int(v)


def check_positive_int(v, name, minimum=1):
    """v as an int, checked to be an integer (not a bool) >= minimum."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def check_bool(v, name):
    """v, checked to be a bool: a flag read from a file as "no" or 0 must not pass for one."""
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {v!r}")
    return bool(v)


def check_number(v, name, low=-math.inf, high=math.inf):
    """v as a float, checked to be a finite real number (not a bool) in [low, high]."""
    if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
            or not math.isfinite(v) or not low <= v <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {v!r}")
    return float(v)


def check_kernel_array(a, name, shape=None, dtype=np.float32):
    """a, checked to be what a Numba kernel reads through a flat view: a C-contiguous array of
    dtype (and shape); a kernel given anything else would read the wrong memory or not compile."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or not a.flags.c_contiguous:
        got = f"{a.dtype} {a.shape}{'' if a.flags.c_contiguous else ' (not contiguous)'}" if isinstance(
            a, np.ndarray) else type(a).__name__
        raise ValueError(f"{name} must be a C-contiguous {np.dtype(dtype).name} array, got {got}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return a


@numba.njit(cache=True)
def same_bits(a, b):
    """a and b (float32, one size) equal bit for bit: -0.0 differs from 0.0, a NaN equals itself.
    What a kernel's packed copy of weights is checked against (minicnn.inference, minicnn.chain).
    (Not numpy.array_equal: its temporary arrays cost more than the comparison, at batch 1.)"""
    a, b = a.reshape(-1).view(np.int32), b.reshape(-1).view(np.int32)
    differ = 0
    for i in range(a.size):  # no early exit: this loop runs 16 lanes at a time
        differ |= a[i] ^ b[i]
    return differ == 0


def output_array(out, shape, name="out"):
    """out, checked with check_kernel_array (float32, shape), or a new float32 array of shape."""
    return np.empty(shape, np.float32) if out is None else check_kernel_array(out, name, shape)
