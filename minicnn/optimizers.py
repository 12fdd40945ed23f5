"""Gradient-descent optimizers over the layers' `params` / `grads` dicts.

SGD with momentum (the PyTorch form):   v <- mu v + g;   w <- w - lr v
Adam (Kingma & Ba, 2015):
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    w <- w - lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

State is kept per (layer, parameter name) and restarted when a parameter's
shape changes, as it does when structured pruning removes filters.
"""

import numpy as np


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
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.t = 0

    def step(self, layers):
        self.t += 1
        super().step(layers)

    def update(self, layer, name, p, g):
        m, v = self._slot(layer, name, p, 2)
        b1, b2 = self.beta1, self.beta2
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        lr_t = self.lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        p -= (lr_t * m / (np.sqrt(v) + self.eps)).astype(p.dtype, copy=False)
