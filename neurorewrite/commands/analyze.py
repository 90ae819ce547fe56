"""``neurorewrite analyze``: superposition metrics per MLP block, before and after the rewrite."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neurorewrite.progress import ProgressBar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="interference metrics per MLP block (capacity, cosine, dead neurons, monosemantic scale)",
        description="Measure every MLP block of an ONNX model: widths, nonzeros, density, feature capacity and "
        "mean |cosine| of neuron weight rows; with --data also dead / always-on neurons and the monosemantic "
        "scale of the hidden activations. Given a second (rewritten) model, blocks are paired and each metric "
        "is shown before -> after. --html writes a self-contained report with pictures.",
    )
    p.add_argument("model", type=Path, help="ONNX model (the original, when two are given)")
    p.add_argument("other", type=Path, nargs="?", help="a second ONNX model, e.g. its FPE expansion")
    p.add_argument("--data", type=Path, metavar="SAMPLE.npz",
                   help="sample inputs keyed by graph input name (first axis: rows) for activation metrics")
    p.add_argument("--html", type=Path, metavar="REPORT.html", help="write a self-contained HTML report")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from neurorewrite.analysis import analyze
    from neurorewrite.analysis.summary import render, summarize

    if args.html is not None:
        from neurorewrite.analysis.html import check_output
        from neurorewrite.paths import check_no_overwrite
        from neurorewrite.rewriter.io import model_files

        inputs = [*model_files(args.model)]
        if args.other is not None:
            inputs += model_files(args.other, "the second model")
        if args.data is not None:
            inputs.append(("--data", args.data))
        check_no_overwrite(inputs, [("--html", args.html)])
        check_output(args.html)  # before the work: an unwritable path should not cost a full analysis
    analysis = analyze(args.model, args.other, data=args.data, progress=ProgressBar("analyze"))
    summary = summarize(analysis)
    if args.html is not None:
        from neurorewrite.analysis.html import render_html, write_report

        write_report(render_html(analysis, progress=ProgressBar("report")), args.html)
    if args.json:
        print(json.dumps({**summary, "html": None if args.html is None else str(args.html)}, indent=2))
    else:
        print(render(summary))
        if args.html is not None:
            print(f"\nwrote {args.html}")
    return 0
