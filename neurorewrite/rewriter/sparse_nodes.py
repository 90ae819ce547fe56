"""Reading ``ai.neurorewrite.SparseLinear`` nodes of a graph: their checked CSR weight and bias."""

from __future__ import annotations

import numpy as np
import onnx

from neurorewrite.errors import ModelLoadError
from neurorewrite.ops import FORMATS_SUPPORTED, OP, CsrMatrix, check_csr, is_sparse_linear
from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label


def sparse_format(node: onnx.NodeProto) -> str:
    fmt = get_attr(node, "format", b"csr")
    return fmt.decode() if isinstance(fmt, bytes) else str(fmt)


def read_sparse_linear(index: GraphIndex, i: int) -> tuple[CsrMatrix, np.ndarray | None]:
    """Node ``i``'s weight and bias; a ModelLoadError naming the node when they are not constant or not valid."""
    node = index.graph.node[i]
    label = node_label(node, i)
    if not is_sparse_linear(node) or sparse_format(node) not in FORMATS_SUPPORTED:
        raise ModelLoadError(
            f"node {label}: {node.domain}.{node.op_type} format {sparse_format(node)!r} is not supported "
            f"(only {OP}, {', '.join(FORMATS_SUPPORTED)})"
        )
    names = list(node.input[1:5]) + [""] * (5 - len(node.input))
    arrays = [index.constant_value(name) if name else None for name in names]
    if any(a is None for a in arrays[:3]):
        raise ModelLoadError(f"node {label}: values, indices and indptr must be constant initializers")
    n_in = int(get_attr(node, "in_features", -1))
    n_out = int(get_attr(node, "out_features", -1))
    csr = check_csr(arrays[0], arrays[1], arrays[2], n_in, n_out, arrays[3], where=f"node {label}")
    return csr, arrays[3]
