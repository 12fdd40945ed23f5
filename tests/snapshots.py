"""A model's parameters before and after a call: techniques never change the model they were given."""

import numpy as np
import pytest


def params_of(model):
    """A deep copy of every layer's params: [{name: array}, ...]."""
    return [{k: v.copy() for k, v in layer.params.items()} for layer in model.layers]


def assert_same_params(model, saved):
    assert len(model.layers) == len(saved)
    for layer, before in zip(model.layers, saved):
        assert layer.params.keys() == before.keys()
        for name in before:
            assert np.array_equal(layer.params[name], before[name]), f"{layer} {name} changed"


def assert_rejected_unchanged(model, call, error, message):
    """call(model) raises `error` matching `message`, and leaves the model's layers and params as they were."""
    layers, saved = list(model.layers), params_of(model)
    with pytest.raises(error, match=message):
        call(model)
    assert model.layers == layers
    assert_same_params(model, saved)
