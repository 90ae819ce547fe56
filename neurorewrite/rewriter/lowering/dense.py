"""The ``dense`` format: the expanded weights as they are, pruned entries stored as zeros."""

from __future__ import annotations

import onnx

from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.editor import GraphEditor
from neurorewrite.rewriter.lowering.registry import register_lowering
from neurorewrite.rewriter.record import LoweredLayer


@register_lowering("dense", "zeros kept (default); runs everywhere")
def lower_dense(editor: GraphEditor, model: onnx.ModelProto, blocks: list[MLPBlock], alpha: int) -> list[LoweredLayer]:
    return []
