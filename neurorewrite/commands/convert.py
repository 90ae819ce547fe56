"""``neurorewrite convert``: store an expanded dense model (after ``finetune``, say) in another format."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from neurorewrite.rewriter.lowering import LOWERINGS
from neurorewrite.commands.inspect import lowered_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="store an expanded dense model in another format (sparse, grouped)",
        description="Rewrite the expanded blocks of a dense-format model (as expand writes it by default, or as "
        "finetune leaves it) into another format: the same function and the same stored nonzeros. For a "
        "model that was trained after expand, so that it deploys in the sparse format.",
    )
    p.add_argument("model", type=Path, help="expanded ONNX model in the dense format")
    p.add_argument("--format", required=True, choices=tuple(f for f in LOWERINGS if f != "dense"),
                   help="the format to store the expanded blocks in")
    p.add_argument("-o", "--output", type=Path, help="output path (default: MODEL.FORMAT.onnx beside the input)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neurorewrite.api import convert, default_output

    output = args.output or default_output(args.model, args.format)
    _, report = convert(args.model, args.format, output)
    if args.json:
        print(json.dumps({"format": report.format, "output": str(output),
                          "layers": [asdict(row) for row in report.layers]}, indent=2))
        return 0
    print(lowered_table(report.layers, f"format {report.format}"))
    print(f"\nwrote {output}")
    return 0
