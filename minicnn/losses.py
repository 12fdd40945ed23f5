"""Softmax, log-softmax and cross-entropy, stable for any finite logits.

For logits z (N, K) and temperature T > 0:

    softmax(z / T)_k = exp(z_k / T - m) / sum_j exp(z_j / T - m),  m = max_j z_j / T

Subtracting the row maximum m changes nothing mathematically (softmax is
shift invariant) but keeps every exponent <= 0, so nothing overflows.

Mean cross-entropy against integer labels y (N,):

    L = -(1/N) sum_n log softmax(z_n)_{y_n},   dL/dz = (softmax(z) - onehot(y)) / N
"""

import numpy as np

from .checks import check_array, check_labels


def _check_temperature(temperature):
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


def log_softmax(z, temperature=1.0):
    """log softmax(z / T) along the last axis; z (N, K) float -> (N, K)."""
    check_array(z, "logits", ndim=2)
    _check_temperature(temperature)
    s = z / temperature
    s = s - s.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def softmax(z, temperature=1.0):
    """softmax(z / T) along the last axis; rows sum to one."""
    return np.exp(log_softmax(z, temperature))


def cross_entropy(z, y):
    """Mean cross-entropy of logits z (N, K) against labels y (N,): (loss, dL/dz)."""
    logp = log_softmax(z)
    N, K = z.shape
    check_labels(y, N, K)
    rows = np.arange(N)
    loss = -logp[rows, y].mean()
    dz = np.exp(logp)
    dz[rows, y] -= 1
    return float(loss), dz / N
