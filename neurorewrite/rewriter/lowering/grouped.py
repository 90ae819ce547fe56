"""The ``grouped`` format: W1' of a shared-partition block as one batched MatMul.

With ``--split blocks`` (or ``shared``, ``feature``) every hidden neuron uses the same partition of the inputs,
so child ``k`` of every parent reads the same columns ``S_k``: W1' is ``alpha`` dense ``(H, |S_k|)``
blocks. The first linear becomes ``Gather(S_0..S_alpha-1) -> Reshape -> Transpose -> MatMul(alpha
blocks) -> Add -> Transpose -> Reshape``, plain ONNX ops with the original FLOPs and bytes.

Its output holds the hidden units children-major (position ``k * H + i`` is child ``k`` of parent
``i``; the FPE layout is ``i * alpha + k``). The activation between is elementwise, so only the
consumer changes: its weight columns are permuted, or, in a chain, its Gather indices are.

A second linear whose children share their outgoing column (the ``--structured`` variant, see
``passes/tie_outputs.py``) becomes ``Reshape -> ReduceSum over children -> MatMul(W2)``: W2 is stored
once and runs at the original size. Any other second linear becomes a MatMul with permuted columns.
A lone block with tied outgoing weights runs one 2-D MatMul per child instead (:mod:`.per_child`).
"""

from __future__ import annotations

import numpy as np
import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.blocks import MLPBlock, chain_ends
from neurorewrite.rewriter.editor import GraphEditor, constant_base
from neurorewrite.rewriter.linear import Linear, read_weights
from neurorewrite.rewriter.lowering.per_child import can_lower_children, child_columns, is_tied, lower_children
from neurorewrite.rewriter.lowering.registry import register_lowering
from neurorewrite.rewriter.record import LoweredLayer


@register_lowering("grouped", "batched MatMul per child block; needs --split blocks/shared/feature", one_partition=True)
def lower_grouped_blocks(editor: GraphEditor, model: onnx.ModelProto, blocks: list[MLPBlock], alpha: int) -> list[LoweredLayer]:
    """Lone tied blocks one MatMul per child; every other block's first linear batched, its last permuted or summed.

    A gated block's gate and up are each batched the same way (their outputs get the same children-major
    order, so the elementwise product lines up); a fused gate/up linear is batched half by half and
    the halves concatenated, so the cut after it still finds gate and up halves.
    """
    for block in blocks:
        conv = next((lin for lin in block.linears if lin.feature_axis != -1), None)
        if conv is not None:
            raise InvalidOptionError(
                f"--format grouped: block {block.name} is a 1x1 Conv block (channels on axis 1), which the grouped "
                "format does not write; use --format dense or sparse (or leave it out with --layers)"
            )
    rows: list[LoweredLayer] = []
    perms: dict[str, np.ndarray] = {}  # tensor -> new_to_old for hidden tensors now stored children-major
    ends = chain_ends(blocks)
    seconds = {b.second.node for b in blocks}
    per_child = set()
    for block in ends:
        if block.first.node in seconds:
            continue
        w1, b1 = read_weights(editor.index, block.first)
        w2, b2 = read_weights(editor.index, block.second)
        if is_tied(w2, alpha) and can_lower_children(editor, block, w1, alpha):
            up = None if block.up is None else read_weights(editor.index, block.up)
            rows += lower_children(editor, model, block, w1, b1, w2, b2, alpha, up)
            per_child.add(block.first.node)
    for block in blocks:
        if block.first.node in per_child:
            continue
        w, b = read_weights(editor.index, block.first)
        order = perms.get(block.first.data_input)
        if block.split is not None:
            perms[block.hidden] = _lower_fused_first(editor, block, w, b, alpha, order)
        else:
            perms[block.hidden] = lower_grouped_first(editor, block.first, w, b, alpha, order)
        rows.append(LoweredLayer(block.first.name, f"grouped x{alpha}", tuple(w.shape)))
        if block.up is not None:
            wu, bu = read_weights(editor.index, block.up)
            lower_grouped_first(editor, block.up, wu, bu, alpha, order)
            rows.append(LoweredLayer(block.up.name, f"grouped x{alpha}", tuple(wu.shape)))
    for block in ends:  # a chain middle was lowered above as the next block's first linear
        if block.first.node in per_child:
            continue
        w, b = read_weights(editor.index, block.second)
        kind = lower_second(editor, block.second, w, b, alpha, perms[block.hidden])
        rows.append(LoweredLayer(block.second.name, kind, tuple(w.shape)))
    return rows


def children_major(h: int, alpha: int) -> np.ndarray:
    """``new_to_old`` of the grouped output: position ``k*H + i`` holds FPE hidden unit ``i*alpha + k``."""
    return (np.arange(h)[None, :] * alpha + np.arange(alpha)[:, None]).ravel()


