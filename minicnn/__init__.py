"""minicnn: a small CNN written from scratch in NumPy, with Numba kernels.

    import minicnn
    x_train, y_train, x_test, y_test = minicnn.datasets.load("mnist10k")
    model = minicnn.zoo.lenet5(seed=0)
    minicnn.fit(model, x_train, y_train, epochs=10, batch_size=64, optimizer=minicnn.Adam(1e-3))
    print(model.summary(), minicnn.evaluate(model, x_test, y_test))

Where things live: layers.py and model.py (forward/backward pairs, Sequential);
kernels.py (the conv's and pool's NumPy references and their im2row and pool kernels);
convpool.py (training's conv and 2x2 max-pool as one step);
inference.py, direct.py, narrow.py, chain.py (what predict runs: fused
channels-last stages, their register-tiled kernels, and a small batch's
stages in one parallel loop); simd.py, quads.py and parallel.py (the vector
type those kernels use, its 4 x 4 lanes for one-channel convs, and the one
threaded/serial rule); losses,
optimizers, training; serialization and atomic (model files); datasets, zoo,
summary, timing, checks.
"""

from . import datasets, kernels, losses, zoo
from .layers import Conv2D, Dense, Flatten, Layer, MaxPool2D, ReLU
from .model import Sequential
from .optimizers import SGD, Adam
from .serialization import load, save
from .training import evaluate, fit

__all__ = [
    "Adam", "Conv2D", "Dense", "Flatten", "Layer", "MaxPool2D", "ReLU", "SGD", "Sequential",
    "datasets", "evaluate", "fit", "kernels", "load", "losses", "save", "zoo",
]
__version__ = "0.4.0"
