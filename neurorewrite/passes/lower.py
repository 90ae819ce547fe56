"""The lowering pass: chooses how the expanded blocks' weights are stored and computed.

Replaces the linear layers of every FPE-expanded block with one registered format
(:mod:`neurorewrite.rewriter.lowering`: ``dense``, ``grouped``, ``sparse``).

Before: the model carries the FPE record of ``expand`` and its blocks. After: every format computes
the same outputs as ``dense`` (float rounding aside; tests compare onnxruntime outputs); the record's
``format`` names the representation and ``lowered`` lists what each layer became. The input model is
not modified. Place in the pipeline: expand -> (tie) -> (calibrate) -> **lower** -> verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.lowering import LOWERINGS, check_format, lower_blocks
from neurorewrite.rewriter.record import LoweredLayer, read_record

FORMATS = tuple(LOWERINGS)

__all__ = ["FORMATS", "LowerReport", "check_format", "lower_model"]


@dataclass
class LowerReport:
    """What the pass did: the format and one row per rewritten linear layer."""

    format: str
    layers: list[LoweredLayer] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.layers)


def lower_model(model: onnx.ModelProto, fmt: str) -> tuple[onnx.ModelProto, LowerReport]:
    """Rewrite the expanded blocks of ``model`` into ``fmt``; see the module docstring."""
    record = read_record(model)
    if record is None:
        raise InvalidOptionError(f"--format {fmt}: the model carries no FPE record; expand it with neurorewrite first")
    fmt = check_format(fmt, record.config.split)
    new, rows = lower_blocks(model, fmt, record)
    return new, LowerReport(fmt, rows)
