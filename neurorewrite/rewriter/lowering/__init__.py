"""Block formats: how the weights of FPE-expanded blocks are stored and computed in the graph.

- ``dense`` (:mod:`.dense`): unchanged, zeros stored; runs everywhere.
- ``grouped`` (:mod:`.grouped`, :mod:`.per_child`): blocks whose neurons share one input partition
  run W1' as ``alpha`` dense blocks; tied outgoing weights are summed over the children first.
- ``sparse`` (:mod:`.sparse`): one ``ai.neurorewrite.SparseLinear`` node (CSR) per linear.

:func:`lower_blocks` applies one format to the blocks a model's FPE record names and updates the
record; the ``lower`` pass (:mod:`neurorewrite.passes.lower`) and ``export_onnx`` call it.
"""

from __future__ import annotations

import onnx

from neurorewrite.rewriter.blocks import blocks_by_output
from neurorewrite.rewriter.editor import GraphEditor
from neurorewrite.rewriter.lowering import dense, grouped, sparse  # noqa: F401  (each registers its format)
from neurorewrite.rewriter.lowering.registry import LOWERINGS, Lowering, check_format, register_lowering
from neurorewrite.rewriter.record import FPERecord, LoweredLayer, write_record

__all__ = ["LOWERINGS", "Lowering", "check_format", "lower_blocks", "register_lowering"]


def lower_blocks(model: onnx.ModelProto, fmt: str, record: FPERecord) -> tuple[onnx.ModelProto, list[LoweredLayer]]:
    """A new model whose blocks named by ``record`` are written in ``fmt``, with the record updated."""
    lowering = LOWERINGS[check_format(fmt, record.config.split)]
    blocks = blocks_by_output(model, record.output_tensors)
    editor = GraphEditor.start(model)
    rows = lowering.run(editor, model, blocks, record.alpha)
    new = editor.apply(model)
    write_record(new, record.evolve(format=fmt, lowered=tuple(rows)))
    return new, rows
