"""Rewriting the shape constants that hold a block's hidden width, when the block is widened.

Block detection lists them (:class:`~neurorewrite.rewriter.gated.WidthEdit`): a Reshape target whose
last entry is the constant ``H`` (GPT-2's Conv1D: ``[B, S, 128]``, ``[-1, 128]``), a Split's sizes or
a Slice's bounds that cut a fused gate/up output at ``H``. :func:`widen_shapes` queues, on the editor,
the change that makes each hold ``alpha * H``; a constant other nodes read too is not changed for
them (the edited node reads a new one). :func:`resize_shapes` is the same change to any new width
(``passes/fold_constant.py`` narrows a block to the children it keeps).
"""

from __future__ import annotations

import numpy as np
import onnx

from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.editor import GraphEditor
from neurorewrite.rewriter.gated import BIG
from neurorewrite.rewriter.graph import get_attr, node_label


def widen_shapes(editor: GraphEditor, block: MLPBlock, alpha: int) -> None:
    """Queue the rewrite of every width constant of ``block`` for ``alpha`` children per neuron."""
    if alpha != 1:
        resize_shapes(editor, block, alpha * block.width, "fpe")


def resize_shapes(editor: GraphEditor, block: MLPBlock, width: int, tag: str) -> None:
    """Queue the rewrite of every width constant of ``block`` so that its hidden width becomes ``width``;
    new constants are named after the old ones plus ``.TAG``."""
    old = block.width
    for edit in block.widen:
        node = editor.index.graph.node[edit.node]
        base = node_label(node, edit.node)
        if edit.kind == "reshape-target":
            zero = editor.const(f"{base}.{tag}.lead_start", np.array([0], np.int64))
            last = editor.const(f"{base}.{tag}.lead_end", np.array([-1], np.int64))
            (lead,) = editor.node("Slice", [node.input[1], zero, last], base)
            tail = editor.const(f"{base}.{tag}.width", np.array([width], np.int64))
            (target,) = editor.node("Concat", [lead, tail], base, axis=0)
            editor.emit.setdefault(edit.node, []).extend(editor.take())
            editor.renames[(edit.node, 1)] = target
        elif edit.kind == "scale":
            value = editor.index.constant_value(node.input[edit.slot])
            if value is None:
                raise ValueError(f"input {edit.slot} of {base} is not a constant")
            scaled = np.where(value >= BIG, value, _rescaled(value, old, width, base)).astype(value.dtype)
            editor.rename_input(edit.node, edit.slot, editor.const(f"{node.input[edit.slot]}.{tag}", scaled))
        elif edit.kind == "split-attr":
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            sizes = [int(v) for v in _rescaled(np.array(get_attr(node, "split", []), np.int64), old, width, base)]
            for attr in copy.attribute:
                if attr.name == "split":
                    del attr.ints[:]
                    attr.ints.extend(sizes)
            editor.replace_node(edit.node, [*editor.emit.get(edit.node, []), copy])
        else:
            raise ValueError(f"unknown width edit {edit.kind!r}")


def _rescaled(value: np.ndarray, old: int, new: int, label: str) -> np.ndarray:
    """Multiples of the old width as the same multiples of the new one (block detection admits no others)."""
    multiples, rest = np.divmod(value, old)
    if np.any((rest != 0) & (value < BIG)):
        raise ValueError(f"a width constant of {label} holds {value.tolist()}, not multiples of the width {old}")
    return multiples * new
