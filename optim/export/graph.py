"""Building an ONNX graph: named tensors, initializers (dense or sparse), nodes, the checked model, the file.

An ONNX model (https://onnx.ai/onnx/repo-docs/IR.html) is one graph of nodes, each an operator
of the default domain at the model's opset version, reading and writing named tensors; its
constants are initializers. `Graph` collects nodes and initializers in execution order;
`Graph.model` adds the typed inputs and outputs and the opset, and checks the result with
onnx.checker (full_check: the operators' type and shape inference too). `write` writes the
file atomically (minicnn.atomic: a temporary name, then a rename).

The opset is one of MIN_OPSET..MAX_OPSET (13..27; `check_opset`): 13 has every operator the
export uses, 27 is the newest the tests run in ONNX Runtime. onnx.checker knows newer ones,
but passing it does not make a model runnable: ONNX Runtime 1.32 has no QuantizeLinear(28).
An older ONNX Runtime runs only the opsets it implements (its compatibility table).

Weight initializers are dense or sparse, whichever is smaller (`stored_sparse`). A dense
TensorProto holds all n values, n * itemsize bytes. A SparseTensorProto holds the nnz nonzero
values and their positions in the flattened tensor, which ONNX stores as int64 (the IR allows
no narrower index type), nnz * (itemsize + 8) bytes. So a float32 weight is stored sparse
below a density of 1/3, an int8 or uint8 one below 1/9: the file of a pruned model follows
its nonzeros, as its .npz does (optim.sparse, with relative indices of 4-16 bits instead of
64). ONNX Runtime densifies sparse initializers when it loads a model, so a pruned layer runs
the same dense Conv or Gemm as an unpruned one: the sparse form saves disk, not time.
`Graph(sparse=False)` writes every initializer dense, for tools that read no sparse ones.

onnx is optional (`pip install -e '.[onnx]'`): `require_onnx` imports it when a Graph is made,
never when optim is imported.
"""

import numpy as np

from minicnn.atomic import write_file

INSTALL_HINT = "pip install -e '.[onnx]'"
# Per-axis DequantizeLinear (the int32 logits, one scale per class) came in opset 13; Clip and
# MaxPool on int8, and GreaterOrEqual, in 12.
MIN_OPSET = 13
# The newest opset the tests run in ONNX Runtime (tests/test_export.py, every kind of model):
# ONNX Runtime 1.32 runs 13..27 but has no QuantizeLinear(28), so an int8 model at opset 28
# would pass onnx.checker and fail to load. Raise this only with tests that run the new opset.
MAX_OPSET = 27
INDEX_BYTES = 8  # a sparse initializer's positions are int64


def require_onnx():
    """The onnx module; ImportError naming the install command if it is missing."""
    try:
        import onnx
    except ImportError:
        raise ImportError(f"ONNX export needs the onnx package: {INSTALL_HINT}") from None
    return onnx


def newest_opset():
    """The newest opset the export writes: MAX_OPSET, or the installed onnx's newest if that is older."""
    return min(MAX_OPSET, require_onnx().defs.onnx_opset_version())


def check_opset(opset):
    """opset as an int, if it is in MIN_OPSET..newest_opset(); else ValueError."""
    newest = newest_opset()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be an integer in {MIN_OPSET}..{newest} (the newest the export is tested at "
                         f"in ONNX Runtime, or the installed onnx's newest if older), got {opset!r}")
    return int(opset)


def stored_sparse(array):
    """Whether `array` is smaller as a sparse initializer (nnz values + int64 positions) than dense."""
    nnz = int(np.count_nonzero(array))
    return nnz * (array.itemsize + INDEX_BYTES) < array.size * array.itemsize


class Graph:
    """The nodes and initializers of one ONNX graph, added in execution order.

    Every tensor gets a unique name from its hint (hint, hint_2, hint_3, ...); each method
    returns the name it gave. sparse: store weights sparse where that is smaller (`weight`).
    """

    def __init__(self, sparse=True):
        self.onnx = require_onnx()
        self.sparse = bool(sparse)
        self.nodes, self.initializers, self.sparse_initializers = [], [], []
        self.densified = []  # the sparse initializers as dense ones, for the checks (see `model`)
        self.taken = set()

    def name(self, hint):
        name, n = hint, 1
        while name in self.taken:
            n += 1
            name = f"{hint}_{n}"
        self.taken.add(name)
        return name

    def constant(self, hint, array):
        """A dense initializer holding `array` with its dtype and shape (a 0-d array: a scalar)."""
        name = self.name(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def scalar(self, hint, value, dtype=np.float32):
        """A 0-d initializer holding `value` as `dtype`: a scale, a zero point, a constant operand."""
        return self.constant(hint, np.array(value, dtype))

    def weight(self, hint, array):
        """An initializer for a weight tensor: sparse if that is smaller (see the module docstring)."""
        if not (self.sparse and stored_sparse(array)):
            return self.constant(hint, array)
        name = self.name(hint)
        flat = np.ascontiguousarray(array).reshape(-1)
        positions = np.flatnonzero(flat)  # ascending, as the checker requires
        to_tensor = self.onnx.numpy_helper.from_array
        values = to_tensor(flat[positions], name)
        indices = to_tensor(positions.astype(np.int64), self.name(f"{name}_positions"))
        self.sparse_initializers.append(self.onnx.helper.make_sparse_tensor(values, indices, array.shape))
        self.densified.append(to_tensor(np.ascontiguousarray(array), name))
        return name

    def node(self, op, inputs, hint, **attributes):
        """One `op` node reading the tensors named in `inputs`, with the operator's attributes;
        returns the name of its (single) output."""
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=out, **attributes))
        return out

    def value_info(self, name, dtype, shape):
        """The type of a graph input or output: dtype (NumPy), shape (per sample) after a batch axis N."""
        elem = self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        return self.onnx.helper.make_tensor_value_info(name, elem, ["N", *map(int, shape)])

    def model(self, inputs, outputs, opset, doc=""):
        """The checked ModelProto. inputs, outputs: [(name, dtype, per-sample shape)].

        onnx.checker checks the model as written (the sparse initializers' positions
        included), then the operators' types and shapes (full_check) on a copy whose sparse
        initializers are dense, as ONNX Runtime loads them: onnx's shape inference types a
        sparse initializer as a sparse tensor, which Conv and Gemm do not take.
        """
        opsets = [self.onnx.helper.make_opsetid("", check_opset(opset))]
        model = self._model(inputs, outputs, opsets, doc, self.initializers, self.sparse_initializers)
        self.onnx.checker.check_model(model)
        dense = self._model(inputs, outputs, opsets, doc, self.initializers + self.densified, [])
        self.onnx.checker.check_model(dense, full_check=True)
        return model

    def _model(self, inputs, outputs, opsets, doc, initializers, sparse_initializers):
        helper = self.onnx.helper
        graph = helper.make_graph(
            self.nodes, "minicnn", [self.value_info(*v) for v in inputs], [self.value_info(*v) for v in outputs],
            initializers, sparse_initializer=sparse_initializers)
        model = helper.make_model(graph, opset_imports=opsets, producer_name="minicnn", doc_string=doc)
        # The oldest IR version that has this opset, not the installed onnx's newest: an older
        # ONNX Runtime refuses a file whose IR version it does not know.
        model.ir_version = helper.find_min_ir_version_for(opsets)
        return model


def write(model, path):
    """Write the ModelProto `model` to `path` atomically; returns the bytes written."""
    data = model.SerializeToString()
    write_file(path, data)
    return len(data)
