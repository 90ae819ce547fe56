"""The ``grouped`` format of a lone tied block (``--structured``): one 2-D MatMul per child.

A block whose children read one input partition (``S_k`` for child ``k`` of every parent) and share
their parent's outgoing column computes ``y = W2 @ sum_k act(W1_k x[S_k] + b1_k) + b2``. Written as

    x -> Split (contiguous S_k, the ``blocks`` split) or Gather (any other partition)
      -> per child: MatMul(x_k, W1_k) + b1_k -> a copy of the activation
      -> Sum over children -> MatMul(W2) + b2

every weight is a 2-D constant, which onnxruntime pre-packs (a batched MatMul with a 3-D constant
weight is re-packed on every call; measured 1.4x the dense block at batch 32 against 1.1x for this
form, ``benchmarks/deploy.py``), MatMul+Add fuse into Gemm, and no Transpose is needed: the FLOPs and
weight bytes are the original block's, plus the activation on ``alpha`` times the hidden width.
The input's rank is kept (a transformer FFN stays ``(batch, sequence, features)``).
"""

from __future__ import annotations

import numpy as np
import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.editor import GraphEditor, constant_base
from neurorewrite.rewriter.linear import Linear
from neurorewrite.rewriter.record import LoweredLayer


def child_columns(w: np.ndarray, alpha: int, layer: str) -> list[np.ndarray]:
    """The input columns each child reads, the same for every parent; raises if W1' is not shared.

    Columns that every child lost to pruning go to the child with the fewest columns (their weights
    are zero, so any child computes the same).
    """
    h = w.shape[0] // alpha
    nz = (w.reshape(h, alpha, -1) != 0).any(axis=0)  # (alpha, D): child k reads column j somewhere
    readers = nz.sum(axis=0)
    if (readers > 1).any():
        j = int(np.argmax(readers > 1))
        raise InvalidOptionError(
            f"--format grouped: layer {layer} does not use one input partition for all neurons (input {j} "
            "goes to several children); expand with --split blocks, shared or feature, or use --format sparse"
        )
    owner = np.where(readers == 1, nz.argmax(axis=0), -1)
    load = np.bincount(owner[owner >= 0], minlength=alpha)
    for j in np.flatnonzero(owner < 0):
        owner[j] = int(np.argmin(load))
        load[owner[j]] += 1
    return [np.flatnonzero(owner == k) for k in range(alpha)]



def is_tied(w: np.ndarray, alpha: int) -> bool:
    """Whether the children of every parent share their outgoing column (W2' columns ``i*alpha+k``)."""
    w3 = w.reshape(w.shape[0], -1, alpha)
    return bool(np.array_equal(w3, np.broadcast_to(w3[:, :, :1], w3.shape)))


def can_lower_children(editor: GraphEditor, block: MLPBlock, w1: np.ndarray, alpha: int) -> bool:
    """Every child reads at least one input, the region is elementwise only (reshapes to the whole
    width, a fused gate/up cut or a bias inside the activation would not fit a child), and nothing
    outside the block reads its hidden tensors (the activation is copied per child, so the original
    hidden tensors disappear)."""
    if w1.shape[1] < alpha or block.split is not None or block.shape_nodes or block.first.bias_node is not None:
        return False
    inside = set(block.activation_nodes) | {block.second.node}
    starts = [block.first.output] + ([] if block.up is None else [block.up.output])
    return all(set(editor.index.consumers.get(t, ())) <= inside and t not in editor.index.graph_outputs
               for t in (*starts, *block.region_tensors))


def _child_linear(editor: GraphEditor, x_k: str, lin: Linear, w: np.ndarray, b: np.ndarray | None, cols: np.ndarray,
                  k: int, alpha: int, base: str) -> str:
    stored = constant_base(editor, lin)
    (h,) = editor.node("MatMul", [x_k, editor.const(f"{stored}.child{k}", w[k::alpha, cols].T)], base)
    if b is not None:
        (h,) = editor.node("Add", [h, editor.const(f"{stored}/children{k}.bias", b[k::alpha])], base)
    return h


