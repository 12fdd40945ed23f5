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
from optim.binary import BinaryConv2D, BinaryDense, addsub, binarize, pack, windows, xnor
from portable import run_without_avx512

seeds = st.integers(0, 2**31 - 1)


def chained(model, x):
    """(output, whether the chain ran) of a new Inference of the model's layers on x."""
    run = Inference(model.layers)
    out = run(x).copy()
    steps = run.bound[x.shape]
    return out, len(steps) == 1 and hasattr(steps[0], "chain") and steps[0].chain.runs()


def stages_output(model, x):
    """The same batch through predict's stages one by one: forced threaded, no chain is made (the
    threaded builds run the same loops as the serial ones)."""
    with parallel.forced("threaded"):
        out, chain = chained(model, x)
    assert not chain
    return out


def conv(kind, C, F, k, rng, **geometry):
    if kind == "float":
        return Conv2D(C, F, k, rng=rng, **geometry)
    return BinaryConv2D(C, F, k, binary_input=kind == "xnor", rng=rng, **geometry)


def dense(kind, K, F, rng):
    return Dense(K, F, rng=rng) if kind == "float" else BinaryDense(K, F, binary_input=kind == "xnor", rng=rng)


def network(seed, first, filters, padding, pool, second, units, classes):
    """A packed network on 12 x 12 images: a conv (float, or binary with real or binary inputs) of
    `filters` filters, maybe its pool; a second conv of a kind (or none), with its pool or at stride
    2, and its ReLU; a dense layer of a kind; maybe a second one (after a ReLU); a float classifier,
    or none, so that the network ends in a conv."""
    rng = np.random.default_rng(seed)
    layers, side = [conv(first, 1, filters, 5, rng, padding=padding)], 12 + 2 * padding - 4
    if pool:
        layers, side = layers + [MaxPool2D(2)], side // 2
    C = filters
    kind, second_pool = second
    if kind:
        stride = 1 if second_pool else 2
        layers += [conv(kind, filters, 5, 3, rng, stride=stride), ReLU()]
        C, side = 5, (side - 3) // stride + 1
        if second_pool:
            layers, side = layers + [MaxPool2D(2)], side // 2
    if units is None:
        return pack(minicnn.Sequential(layers, input_shape=(1, 12, 12))), (C, side)
    kind, width = units
    layers += [Flatten(), dense(kind, C * side * side, width, rng), ReLU()]
    if classes is None:
        layers += [dense("xnor", width, 12, rng)]
    else:
        layers += [Dense(width, classes, rng=rng)]
    return pack(minicnn.Sequential(layers, input_shape=(1, 12, 12))), (C, side)


KINDS = st.sampled_from(["float", "real", "xnor"])


@settings(max_examples=30, deadline=None)
@given(seeds, KINDS, st.sampled_from([6, 40]), st.integers(0, 1), st.booleans(),
       st.tuples(st.sampled_from([None, "float", "real", "xnor"]), st.booleans()),
       st.one_of(st.none(), st.tuples(KINDS, st.sampled_from([7, 16, 40]))), st.sampled_from([None, 3, 20]),
       st.integers(1, 3))
@example(0, "float", 6, 0, True, ("xnor", False), ("xnor", 40), 10, 1)  # LeNet-5's XNOR network, small
@example(0, "float", 6, 0, True, ("real", True), ("real", 40), 10, 1)  # its binary-weight one: masked adds
@example(1, "xnor", 40, 1, False, (None, False), None, None, 2)  # a padded XNOR conv ends the network
def test_a_chain_is_the_stages_bit_for_bit(seed, first, filters, padding, pool, second, units, classes, N):
    """Float convs (packed weights, one block of 32 filters or two), real-input binary convs (decoded
    filters), XNOR convs and dense layers (signs, popcounts, pool and ReLU in the loop), masked-add
    dense layers, float dense layers (at most 16 outputs, or spans), a dense layer after a dense
    one, strides 1 and 2, pools or none, the first conv padded or not, a network that ends in a
    conv: run serial, they chain, and the chain's output is the stages' bit for bit."""
    assume(first != "float" or second[0] not in (None, "float") or (units and units[0] != "float"))  # a binary layer
    model, _ = network(seed, first, filters, padding, pool, second, units, classes)
    x = np.random.default_rng(seed).standard_normal((N, 1, 12, 12)).astype(np.float32)
    expected = stages_output(model, x)
    with parallel.forced("serial"):
        out, chain = chained(model, x)
    assert chain
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out, model.forward(x), rtol=0, atol=5e-5)


