"""Numerical gradients by central differences, contracted with a random dout.

For f: x -> y and a random upstream gradient g, the scalar L = <f(x), g> has
dL/dx = backward(g). Each coordinate is checked against
(L(x + h e_i) - L(x - h e_i)) / 2h, in float64. A random g (not all ones,
not a mean) is what catches transposed or mis-summed gradients.
"""

import numpy as np


def numerical_gradient(f, x, g, h=1e-6):
    """d<f(x), g>/dx by central differences; x is perturbed in place and restored."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = float((f() * g).sum())
        flat[i] = old - h
        minus = float((f() * g).sum())
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * h)
    return grad


NOISE_SCALE = 1e-3  # see relative_error


def relative_error(a, b):
    """max |a - b| over the larger of max |a|, max |b| and NOISE_SCALE.

    Elementwise ratios would flag the rounding noise of entries near zero, not a wrong
    gradient. The floor does the same for a gradient that is zero everywhere (all of a
    binary layer's inputs past the clip, say): central differences leave ~1e-10 of
    noise (h = 1e-6, float64), which would be a 100% error against an exact 0, and is
    1e-7 of the floor. An absolute error above ~1e-9 still fails a 1e-6 tolerance."""
    scale = max(np.max(np.abs(a), initial=0), np.max(np.abs(b), initial=0), NOISE_SCALE)
    return float(np.max(np.abs(a - b), initial=0) / scale)


def check_layer_gradients(layer, x, seed=0, tol=1e-6):
    """Assert backward(dout) matches numerical gradients for the input and every parameter."""
    rng = np.random.default_rng(seed)
    layer.astype(np.float64)
    out = layer.forward(x)
    g = rng.standard_normal(out.shape)
    dx = layer.backward(g)
    analytic = {"input": dx, **{k: v.copy() for k, v in layer.grads.items()}}
    targets = {"input": x, **layer.params}
    for name, arr in targets.items():
        num = numerical_gradient(lambda: layer.forward(x), arr, g)
        err = relative_error(analytic[name], num)
        worst = np.unravel_index(np.argmax(np.abs(analytic[name] - num)), num.shape)
        assert err < tol, (
            f"{type(layer).__name__} d/d{name}: relative error {err:.2e} > {tol:.0e}; "
            f"at {worst}: analytic {analytic[name][worst]:.6g}, numerical {num[worst]:.6g}"
        )
