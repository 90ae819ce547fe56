"""Replaces every ``ai.neurorewrite.SparseLinear`` node with standard ONNX ops, so plain onnxruntime runs it.

The PyPI onnxruntime wheel ships no C API headers, so a native custom-op library cannot be built
here; instead the preparation for onnxruntime (:mod:`neurorewrite.passes.prepare`) rewrites the
operator (the file on disk keeps the compact CSR form). Two methods, measured in ``benchmarks/deploy.py``:

- ``densify`` (default): rebuild W' densely and run one MatMul (+ Add). Fastest in plain onnxruntime
  (it is the ``dense`` format's speed), at the dense memory cost while running.
- ``gather``: ELL layout (rows padded to the longest row): ``Gather`` the input columns, ``Mul`` by the
  values, ``ReduceSum`` per row. Memory in proportion to the nonzeros, but slower on CPU because every
  product reads a gathered copy of its input.

Invariant: the outputs equal the operator's definition (:func:`neurorewrite.ops.sparse_linear_reference`)
up to float summation order; nodes of other domains are kept; the ``ai.neurorewrite`` opset import is
dropped. A SparseLinear whose CSR arrays are inconsistent is a ModelLoadError naming the node. The
input model is not modified.
"""

from __future__ import annotations

import numpy as np
import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.ops import DOMAIN, CsrMatrix, is_sparse_linear
from neurorewrite.rewriter.editor import RUNTIME_ONLY, GraphEditor
from neurorewrite.rewriter.graph import node_label
from neurorewrite.rewriter.sparse_nodes import read_sparse_linear

METHODS = ("densify", "gather")


def has_sparse_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)


def to_standard_ops(model: onnx.ModelProto, method: str = "densify") -> onnx.ModelProto:
    """A copy of ``model`` with every SparseLinear node rewritten to standard ONNX ops by ``method``."""
    if method not in METHODS:
        raise InvalidOptionError(f"sparse method must be one of {', '.join(METHODS)}, got {method!r}")
    editor = GraphEditor.start(model)
    sparse = {i for i, node in enumerate(model.graph.node) if is_sparse_linear(node)}
    for i in sorted(sparse):
        node = model.graph.node[i]
        csr, bias = read_sparse_linear(editor.index, i)
        base = node_label(node, i)
        if method == "densify":
            _densified(editor, node.input[0], node.output[0], base, csr, bias)
        else:
            _gathered(editor, node.input[0], node.output[0], base, csr, bias)
        editor.replace_node(i, editor.take())
        editor.drop_inits |= {
            name for name in node.input[1:] if name and editor.index.constant_source(name) == "initializer"
            and set(editor.index.consumers.get(name, ())) <= sparse
        }
    editor.drop_opsets.add(DOMAIN)
    return editor.apply(model)


def _add_bias(editor: GraphEditor, y: str, out: str, base: str, bias: np.ndarray | None) -> None:
    if bias is not None:
        editor.node("Add", [y, editor.const(base + ".bias", bias, RUNTIME_ONLY)], base, outputs=[out])


def _densified(editor: GraphEditor, x: str, out: str, base: str, csr: CsrMatrix, bias: np.ndarray | None) -> None:
    weight = editor.const(base + ".dense_w", np.ascontiguousarray(csr.to_dense().T), RUNTIME_ONLY)
    (y,) = editor.node("MatMul", [x, weight], base, outputs=None if bias is not None else [out])
    _add_bias(editor, y, out, base, bias)


def _gathered(editor: GraphEditor, x: str, out: str, base: str, csr: CsrMatrix, bias: np.ndarray | None) -> None:
    ell_idx, ell_val = _ell(csr)
    (picked,) = editor.node("Gather", [x, editor.const(base + ".ell_idx", ell_idx.ravel(), RUNTIME_ONLY)], base, axis=-1)
    shape = editor.leading_shape(x, base, list(ell_idx.shape))
    (rows,) = editor.node("Reshape", [picked, shape], base)
    (products,) = editor.node("Mul", [rows, editor.const(base + ".ell_val", ell_val, RUNTIME_ONLY)], base)
    summed = editor.reduce_sum(products, [-1], base, output=None if bias is not None else out)
    _add_bias(editor, summed, out, base, bias)


def _ell(csr: CsrMatrix) -> tuple[np.ndarray, np.ndarray]:
    """Rows padded to the longest: ``(out, k)`` column indices (padding reads column 0) and values (0)."""
    lengths = np.diff(csr.indptr)
    k = max(int(lengths.max(initial=0)), 1)
    ell_idx = np.zeros((csr.out_features, k), dtype=np.int64)
    ell_val = np.zeros((csr.out_features, k), dtype=csr.values.dtype)
    rows = csr.rows
    slot = np.arange(csr.nonzeros) - csr.indptr[rows]
    ell_idx[rows, slot] = csr.indices
    ell_val[rows, slot] = csr.values
    return ell_idx, ell_val
