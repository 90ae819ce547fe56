"""Running ``ai.neurorewrite.SparseLinear`` models in plain onnxruntime.

The PyPI onnxruntime wheel ships no C API headers, so a native custom-op library cannot be built
here; instead every SparseLinear node is rewritten to standard ONNX ops when the session is created
(the file on disk keeps the compact CSR form). Two conversions, measured in ``benchmarks/deploy.py``:

- ``densify`` (default): rebuild W' densely at load and run one MatMul (+ Add). Fastest in plain
  onnxruntime (it is the ``dense`` format's speed), at the dense memory cost while running.
- ``gather``: ELL layout (rows padded to the longest row): ``Gather`` the input columns, ``Mul`` by the
  values, ``ReduceSum`` per row. Memory in proportion to the nonzeros, but slower on CPU because every
  product reads a gathered copy of its input.

:func:`sparse_linear_reference` is the numpy definition of the operator (``docs/sparse-op.md``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from neurorewrite.errors import DataError, InvalidOptionError, ModelLoadError
from neurorewrite.passes.lower_graph import default_opset
from neurorewrite.passes.lower_sparse import DOMAIN, OP
from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label

__all__ = ["DOMAIN", "METHODS", "has_sparse_ops", "sparse_linear_reference", "to_standard_ops"]

METHODS = ("densify", "gather")


def sparse_linear_reference(
    x: np.ndarray, values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, bias: np.ndarray | None = None,
    in_features: int | None = None,
) -> np.ndarray:
    """``Y[..., o] = sum_k values[k] * X[..., indices[k]] + bias[o]`` over row ``o`` of the CSR arrays."""
    in_features = in_features if in_features is not None else int(indices.max(initial=-1)) + 1
    if x.shape[-1] != in_features:
        raise DataError(f"SparseLinear: the input has {x.shape[-1]} features, the layer expects {in_features}")
    w = _densify(values, indices.astype(np.int64), indptr.astype(np.int64), in_features, indptr.size - 1)
    y = x @ w.T
    return y if bias is None else y + bias


def has_sparse_ops(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN for n in model.graph.node)


def _csr(index: GraphIndex, node: onnx.NodeProto, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """Read and validate one node's arrays; raises ModelLoadError naming the node."""
    label = node_label(node, i)
    fmt = get_attr(node, "format", b"csr")
    if node.op_type != OP or fmt not in (b"csr", "csr"):
        raise ModelLoadError(f"node {label}: {node.domain}.{node.op_type} format {fmt!r} is not supported (only {OP}, csr)")
    arrays = [index.constant_value(name) if name else None for name in list(node.input[1:5]) + [""] * (5 - len(node.input))]
    if any(a is None for a in arrays[:3]):
        raise ModelLoadError(f"node {label}: values, indices and indptr must be constant initializers")
    values, indices, indptr, bias = arrays[0], arrays[1].astype(np.int64), arrays[2].astype(np.int64), arrays[3]
    n_in, n_out = int(get_attr(node, "in_features", -1)), int(get_attr(node, "out_features", -1))
    ok = (
        indptr.shape == (n_out + 1,) and indptr[0] == 0 and indptr[-1] == values.size == indices.size
        and (np.diff(indptr) >= 0).all() and (indices.size == 0 or (indices.min() >= 0 and indices.max() < n_in))
        and (bias is None or bias.shape == (n_out,))
    )
    if not ok:
        raise ModelLoadError(f"node {label}: inconsistent CSR arrays for a {n_out}x{n_in} SparseLinear (see docs/sparse-op.md)")
    return values, indices, indptr, bias, n_in, n_out


def _densify(values, indices, indptr, n_in, n_out) -> np.ndarray:  # type: ignore[no-untyped-def]
    w = np.zeros((n_out, n_in), dtype=values.dtype)
    w[np.repeat(np.arange(n_out), np.diff(indptr)), indices] = values
    return w


def _ell(values, indices, indptr, n_out) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    lengths = np.diff(indptr)
    k = max(int(lengths.max(initial=0)), 1)
    ell_idx = np.zeros((n_out, k), dtype=np.int64)
    ell_val = np.zeros((n_out, k), dtype=values.dtype)
    rows = np.repeat(np.arange(n_out), lengths)
    slot = np.arange(values.size) - indptr[rows]
    ell_idx[rows, slot] = indices
    ell_val[rows, slot] = values
    return ell_idx, ell_val


