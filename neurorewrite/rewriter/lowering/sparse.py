"""The ``sparse`` format: one ``ai.neurorewrite.SparseLinear`` node (CSR) per expanded linear.

The operator (schema, CSR builders) is :mod:`neurorewrite.ops.sparse_linear`; this module writes the
node in place of each linear layer of the blocks.
"""

from __future__ import annotations

import numpy as np
import onnx

from neurorewrite.ops import DOMAIN, VERSION, csr_arrays, sparse_linear_node
from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.editor import GraphEditor, constant_base
from neurorewrite.rewriter.linear import Linear, read_weights
from neurorewrite.rewriter.lowering.registry import register_lowering
from neurorewrite.rewriter.record import LoweredLayer


@register_lowering("sparse", "CSR SparseLinear op (docs/sparse-op.md)")
def lower_sparse_blocks(editor: GraphEditor, model: onnx.ModelProto, blocks: list[MLPBlock], alpha: int) -> list[LoweredLayer]:
    rows, done = [], set()  # a chain middle is the second linear of one block and the first of the next
    for block in blocks:
        for lin in block.linears:  # gate, up (when separate) and down of a gated block
            if lin.node not in done:
                done.add(lin.node)
                rows.append(lower_sparse(editor, lin, *read_weights(editor.index, lin)))
    return rows


def lower_sparse(editor: GraphEditor, lin: Linear, w: np.ndarray, b: np.ndarray | None) -> LoweredLayer:
    """Replace ``lin`` by one SparseLinear node; returns its row for the record.

    A bias that an activation node adds (BiasGelu, FastGelu) stays with that node. A 1x1 Conv (channels
    on axis 1) becomes ``Transpose -> SparseLinear -> Transpose``: the operator mixes the last axis.
    """
    values, indices, indptr = csr_arrays(w)
    x, out = lin.data_input, lin.output
    nodes = []
    if lin.feature_axis != -1:
        rank = 2 + len(lin.kernel)
        to_last = [0, *range(2, rank), 1]
        (x,) = editor.node("Transpose", [x], lin.name + "/channels_last", perm=to_last)
        out = editor.name(lin.output + ".channels_last")
    # base names from the tensors behind Identity copies: layers reading one weight store one CSR
    weight = constant_base(editor, lin)
    inputs = [
        x, editor.const(weight + ".values", values), editor.const(weight + ".indices", indices),
        editor.const(weight + ".indptr", indptr),
    ]
    if b is not None and lin.bias_node is None:
        inputs.append(editor.const(weight + ".bias", b))
    nodes = editor.take()
    nodes.append(sparse_linear_node(inputs, out, editor.name(lin.name + "/sparse"), w.shape[1], w.shape[0]))
    if lin.feature_axis != -1:
        back = [0, rank - 1, *range(1, rank - 1)]
        editor.node("Transpose", [out], lin.name + "/channels_first", outputs=[lin.output], perm=back)
        nodes += editor.take()
    editor.replace_linear(lin, nodes)
    editor.opsets[DOMAIN] = VERSION
    stored = values.nbytes + indices.nbytes + indptr.nbytes + (0 if b is None else b.nbytes)
    return LoweredLayer(lin.name, f"csr {indices.dtype.name}/{indptr.dtype.name}", tuple(w.shape), int(values.size), int(stored))
