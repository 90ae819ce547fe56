"""The lowering pass: chooses how the expanded blocks' weights are stored and computed.

Replaces the linear layers of every FPE-expanded block with one representation:

- ``dense``: unchanged (zeros stored); runs everywhere.
- ``grouped``: for one input partition (``--split blocks`` / ``shared`` / ``feature``), W1' as ``alpha`` dense
  blocks run as one batched MatMul; the second linear as a permuted MatMul, or, when its children
  share their outgoing column, as a sum over children and W2 at its original size (``lower_grouped.py``).
  A lone block with tied outgoing columns (``--structured``) runs one 2-D MatMul per child instead
  (``lower_children.py``). Plain ONNX ops.
- ``sparse``: each expanded linear as one ``ai.neurorewrite.SparseLinear`` node holding CSR arrays
  with the narrowest index types (``docs/sparse-op.md``; ``lower_sparse.py``).

Before: the model carries the FPE record of ``expand`` (``metadata_props``) and its blocks. After:
every format computes the same outputs as ``dense`` (float rounding aside); the record's ``format``
key names the representation and ``lowered`` lists what each layer became. The input model is not
modified. Place in the pipeline: expand -> calibrate -> **lower** -> verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import ONE_PARTITION_SPLITS
from neurorewrite.passes.lower_children import can_lower_children, lower_children
from neurorewrite.passes.lower_graph import GraphRewrite, default_opset
from neurorewrite.passes.lower_grouped import is_tied, lower_grouped_first, lower_second
from neurorewrite.passes.lower_sparse import lower_sparse
from neurorewrite.rewriter.blocks import MLPBlock, blocks_by_output, chain_ends
from neurorewrite.rewriter.edit import read_metadata, write_metadata
from neurorewrite.rewriter.linear import read_weights

FORMATS = ("dense", "grouped", "sparse")


@dataclass
class LowerReport:
    """What the pass did: the format and one row per rewritten linear layer."""

    format: str
    layers: list[dict[str, object]] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.layers)


def check_format(fmt: object, split: str | None = None) -> str:
    """Validate ``--format`` (and that ``grouped`` meets a shared split); returns it."""
    if fmt not in FORMATS:
        raise InvalidOptionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "grouped" and split is not None and split not in ONE_PARTITION_SPLITS:
        raise InvalidOptionError(
            f"--format grouped needs one input partition for all neurons (--split {', '.join(ONE_PARTITION_SPLITS)}), "
            f"but the split is {split!r}; use --split blocks, or --format dense/sparse"
        )
    return str(fmt)


def lower_model(model: onnx.ModelProto, fmt: str) -> tuple[onnx.ModelProto, LowerReport]:
    """Rewrite the expanded blocks of ``model`` into ``fmt``; see the module docstring."""
    record = read_metadata(model)
    if record is None:
        raise InvalidOptionError(f"--format {fmt}: the model carries no FPE record; expand it with neurorewrite first")
    fmt = check_format(fmt, str(record.get("split")))
    report = LowerReport(fmt)
    if fmt == "dense":
        new = onnx.ModelProto()
        new.CopyFrom(model)
    else:
        blocks = blocks_by_output(model, {b["output_tensor"] for b in record.get("blocks", [])})  # type: ignore[union-attr]
        rw = GraphRewrite.start(model)
        if fmt == "sparse":
            _lower_sparse(rw, blocks, report)
        else:
            _lower_grouped(model, rw, blocks, int(record["alpha"]), report)  # type: ignore[arg-type]
        new = rw.apply(model)  # a copy already: the record is written into it
    write_metadata(new, {**record, "format": fmt, "lowered": report.layers})
    return new, report


def _lower_sparse(rw: GraphRewrite, blocks: list[MLPBlock], report: LowerReport) -> None:
    done: set[int] = set()  # a chain middle is the second linear of one block and the first of the next
    for block in blocks:
        for lin in (block.first, block.second):
            if lin.node not in done:
                done.add(lin.node)
                report.layers.append(lower_sparse(rw, lin, *read_weights(rw.index, lin)))


def _lower_grouped(model: onnx.ModelProto, rw: GraphRewrite, blocks: list[MLPBlock], alpha: int, report: LowerReport) -> None:
    perms = {}  # tensor -> new_to_old for hidden tensors now stored children-major
    ends = chain_ends(blocks)
    seconds = {b.second.node for b in blocks}
    opset = default_opset(model)
    per_child = set()  # lone blocks with tied outgoing weights: one MatMul per child (lower_children.py)
    for block in ends:
        if block.first.node in seconds:
            continue
        w1, b1 = read_weights(rw.index, block.first)
        w2, b2 = read_weights(rw.index, block.second)
        if is_tied(w2, alpha) and can_lower_children(rw, block, w1, alpha):
            report.layers += lower_children(rw, model, block, w1, b1, w2, b2, alpha, opset)
            per_child.add(block.first.node)
    for block in blocks:
        if block.first.node in per_child:
            continue
        w, b = read_weights(rw.index, block.first)
        perms[block.hidden] = lower_grouped_first(rw, block.first, w, b, alpha, perms.get(block.first.data_input))
        report.layers.append({"layer": block.first.name, "kind": f"grouped x{alpha}", "shape": list(w.shape)})
    for block in ends:  # a chain middle was lowered above as the next block's first linear
        if block.first.node in per_child:
            continue
        w, b = read_weights(rw.index, block.second)
        kind = lower_second(rw, block.second, w, b, alpha, perms[block.hidden], opset)
        report.layers.append({"layer": block.second.name, "kind": kind, "shape": list(w.shape)})
