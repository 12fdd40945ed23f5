"""Gradient-descent optimizers over the layers' `params` / `grads` dicts.

SGD with momentum (the PyTorch form):   v <- mu v + g;   w <- w - lr v
Adam (Kingma & Ba, 2015):
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    w <- w - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

State is kept per (layer, parameter name) and restarted when a parameter's
shape changes, as it does when structured pruning removes filters.

Adam's update is a dozen elementwise numpy passes per parameter (each a
temporary array); `adam_update` does it in one Numba loop instead, beside
`adam_update_ref`, the numpy specification it is tested against.
"""

import numpy as np
from numba import prange

from .checks import check_number
from .parallel import twin


def _check_lr(lr):
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")


class Optimizer:
    def __init__(self, lr):
        _check_lr(lr)
        self.lr = lr
        self.state = {}

    def _slot(self, layer, name, p, count):
        key = (id(layer), name)
        s = self.state.get(key)
        if s is None or s[0].shape != p.shape:
            s = self.state[key] = [np.zeros_like(p) for _ in range(count)]
        return s

    def step(self, layers):
        """Update every parameter of `layers` in place from its gradient."""
        for layer in layers:
            for name, p in layer.params.items():
                self.update(layer, name, p, layer.grads[name])


class SGD(Optimizer):
    def __init__(self, lr=0.01, momentum=0.0):
        super().__init__(lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def update(self, layer, name, p, g):
        if self.momentum == 0:
            p -= self.lr * g
            return
        (v,) = self._slot(layer, name, p, 1)
        v *= self.momentum
        v += g
        p -= self.lr * v


class Adam(Optimizer):
    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8):
        super().__init__(lr)
        self.beta1 = check_number(beta1, "beta1", 0, 1 - 1e-12)
        self.beta2 = check_number(beta2, "beta2", 0, 1 - 1e-12)
        self.eps = check_number(eps, "eps", 0)
        self.t = 0

    def step(self, layers):
        self.t += 1
        super().step(layers)

    def update(self, layer, name, p, g):
        m, v = self._slot(layer, name, p, 2)
        b1, b2 = self.beta1, self.beta2
        # lr m_hat / (sqrt(v_hat) + eps) = lr_t m / (sqrt(v) + eps_t): the bias corrections move into
        # two scalars. eps must be scaled too, or early steps would see a 30x larger epsilon than the
        # formula (and PyTorch) at t = 1, which damps the first updates of rarely-active weights.
        correction = np.sqrt(1 - b2**self.t)
        lr_t = self.lr * correction / (1 - b1**self.t)
        adam_update(p, g, m, v, b1, b2, lr_t, self.eps * correction)


def adam_update_ref(p, g, m, v, b1, b2, lr_t, eps):
    """One Adam step in place on p, m, v (same shape); lr_t and eps carry the bias corrections."""
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    p -= (lr_t * m / (np.sqrt(v) + eps)).astype(p.dtype, copy=False)


def _adam_update_loops(p, g, m, v, b1, b2, lr_t, eps):
    for i in prange(p.size):
        mi = b1 * m[i] + (1 - b1) * g[i]
        vi = b2 * v[i] + (1 - b2) * g[i] * g[i]
        m[i] = mi
        v[i] = vi
        p[i] -= lr_t * mi / (np.sqrt(vi) + eps)


_adam_update = twin(_adam_update_loops)


def adam_update(p, g, m, v, b1, b2, lr_t, eps):
    """Fast Adam step, same contract as adam_update_ref: one pass over the
    four arrays (flat views of them) instead of a dozen with temporaries."""
    arrays = (p, g, m, v)
    # A flat view of a non-contiguous array would be a copy (the update would
    # be lost); mixed dtypes would each need a compiled build of their own.
    if not all(a.flags.c_contiguous for a in arrays) or len({a.dtype for a in arrays}) > 1:
        return adam_update_ref(p, g, m, v, b1, b2, lr_t, eps)
    flat = [a.reshape(-1) for a in arrays]
    _adam_update(p.size, *flat, float(b1), float(b2), float(lr_t), float(eps))
