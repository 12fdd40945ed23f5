"""A binary network's small batch as one compiled call (optim/binary/chain.py): the stages' serial
kernels back to back, with the stages' output bit for bit."""

import numba
import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import minicnn
from minicnn import parallel
from minicnn.inference import Inference
from minicnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU
from optim.binary import BinaryConv2D, BinaryDense, binarize, pack
from portable import run_without_avx512

seeds = st.integers(0, 2**31 - 1)


def chained(model, x):
    """(output, whether it ran as the one step of a chain) of a new Inference of the model's layers."""
    run = Inference(model.layers)
    out = run(x).copy()
    steps = run.bound[x.shape]
    return out, len(steps) == 1 and steps[0].__qualname__.startswith("network_chain")


def stages_output(model, x):
    """The same batch through predict's stages one by one: forced threaded, no chain is made (the
    threaded builds run the same loops as the serial ones)."""
    with parallel.forced("threaded"):
        out, chain = chained(model, x)
    assert not chain
    return out


def network(seed, first, padding, pool, second, units, classes):
    """A packed network: a conv (float, or binary with real or binary inputs), maybe its pool, then a
    conv of each kind or none, a dense layer of each kind, and a float classifier."""
    rng = np.random.default_rng(seed)

    def conv(kind, C, F, k, pad=0):
        if kind == "float":
            return Conv2D(C, F, k, padding=pad, rng=rng)
        return BinaryConv2D(C, F, k, padding=pad, binary_input=kind == "xnor", rng=rng)

    layers, side = [conv(first, 1, 6, 5, padding)], 12 + 2 * padding - 4
    if pool:
        layers, side = layers + [MaxPool2D(2)], side // 2
    C = 6
    if second:
        layers += [conv(second, 6, 5, 3), ReLU()]
        C, side = 5, side - 2
    kind, width = units
    dense = Dense(C * side * side, width, rng=rng) if kind == "float" else BinaryDense(
        C * side * side, width, binary_input=kind == "xnor", rng=rng)
    layers += [Flatten(), dense, ReLU(), Dense(width, classes, rng=rng)]
    return pack(minicnn.Sequential(layers, input_shape=(1, 12, 12)))


KINDS = st.sampled_from(["float", "real", "xnor"])


@settings(max_examples=25, deadline=None)
@given(seeds, KINDS, st.integers(0, 1), st.booleans(), st.sampled_from([None, "float", "real", "xnor"]),
       st.tuples(KINDS, st.sampled_from([7, 16, 40])), st.sampled_from([3, 10, 20]), st.integers(1, 3))
@example(0, "float", 0, True, "xnor", ("xnor", 40), 10, 1)  # LeNet-5's XNOR network, small
@example(0, "float", 0, True, "real", ("real", 40), 10, 1)  # its binary-weight one: masked adds
def test_a_chain_is_the_stages_bit_for_bit(seed, first, padding, pool, second, units, classes, N):
    """Float convs (packed weights), real-input binary convs (decoded filters), XNOR convs and dense
    layers (signs, popcounts, pool and ReLU in the loop), masked-add dense layers, float dense layers
    (at most 16 outputs, or spans), the first conv padded or not: run serial, they chain, and the
    chain's output is the stages' bit for bit."""
    assume("float" != first or second not in (None, "float") or units[0] != "float")  # a binary layer to pack
    model = network(seed, first, padding, pool, second, units, classes)
    x = np.random.default_rng(seed).standard_normal((N, 1, 12, 12)).astype(np.float32)
    expected = stages_output(model, x)
    with parallel.forced("serial"):
        out, chain = chained(model, x)
    assert chain
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out, model.forward(x), rtol=0, atol=5e-5)


def test_the_chain_runs_where_every_kernel_runs_serial():
    """minicnn.parallel's rule, as each stage's kernels would apply it: at batch 1 LeNet-5's XNOR
    network chains; at batch 2 its conv1 would run threaded, so the stages run."""
    model = pack(binarize(minicnn.zoo.lenet5(seed=0), binary_activations=True))
    rng = np.random.default_rng(0)
    with parallel.forced("auto"):
        for N, chains in ((1, True), (2, False)):
            x = rng.standard_normal((N, 1, 28, 28)).astype(np.float32)
            out, chain = chained(model, x)
            assert chain == (chains or numba.get_num_threads() == 1), N
            np.testing.assert_array_equal(out, stages_output(model, x))


def test_no_chain_for_a_padded_second_conv_or_a_layer_of_its_own():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 1, 12, 12)).astype(np.float32)
    padded = pack(minicnn.Sequential([Conv2D(1, 4, 3, rng=rng), BinaryConv2D(4, 4, 3, padding=1, binary_input=True),
                                      Flatten(), Dense(400, 3, rng=rng)], input_shape=(1, 12, 12)))
    loose = pack(minicnn.Sequential([Conv2D(1, 4, 3, rng=rng), MaxPool2D(2), ReLU(), ReLU(), Flatten(),
                                     BinaryDense(100, 3, binary_input=True)], input_shape=(1, 12, 12)))
    for model in (padded, loose):
        with parallel.forced("serial"):
            out, chain = chained(model, x)
        assert not chain
        np.testing.assert_allclose(out, model.forward(x), rtol=0, atol=5e-5)


@pytest.mark.parametrize("change", ["in place", "replaced"])
def test_the_chain_follows_its_float_layers_weights(change):
    """Training changes a Conv2D's or a Dense's weights in place, and code may replace the arrays: the
    chain packs the conv's again and reads the dense layer's, as the stages do."""
    model = pack(binarize(minicnn.zoo.lenet5(seed=0), binary_activations=True))
    x = np.random.default_rng(3).standard_normal((1, 1, 28, 28)).astype(np.float32)
    conv1, fc2 = model.layers[0], model.layers[-1]
    with parallel.forced("serial"):
        before = model.predict(x)
        for layer in (conv1, fc2):
            new = layer.params["W"] * np.float32(-0.5)
            if change == "in place":
                layer.params["W"][...] = new
            else:
                layer.params["W"] = new
        after = model.predict(x)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, stages_output(model, x))
    with parallel.forced("serial"):
        conv1.params["b"] = conv1.params["b"].astype(np.float64)
        with pytest.raises(ValueError, match="Conv2D bias must be a C-contiguous float32 array"):
            model.predict(x)


def test_the_chain_on_a_cpu_without_avx512():
    """The portable build: the XNOR and binary-weight LeNet-5 at batch 1 chained, the stages' output."""
    run_without_avx512(
        "import numpy as np\n"
        "import minicnn\n"
        "from minicnn import parallel\n"
        "from minicnn.inference import Inference\n"
        "from optim.binary import binarize, pack\n"
        "x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)\n"
        "for act in (True, False):\n"
        "    model = pack(binarize(minicnn.zoo.lenet5(seed=0), binary_activations=act))\n"
        "    outs = []\n"
        "    for build in ('serial', 'threaded'):\n"
        "        with parallel.forced(build):\n"
        "            run = Inference(model.layers)\n"
        "            outs.append(run(x).copy())\n"
        "            assert (len(run.bound[x.shape]) == 1) == (build == 'serial'), build\n"
        "    assert np.array_equal(*outs), act\n"
        "print('ok')\n"
    )
