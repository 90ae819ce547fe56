"""What expand_model reports beside the model (passes/expand_blocks.py): progress in block order then
"writing", the options it ran with, and per block the tensors and form later passes find it by."""

from __future__ import annotations

import onnx

from neurorewrite.fpe import FPEConfig
from neurorewrite.passes.expand_blocks import expand_model
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.record import read_record


def test_progress_options_and_block_rows(exports) -> None:
    model = onnx.load(str(exports["gelu_silu_chain"]))  # a chain: two blocks sharing the middle linear
    blocks = find_blocks(model).blocks
    assert len(blocks) == 2
    calls: list[tuple[int, int, str]] = []
    cfg = FPEConfig(alpha=3, split="shared", seed=5, bias="copy", prune="layer")
    new, report = expand_model(model, cfg, progress=lambda i, n, what: calls.append((i, n, what)))
    assert calls == [(0, 2, blocks[0].name), (1, 2, blocks[1].name), (2, 2, "writing")]
    assert (report.alpha, report.split, report.seed, report.bias, report.prune) == (3, "shared", 5, "copy", "layer")
    assert report.skipped == []
    for row, block in zip(report.blocks, blocks, strict=True):
        assert (row.name, row.first, row.second) == (block.name, block.first.name, block.second.name)
        assert (row.hidden_tensor, row.output_tensor) == (block.hidden, block.second.output)
        assert (row.up, row.form, row.notes) == (None, block.form, block.notes)
        assert row.width_after == 3 * row.width_before and row.nnz_after == row.nnz_before
    assert read_record(new).blocks == tuple(report.blocks)  # the record the later passes read
