"""The ``sparse`` representation: one ``ai.neurorewrite.SparseLinear`` node (CSR) per expanded linear.

The operator is specified in ``docs/sparse-op.md``; this module builds its arrays with the narrowest
index types and writes the node.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from neurorewrite.passes.lower_graph import GraphRewrite
from neurorewrite.rewriter.linear import Linear

DOMAIN = "ai.neurorewrite"
OP = "SparseLinear"
VERSION = 1


def narrowest_int(max_value: int) -> type:
    """The narrowest signed integer type holding ``0..max_value``."""
    for dtype in (np.int8, np.int16, np.int32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def csr_arrays(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, indices, indptr)`` of ``w`` (out, in); explicit zeros are not stored.

    ``indices`` fits ``in - 1`` and ``indptr`` fits ``nnz``, each in the narrowest signed type.
    """
    rows, cols = np.nonzero(w)  # row-major order: rows ascending, columns ascending within a row
    return csr_from_entries(w[rows, cols], rows, cols, w.shape)


def csr_from_entries(
    values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays of entries already in row-major order, with :func:`csr_arrays`' index types."""
    out, inp = shape
    indptr = np.zeros(out + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=out), out=indptr[1:])
    return (
        np.ascontiguousarray(values),
        np.asarray(cols).astype(narrowest_int(max(inp - 1, 0))),
        indptr.astype(narrowest_int(int(indptr[-1]))),
    )


def lower_sparse(rw: GraphRewrite, lin: Linear, w: np.ndarray, b: np.ndarray | None) -> dict[str, object]:
    """Replace ``lin`` by one SparseLinear node; returns a row for the report."""
    values, indices, indptr = csr_arrays(w)
    inputs = [
        lin.data_input, rw.const(lin.weight + ".values", values), rw.const(lin.weight + ".indices", indices),
        rw.const(lin.weight + ".indptr", indptr),
    ]
    if b is not None:
        inputs.append(rw.const((lin.bias or lin.weight) + ".bias", b))
    node = helper.make_node(
        OP, inputs, [lin.output], name=rw.name(lin.name + "/sparse"), domain=DOMAIN,
        in_features=int(w.shape[1]), out_features=int(w.shape[0]), format="csr",
    )
    rw.replace_linear(lin, [node])
    rw.opsets[DOMAIN] = VERSION
    stored = values.nbytes + indices.nbytes + indptr.nbytes + (0 if b is None else b.nbytes)
    return {
        "layer": lin.name, "kind": f"csr {indices.dtype.name}/{indptr.dtype.name}", "shape": list(w.shape),
        "nonzeros": int(values.size), "bytes": int(stored),
    }
