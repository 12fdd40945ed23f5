"""Sequential: a list of layers run in order, forward and backward."""

import copy
import threading

import numpy as np

from .checks import check_array, check_positive_int
from .convpool import training_steps
from .inference import Inference
from .summary import format_summary


class Sequential:
    """A feed-forward network. `layers` is a list of Layer objects.

    input_shape is the per-sample shape, e.g. (1, 28, 28); it is checked
    against the layers at construction, so a mis-wired model fails here and
    not in the middle of training.
    """

    def __init__(self, layers, input_shape=(1, 28, 28)):
        self.layers = list(layers)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_shapes()

    def output_shapes(self):
        """Per-sample output shape of every layer; raises if the layers do not fit together."""
        return output_shapes(self.layers, self.input_shape)

    @property
    def num_classes(self):
        return self.output_shapes()[-1][0]

    def check_input(self, x):
        """x, checked to be a finite array of shape (N, *input_shape)."""
        check_array(x, "model input", ndim=1 + len(self.input_shape))
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"model expects inputs of shape (N, {', '.join(map(str, self.input_shape))}), got {x.shape}")
        return x

    def forward(self, x):
        """x (N, *input_shape) float -> logits (N, num_classes), keeping what backward needs.

        The layers run in minicnn.convpool's training steps: a Conv2D with the 2x2 max-pool (and
        ReLU) after it is one step, whose backward reaches only the pooled positions.
        """
        self.check_input(x)
        for step in self._training_steps():
            x = step.forward(x)
        return x

    def backward(self, dout, input_grad=False):
        """Backpropagate d(loss)/d(logits) (N, num_classes); fills every layer's grads.

        Returns d(loss)/d(input) if input_grad, else None: training never needs
        the gradient of the images, so the first layer is told (through its
        `needs_input_grad`, for this call only) to skip computing it. For
        LeNet-5 that is a scatter of every pooled gradient into the 64x1x28x28 batch.
        """
        first = self.layers[0]
        first.needs_input_grad = input_grad
        try:
            for step in reversed(self._training_steps()):
                dout = step.backward(dout)
        finally:
            first.needs_input_grad = True
        return dout if input_grad else None

    def predict(self, x, batch_size=256):
        """Logits (N, num_classes) float32, computed batch by batch; argmax gives the class.

        The same numbers as forward (to float32 rounding), through minicnn.inference's fused
        stages, which keep buffers and packed weights between calls: one set per thread. The
        stages are chosen for the layers and their dtypes: change a dtype with Sequential.astype
        (which drops them), not Layer.astype on one layer.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        self.check_input(x)
        local = self.__dict__.get("_inference")
        if local is None:
            local = self._inference = threading.local()
        run = getattr(local, "run", None)
        if run is None or run.layers != tuple(self.layers):
            run = local.run = Inference(self.layers)
        if len(x) == 0:
            return np.zeros((0, *self.output_shapes()[-1]), np.float32)
        # Each call of run returns a buffer that its next call overwrites: copied out.
        if len(x) <= batch_size:
            return run(x).astype(np.float32, order="C")  # a copy, also of a float64 model's or a transposed view
        first = run(x[:batch_size])
        out = np.empty((len(x), *first.shape[1:]), np.float32)
        out[:batch_size] = first
        for i in range(batch_size, len(x), batch_size):
            out[i : i + batch_size] = run(x[i : i + batch_size])
        return out

    def _training_steps(self):
        """convpool.training_steps of the layers, kept (with their buffers) while the layers stay."""
        layers = tuple(self.layers)
        kept = self.__dict__.get("_steps")
        if kept is None or kept[0] != layers:
            kept = self._steps = (layers, training_steps(layers))
        return kept[1]

    def clear_activations(self):
        """Forget what forward kept for backward: every layer's cache and the training steps' buffers."""
        for layer in self.layers:
            layer.cache = None
        self.__dict__.pop("_steps", None)

    def __getstate__(self):
        """What copy and pickle take: not predict's buffers, nor training's."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_inference", "_steps")}

    def copy(self):
        """An independent deep copy: compression techniques work on one, never on the original."""
        return copy.deepcopy(self)

    def astype(self, dtype):
        """Convert every parameter in place (float64 for gradient checks)."""
        for layer in self.layers:
            layer.astype(dtype)
        self.__dict__.pop("_inference", None)  # its stages were chosen for the old dtypes
        return self

    def save(self, path):
        """Write architecture and weights to `path` (.npz), atomically."""
        from .serialization import save  # serialization imports this module

        save(self, path)

    def summary(self):
        """A table of layers: output shape, parameters, nonzeros, bits per weight,
        bytes of the stored weights and multiply-accumulates per sample."""
        return format_summary(self)

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n  {inner}\n], input_shape={self.input_shape})"


def check_sequential(model, user):
    """model, checked to be a Sequential: `user` (a function's name) says who needs one."""
    if not isinstance(model, Sequential):
        raise TypeError(f"{user} needs a minicnn Sequential model, got {type(model).__name__}")
    return model


def output_shapes(layers, input_shape, what="layer"):
    """Per-sample output shape of each of `layers` (anything with output_shape(in_shape)) fed
    input_shape; ValueError naming the first one that does not fit its input."""
    shapes, shape = [], tuple(input_shape)
    for i, layer in enumerate(layers):
        try:
            shape = layer.output_shape(shape)
        except ValueError as e:
            raise ValueError(f"{what} {i} ({type(layer).__name__}) does not fit its input: {e}") from None
        shapes.append(shape)
    return shapes
