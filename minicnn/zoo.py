"""The networks the rest of the project trains and compresses.

All take (N, 1, 28, 28) images and return 10 logits; `seed` fixes the
initial weights.
"""

import numpy as np

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from .model import Sequential


def seed_cnn(seed=0):
    """The example this project grew from: Conv 32@3x3, ReLU, MaxPool 2, Dense 10."""
    return _one_conv_cnn(32, seed)


def tiny_cnn(seed=0):
    """The seed CNN with 8 filters instead of 32, a distillation student with a
    quarter of its weights (13,610): conv 8@3x3, ReLU, MaxPool 2, Dense 10."""
    return _one_conv_cnn(8, seed)


def _one_conv_cnn(filters, seed):
    rng = np.random.default_rng(seed)
    return Sequential([
        Conv2D(1, filters, 3, rng=rng), ReLU(), MaxPool2D(2),
        Flatten(), Dense(filters * 13 * 13, 10, rng=rng),
    ])


def lenet5(seed=0):
    """LeNet-5 as in Caffe and Deep Compression (431K weights): conv 20@5x5, pool,
    conv 50@5x5, pool, fc 800->500, ReLU, fc 500->10 (no ReLU after the convs)."""
    rng = np.random.default_rng(seed)
    return Sequential([
        Conv2D(1, 20, 5, rng=rng), MaxPool2D(2),
        Conv2D(20, 50, 5, rng=rng), MaxPool2D(2),
        Flatten(), Dense(800, 500, rng=rng), ReLU(), Dense(500, 10, rng=rng),
    ])


def lenet300(seed=0):
    """LeNet-300-100: a 784-300-100-10 perceptron with ReLUs (266K weights)."""
    rng = np.random.default_rng(seed)
    return Sequential([
        Flatten(),
        Dense(784, 300, rng=rng), ReLU(),
        Dense(300, 100, rng=rng), ReLU(),
        Dense(100, 10, rng=rng),
    ])


def small_cnn(seed=0):
    """A distillation student with 7% of LeNet-5's weights (30,134): conv 8@5x5, pool,
    ReLU, conv 16@5x5, pool, ReLU, fc 256->100, ReLU, fc 100->10."""
    rng = np.random.default_rng(seed)
    return Sequential([
        Conv2D(1, 8, 5, rng=rng), MaxPool2D(2), ReLU(),
        Conv2D(8, 16, 5, rng=rng), MaxPool2D(2), ReLU(),
        Flatten(), Dense(256, 100, rng=rng), ReLU(), Dense(100, 10, rng=rng),
    ])


def small_mlp(seed=0):
    """A distillation student with 9% of LeNet-5's weights (39,760): a 784-50-10
    perceptron with a ReLU."""
    rng = np.random.default_rng(seed)
    return Sequential([Flatten(), Dense(784, 50, rng=rng), ReLU(), Dense(50, 10, rng=rng)])


def deep_cnn(seed=0):
    """A deeper CNN where cutting layers is meaningful (525K weights, 6.6M MACs):
    conv 32@3x3 'same', ReLU, pool, [conv 32->32 3x3 'same', ReLU] x 3, pool,
    conv 64@3x3, ReLU, fc 1600->256, ReLU, fc 256->256, ReLU, fc 256->10.
    The three middle convs and fc 256->256 keep their input's shape, so any
    of them can be removed (optim.cutting) and the network still fits together."""
    rng = np.random.default_rng(seed)
    middle = [layer for _ in range(3) for layer in (Conv2D(32, 32, 3, padding=1, rng=rng), ReLU())]
    return Sequential([
        Conv2D(1, 32, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
        *middle, MaxPool2D(2),
        Conv2D(32, 64, 3, rng=rng), ReLU(), Flatten(),
        Dense(64 * 5 * 5, 256, rng=rng), ReLU(),
        Dense(256, 256, rng=rng), ReLU(),
        Dense(256, 10, rng=rng),
    ])


MODELS = {"seed_cnn": seed_cnn, "lenet5": lenet5, "lenet300": lenet300, "deep_cnn": deep_cnn,
          "small_cnn": small_cnn, "small_mlp": small_mlp, "tiny_cnn": tiny_cnn}


def build(name, seed=0):
    """A fresh, untrained model by zoo name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](seed)
