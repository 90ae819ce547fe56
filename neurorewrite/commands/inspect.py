"""``neurorewrite inspect``: the MLP blocks of a model, their sizes, and its FPE metadata."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from neurorewrite.rewriter.record import FPERecord, LoweredLayer
from neurorewrite.table import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the MLP blocks found, widths, nonzero counts and FPE metadata",
        description="List the MLP blocks neurorewrite finds in an ONNX model (and the near misses with the "
        "reason they are skipped), their widths and nonzero counts, and the FPE record of an expanded model.",
    )
    p.add_argument("model", type=Path, help="ONNX model")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neurorewrite.api import inspect

    info = inspect(args.model)
    if args.json:
        print(json.dumps({**asdict(info), "fpe": None if info.fpe is None else info.fpe.to_json()}, indent=2))
        return 0
    rows = [
        (b.name, b.form, b.activation, b.in_features, b.width, b.out_features, b.nonzeros, b.parameters)
        for b in info.blocks
    ]
    print(format_table(("block", "form", "activation", "in", "hidden", "out", "nonzeros", "parameters"), rows,
                       title=f"{args.model}: {len(info.blocks)} MLP block(s)"))
    notes = [(b.name, note) for b in info.blocks for note in b.notes]
    if notes:
        print(format_table(("block", "note"), notes, title="\nnotes"))
    if info.skipped:
        print(format_table(("block", "reason"), [(s.name, s.reason) for s in info.skipped], title="\nskipped"))
    if info.fpe:
        print(render_fpe_record(info.fpe))
    return 0


def render_fpe_record(record: FPERecord) -> str:
    """The FPE record as text: options on one line, then a table per block and per lowered layer."""
    data = record.to_json()
    tables = ("blocks", "lowered")
    options = " ".join(f"{k}={v}" for k, v in sorted(data.items()) if k not in tables)
    blocks = [(b.name, f"{b.width_before} -> {b.width_after}", f"{b.nnz_before} -> {b.nnz_after}") for b in record.blocks]
    parts = ["\nFPE: " + options, format_table(("block", "width", "nonzeros"), blocks)]
    if record.lowered:
        parts.append(lowered_table(record.lowered, f"\nformat {record.format}"))
    return "\n".join(parts)


def lowered_table(layers: Sequence[LoweredLayer], title: str) -> str:
    """How each expanded layer is stored: its format's name for it, shape, nonzeros and bytes."""
    rows = [(row.layer, row.kind, "x".join(str(d) for d in row.shape), "-" if row.nonzeros is None else row.nonzeros,
             "-" if row.bytes is None else row.bytes) for row in layers]
    return format_table(("layer", "stored as", "shape", "nonzeros", "bytes"), rows, title=title)
