"""Rewriting the shape constants that hold a block's hidden width, when the block is widened.

Block detection lists them (:class:`~neurorewrite.rewriter.gated.WidthEdit`): a Reshape target whose
last entry is the constant ``H`` (GPT-2's Conv1D: ``[B, S, 128]``, ``[-1, 128]``), a Split's sizes or
a Slice's bounds that cut a fused gate/up output at ``H``. :func:`widen_shapes` queues, on the editor,
the change that makes each hold ``alpha * H``; a constant other nodes read too is not changed for
them (the edited node reads a new one).
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
    if alpha == 1:
        return
    width = block.width
    for edit in block.widen:
        node = editor.index.graph.node[edit.node]
        base = node_label(node, edit.node)
        if edit.kind == "reshape-target":
            zero = editor.const(base + ".lead_start", np.array([0], np.int64))
            last = editor.const(base + ".lead_end", np.array([-1], np.int64))
            (lead,) = editor.node("Slice", [node.input[1], zero, last], base)
            tail = editor.const(base + ".width", np.array([alpha * width], np.int64))
            (target,) = editor.node("Concat", [lead, tail], base, axis=0)
            editor.emit.setdefault(edit.node, []).extend(editor.take())
            editor.renames[(edit.node, 1)] = target
        elif edit.kind == "scale":
            value = editor.index.constant_value(node.input[edit.slot])
            if value is None:
                raise ValueError(f"input {edit.slot} of {base} is not a constant")
            scaled = np.where(value >= BIG, value, value * alpha).astype(value.dtype)
            editor.rename_input(edit.node, edit.slot, editor.const(node.input[edit.slot] + ".fpe", scaled))
        elif edit.kind == "split-attr":
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            sizes = [int(v) * alpha for v in get_attr(node, "split", [])]
            for attr in copy.attribute:
                if attr.name == "split":
                    del attr.ints[:]
                    attr.ints.extend(sizes)
            editor.replace_node(edit.node, [*editor.emit.get(edit.node, []), copy])
        else:
            raise ValueError(f"unknown width edit {edit.kind!r}")