def lower_children(
    editor: GraphEditor, model: onnx.ModelProto, block: MLPBlock, w1: np.ndarray, b1: np.ndarray | None,
    w2: np.ndarray, b2: np.ndarray | None, alpha: int,
    up: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> list[LoweredLayer]:
    """Replace ``block`` (tied: ``W2'`` columns ``i*alpha+k`` equal) as in the module docstring; report rows.

    A gated block's child ``k`` computes its gate and its up projection from the same input share and
    runs its own copy of the activation and the product."""
    base = block.first.name + "/children"
    cols = child_columns(w1, alpha, block.first.name)
    parts, how = _child_inputs(editor, block.first.data_input, cols, base, constant_base(editor, block.first) + "/children")
    outputs = []
    for k, (x_k, c) in enumerate(zip(parts, cols)):
        renamed = {block.first.output: _child_linear(editor, x_k, block.first, w1, b1, c, k, alpha, f"{base}{k}")}
        if up is not None and block.up is not None:
            renamed[block.up.output] = _child_linear(editor, x_k, block.up, up[0], up[1], c, k, alpha,
                                                     f"{block.up.name}/children{k}")
        outputs.append(_copy_activation(editor, model, block, renamed, k))
    (summed,) = editor.node("Sum", outputs, base)
    second = block.second
    if second.bias_node is not None:
        b2 = None  # the activation node after the block adds it, and keeps reading it
    stored = constant_base(editor, second)
    (y,) = editor.node("MatMul", [summed, editor.const(stored + ".tied", w2[:, ::alpha].T)], second.name + "/tied",
                       outputs=None if b2 is not None else [second.output])
    if b2 is not None:
        editor.node("Add", [y, editor.const(stored + "/tied.bias", b2)], second.name + "/tied", outputs=[second.output])
    nodes = editor.take()
    # emitted where the second linear was: every input of the activation exists by then
    editor.replace_linear(block.first, [])
    if block.up is not None:
        editor.replace_linear(block.up, [])
    editor.replace_linear(second, nodes)
    editor.remove |= set(block.activation_nodes)
    editor.stale |= {block.first.output, *block.region_tensors}
    rows = [LoweredLayer(block.first.name, f"grouped x{alpha} ({how}, one MatMul per child)", tuple(w1.shape))]
    if up is not None and block.up is not None:
        rows.append(LoweredLayer(block.up.name, f"grouped x{alpha} ({how}, one MatMul per child)", tuple(up[0].shape)))
    return rows + [LoweredLayer(second.name, "tied", tuple(w2.shape))]


def _child_inputs(editor: GraphEditor, x: str, cols: list[np.ndarray], base: str, stored: str) -> tuple[list[str], str]:
    """``x[..., S_k]`` per child: one Split when the ``S_k`` are consecutive slices, else a Gather each."""
    starts = np.cumsum([0] + [c.size for c in cols[:-1]])
    if all(np.array_equal(c, np.arange(s, s + c.size)) for s, c in zip(starts, cols)):
        return editor.split(x, [c.size for c in cols], base, axis=-1), "split"
    index_type = np.int32 if cols[0].size == 0 or max(int(c.max()) for c in cols if c.size) < 2**31 else np.int64
    gathers = [editor.node("Gather", [x, editor.const(f"{stored}{k}.columns", c.astype(index_type))], f"{base}{k}", axis=-1)[0]
               for k, c in enumerate(cols)]
    return gathers, "gather"


def _copy_activation(editor: GraphEditor, model: onnx.ModelProto, block: MLPBlock, renamed: dict[str, str], k: int) -> str:
    """The block's activation nodes again, reading the child's tensors ``renamed`` (the first linear's
    output, and the up projection's); returns the copy of the hidden tensor."""
    pre = renamed[block.first.output]
    renamed = dict(renamed)
    for i in sorted(block.activation_nodes):
        node = model.graph.node[i]
        for out in node.output:
            renamed[out] = editor.name(f"{out}.child{k}")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = editor.name(f"{node.name or node.op_type}.child{k}")
        copy.input[:] = [renamed.get(t, t) for t in node.input]
        copy.output[:] = [renamed[t] for t in node.output]
        editor.pending.append(copy)
    return renamed.get(block.hidden, pre)  # an identity activation: the hidden is the pre-activation