def to_standard_ops(model: onnx.ModelProto, method: str = "densify") -> onnx.ModelProto:
    """A copy of ``model`` with every SparseLinear node rewritten to standard ONNX ops by ``method``."""
    if method not in METHODS:
        raise InvalidOptionError(f"sparse method must be one of {', '.join(METHODS)}, got {method!r}")
    index = GraphIndex.build(model.graph)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    del new.graph.node[:]
    used: set[str] = set()
    inits: list[onnx.TensorProto] = []
    for i, node in enumerate(model.graph.node):
        if node.domain != DOMAIN:
            new.graph.node.append(node)
            continue
        values, indices, indptr, bias, n_in, n_out = _csr(index, node, i)
        used |= {name for name in node.input[1:] if name}
        base = node_label(node, i)
        nodes, extra = (
            _densify_nodes(node, base, _densify(values, indices, indptr, n_in, n_out), bias)
            if method == "densify" else _gather_nodes(node, base, *_ell(values, indices, indptr, n_out), bias, default_opset(model))
        )
        new.graph.node.extend(nodes)
        inits.extend(extra)
    still_used = {name for n in new.graph.node for name in n.input}
    kept = [t for t in new.graph.initializer if t.name not in used or t.name in still_used]
    del new.graph.initializer[:]
    new.graph.initializer.extend(kept + inits)
    kept_opsets = [o for o in new.opset_import if o.domain != DOMAIN]
    del new.opset_import[:]
    new.opset_import.extend(kept_opsets)
    return new


def _densify_nodes(node, base, w, bias):  # type: ignore[no-untyped-def]
    weight = numpy_helper.from_array(np.ascontiguousarray(w.T), base + ".dense_w")
    out = node.output[0]
    inits = [weight]
    mm_out = out if bias is None else base + ".mm"
    nodes = [helper.make_node("MatMul", [node.input[0], weight.name], [mm_out], name=base + "/MatMul")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, base + ".dense_b"))
        nodes.append(helper.make_node("Add", [mm_out, base + ".dense_b"], [out], name=base + "/Add"))
    return nodes, inits


def _gather_nodes(node, base, ell_idx, ell_val, bias, opset):  # type: ignore[no-untyped-def]
    n_out, k = ell_idx.shape
    x, out = node.input[0], node.output[0]
    inits = [
        numpy_helper.from_array(ell_idx.ravel(), base + ".ell_idx"),
        numpy_helper.from_array(ell_val, base + ".ell_val"),
        numpy_helper.from_array(np.array([0], np.int64), base + ".zero"),
        numpy_helper.from_array(np.array([-1], np.int64), base + ".last"),
        numpy_helper.from_array(np.array([n_out, k], np.int64), base + ".ell_shape"),
    ]
    t = base + "/"
    nodes = [
        helper.make_node("Gather", [x, base + ".ell_idx"], [t + "g"], axis=-1, name=t + "Gather"),
        helper.make_node("Shape", [x], [t + "s"], name=t + "Shape"),
        helper.make_node("Slice", [t + "s", base + ".zero", base + ".last"], [t + "lead"], name=t + "Slice"),
        helper.make_node("Concat", [t + "lead", base + ".ell_shape"], [t + "shape"], axis=0, name=t + "Concat"),
        helper.make_node("Reshape", [t + "g", t + "shape"], [t + "r"], name=t + "Reshape"),
        helper.make_node("Mul", [t + "r", base + ".ell_val"], [t + "p"], name=t + "Mul"),
    ]
    summed = out if bias is None else t + "sum"
    if opset >= 13:
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), base + ".axis"))
        nodes.append(helper.make_node("ReduceSum", [t + "p", base + ".axis"], [summed], keepdims=0, name=t + "ReduceSum"))
    else:
        nodes.append(helper.make_node("ReduceSum", [t + "p"], [summed], axes=[-1], keepdims=0, name=t + "ReduceSum"))
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, base + ".ell_b"))
        nodes.append(helper.make_node("Add", [summed, base + ".ell_b"], [out], name=t + "Add"))
    return nodes, inits
