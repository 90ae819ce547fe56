"""The formats an expanded block can be written in, registered by name.

A lowering is a function ``(editor, model, blocks, alpha) -> rows`` that queues, on a
:class:`~neurorewrite.rewriter.editor.GraphEditor`, the nodes that compute every given FPE block in its
format, and returns one :class:`~neurorewrite.rewriter.record.LoweredLayer` per rewritten linear. It
registers itself with :func:`register_lowering`; ``--format``'s choices and help come from
:data:`LOWERINGS`, so a new format is one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import ONE_PARTITION_SPLITS
from neurorewrite.rewriter.blocks import MLPBlock
from neurorewrite.rewriter.editor import GraphEditor
from neurorewrite.rewriter.record import LoweredLayer

LowerFn = Callable[[GraphEditor, onnx.ModelProto, list[MLPBlock], int], list[LoweredLayer]]


@dataclass(frozen=True)
class Lowering:
    name: str
    summary: str  # one line for ``--help``
    run: LowerFn
    one_partition: bool = False  # needs every neuron to use the same input partition


LOWERINGS: dict[str, Lowering] = {}


def register_lowering(name: str, summary: str, one_partition: bool = False) -> Callable[[LowerFn], LowerFn]:
    """Register the decorated function as the lowering called ``name``."""

    def register(fn: LowerFn) -> LowerFn:
        LOWERINGS[name] = Lowering(name, summary, fn, one_partition)
        return fn

    return register


def check_format(fmt: object, split: str | None = None) -> str:
    """Validate ``--format`` (and that a one-partition format meets such a split); returns it."""
    if fmt not in LOWERINGS:
        raise InvalidOptionError(f"--format must be one of {', '.join(LOWERINGS)}, got {fmt!r}")
    lowering = LOWERINGS[str(fmt)]
    if lowering.one_partition and split is not None and split not in ONE_PARTITION_SPLITS:
        raise InvalidOptionError(
            f"--format {fmt} needs one input partition for all neurons (--split {', '.join(ONE_PARTITION_SPLITS)}), "
            f"but the split is {split!r}; use --split blocks, or another --format"
        )
    return str(fmt)