def _lower_fused_first(
    editor: GraphEditor, block: MLPBlock, w: np.ndarray, b: np.ndarray | None, alpha: int, new_to_old: np.ndarray | None,
) -> np.ndarray:
    """A fused gate/up linear: each half batched on its own, then concatenated in the original order."""
    lin = block.first
    half = w.shape[0] // 2
    outputs = []
    for k in range(2):
        rows = slice(k * half, (k + 1) * half)
        out = editor.name(f"{lin.output}.half{k}")
        perm = lower_grouped_first(editor, lin, w[rows], None if b is None else b[rows], alpha, new_to_old,
                                   output=out, replace=False)
        outputs.append(out)
    editor.node("Concat", outputs, lin.name + "/grouped", outputs=[lin.output], axis=-1)
    editor.replace_linear(lin, editor.take())
    return perm


def lower_grouped_first(
    editor: GraphEditor, lin: Linear, w: np.ndarray, b: np.ndarray | None, alpha: int, new_to_old: np.ndarray | None,
    output: str | None = None, replace: bool = True,
) -> np.ndarray:
    """Replace the first linear of a block by the batched form; returns its output's ``new_to_old``.

    With ``replace`` False the nodes (writing ``output``) stay queued on the editor for the caller.
    A bias an activation node adds (BiasGelu, FastGelu) is not added here: that node reads it in the
    new, children-major order instead.
    """
    h = w.shape[0] // alpha
    cols = child_columns(w, alpha, lin.name)
    m = max(c.size for c in cols)
    old_to_new = np.arange(w.shape[1]) if new_to_old is None else np.argsort(new_to_old)
    gather = np.zeros((alpha, m), dtype=np.int32 if w.shape[1] < 2**31 else np.int64)  # padding reads column 0 against a zero weight
    blocks = np.zeros((alpha, m, h), dtype=w.dtype)
    for k, c in enumerate(cols):
        gather[k, : c.size] = old_to_new[c]
        blocks[k, : c.size, :] = w[k::alpha, c].T
    base = lin.name + "/grouped"
    stored = constant_base(editor, lin) + "/grouped"
    x = editor.node("Gather", [lin.data_input, editor.const(stored + ".columns", gather.ravel())], base, axis=-1)[0]
    x = editor.node("Reshape", [x, editor.const(stored + ".split", np.array([-1, alpha, m], np.int64))], base)[0]
    x = editor.node("Transpose", [x], base, perm=[1, 0, 2])[0]
    y = editor.node("MatMul", [x, editor.const(stored + ".blocks", blocks)], base)[0]
    if b is not None and lin.bias_node is None:
        y = editor.node("Add", [y, editor.const(stored + ".bias", b.reshape(h, alpha).T[:, None, :].copy())], base)[0]
    y = editor.node("Transpose", [y], base, perm=[1, 0, 2])[0]
    shape = editor.leading_shape(lin.data_input, base, [alpha * h])
    editor.node("Reshape", [y, shape], base, outputs=[output or lin.output])
    order = children_major(h, alpha)
    if b is not None and lin.bias_node is not None:
        holder = editor.index.graph.node[lin.bias_node]
        slot = list(holder.input).index(lin.bias)
        editor.rename_input(lin.bias_node, slot, editor.const(stored + ".bias", b[order].copy()))
    if replace:
        editor.replace_linear(lin, editor.take())
    return order


def lower_second(
    editor: GraphEditor, lin: Linear, w: np.ndarray, b: np.ndarray | None, alpha: int, new_to_old: np.ndarray,
) -> str:
    """Replace a block's last linear: ReduceSum over children + W2 when tied, else a MatMul with permuted columns."""
    base = lin.name + "/grouped"
    tied = is_tied(w, alpha) and np.array_equal(new_to_old, children_major(w.shape[1] // alpha, alpha))
    x = lin.data_input
    if tied:
        h = w.shape[1] // alpha
        shape = editor.leading_shape(x, base, [alpha, h])
        x = editor.node("Reshape", [x, shape], base)[0]
        x = editor.reduce_sum(x, [-2], base)
        weight = w[:, ::alpha].T
    else:
        weight = w[:, new_to_old].T
    if lin.bias_node is not None:
        b = None  # the activation node after the layer adds it, and keeps reading it
    matmul_out = None if b is not None else [lin.output]
    stored = constant_base(editor, lin)
    y = editor.node("MatMul", [x, editor.const(stored + (".tied" if tied else ".permuted"), weight.copy())], base,
                    outputs=matmul_out)[0]
    if b is not None:
        editor.node("Add", [y, editor.const(stored + "/grouped.bias", b)], base, outputs=[lin.output])
    editor.replace_linear(lin, editor.take())
    return "tied" if tied else "permuted"