def test_the_chain_runs_where_every_kernel_runs_serial():
    """minicnn.parallel's rule, as each stage's kernels would apply it: at batch 1 LeNet-5's XNOR
    network chains; at batch 2 its conv1's 576 K multiply-adds run threaded where they reach the
    break-even, and the stages run."""
    model = pack(binarize(minicnn.zoo.lenet5(seed=0), binary_activations=True))
    rng = np.random.default_rng(0)
    with parallel.forced("auto"):
        for N in (1, 2):
            x = rng.standard_normal((N, 1, 28, 28)).astype(np.float32)
            out, chain = chained(model, x)
            assert chain == (N * 24 * 24 * 20 * 25 < parallel.MIN_MACS or numba.get_num_threads() == 1), N
            np.testing.assert_array_equal(out, stages_output(model, x))


def test_the_rule_is_read_at_each_call():
    """A chain bound under one mode, then another forced: the stages run, bit for bit, and the chain
    again when the mode comes back."""
    model = pack(binarize(minicnn.zoo.lenet5(seed=0), binary_activations=True))
    x = np.random.default_rng(4).standard_normal((1, 1, 28, 28)).astype(np.float32)
    run = Inference(model.layers)
    with parallel.forced("serial"):
        expected = run(x).copy()
        (step,) = run.bound[x.shape]
        assert step.chain.runs()
    with parallel.forced("threaded"):
        assert not step.chain.runs()
        np.testing.assert_array_equal(run(x), expected)
        np.testing.assert_array_equal(run(x), expected)
    with parallel.forced("serial"):
        np.testing.assert_array_equal(run(x), expected)


def test_no_chain_for_a_padded_second_conv_a_layer_of_its_own_or_an_empty_batch():
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
    assert padded.predict(x[:0]).shape == (0, 3)


@pytest.mark.parametrize("change", ["in place", "replaced"])
def test_the_chain_follows_its_float_layers_weights(change):
    """Training changes a Conv2D's or a Dense's weights in place, and code may replace the arrays: the
    chain packs the conv's again (both blocks of 32 filters) and reads the dense layer's, as the
    stages do."""
    rng = np.random.default_rng(5)
    model = pack(minicnn.Sequential([Conv2D(1, 40, 5, rng=rng), MaxPool2D(2), BinaryConv2D(40, 8, 3, binary_input=True),
                                     Flatten(), Dense(8 * 2 * 2, 10, rng=rng)], input_shape=(1, 12, 12)))
    x = rng.standard_normal((1, 1, 12, 12)).astype(np.float32)
    conv1, fc = model.layers[0], model.layers[-1]
    run = Inference(model.layers)
    with parallel.forced("serial"):
        before = run(x).copy()
        assert run.bound[x.shape][0].chain.runs()
        for layer in (conv1, fc):
            new = layer.params["W"] * np.float32(-0.5)
            if change == "in place":
                layer.params["W"][...] = new
            else:
                layer.params["W"] = new
        after = run(x).copy()
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, stages_output(model, x))
    with parallel.forced("serial"):
        conv1.params["b"] = conv1.params["b"].astype(np.float64)
        with pytest.raises(ValueError, match="Conv2D bias must be a C-contiguous float32 array"):
            run(x)


def test_a_packed_layer_of_bad_scales_is_refused():
    """A binary layer whose alpha is not finite: a clear error when the chain is made, as the stages
    give, not NaN logits."""
    model = pack(binarize(minicnn.zoo.lenet5(seed=0), binary_activations=True))
    model.layers[2].alpha[0] = np.inf
    x = np.zeros((1, 1, 28, 28), np.float32)
    for build in ("serial", "threaded"):
        with parallel.forced(build), pytest.raises(ValueError, match="alpha scales must be finite"):
            Inference(model.layers)(x)


@pytest.mark.parametrize("kernel", [windows.window_signs_serial, xnor.xnor_layer_serial, addsub.addsub_dense_serial])
def test_kernels_without_reference_counts_return_nothing(kernel):
    """Compiled without Numba's runtime, a kernel that returned an array would hand its caller one
    whose count nobody raised: what the chain calls returns None."""
    for act in (True, False):
        with parallel.forced("serial"):
            pack(binarize(minicnn.zoo.lenet5(seed=0), binary_activations=act)).predict(np.zeros((1, 1, 28, 28),
                                                                                            np.float32))
    assert kernel.nopython_signatures
    for signature in kernel.nopython_signatures:
        assert signature.return_type == numba.types.none, signature


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
        "            assert hasattr(run.bound[x.shape][0], 'chain') == (build == 'serial'), build\n"
        "    assert np.array_equal(*outs), act\n"
        "print('ok')\n"
    )
