"""``neurorewrite expand``: FPE-expand the MLP blocks of an ONNX model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import BIAS_MODES, PRUNE_MODES, SPLITS
from neurorewrite.passes.expand_blocks import ExpandReport
from neurorewrite.progress import ProgressBar
from neurorewrite.rewriter.lowering import LOWERINGS
from neurorewrite.table import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "expand",
        help="split every hidden neuron of each MLP block into ALPHA children at the same nonzero count",
        description="FPE-expand every MLP block (linear -> activation -> linear) of an ONNX model. "
        "Each hidden neuron becomes ALPHA children with disjoint shares of its input weights; the block is "
        "pruned back to exactly its original nonzero count.",
    )
    p.add_argument("model", type=Path, help="input ONNX model")
    p.add_argument("--alpha", required=True, help="children per hidden neuron (integer >= 1)")
    p.add_argument("-o", "--output", type=Path, help="output path (default: MODEL.fpe.onnx beside the input)")
    p.add_argument("--split", default="random", choices=SPLITS, help="how inputs are shared among children")
    p.add_argument("--groups", type=Path, help="JSON list of input-index groups, for --split groups")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--bias", default="split", choices=BIAS_MODES, help="hidden bias per child: split (b/alpha, default: measured better before calibration) or copy")
    p.add_argument("--prune", default="global", choices=PRUNE_MODES, help="one threshold over both layers, or per layer")
    p.add_argument("--layers", nargs="+", metavar="NAME_OR_REGEX", help="only blocks whose linear node names match")
    p.add_argument("--calibrate", type=Path, metavar="SAMPLE.npz", help="refit outgoing weights on sample inputs")
    p.add_argument(
        "--format", choices=tuple(LOWERINGS), default=None,
        help="how expanded weights are stored: " + "; ".join(f"{k}: {v.summary}" for k, v in LOWERINGS.items()),
    )
    p.add_argument(
        "--structured", action="store_true",
        help="preset that runs near dense speed in plain onnxruntime: blocks split (or --split shared/feature), tied outgoing weights, layer pruning, grouped format",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    p.set_defaults(handler=run)


def parse_alpha(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidOptionError(f"--alpha must be an integer >= 1, got {text!r}") from None
    return value


def run(args: argparse.Namespace) -> int:
    from neurorewrite.api import default_output, expand

    alpha = parse_alpha(args.alpha)
    output = args.output or default_output(args.model)  # expand refuses an output that is one of its inputs
    _, report = expand(
        args.model, alpha=alpha, split=args.split, seed=args.seed, bias=args.bias, prune=args.prune,
        groups=args.groups, layers=args.layers, calibrate=args.calibrate, output=output,
        progress=ProgressBar("expand"), format=args.format, structured=args.structured,
    )
    if args.json:
        print(json.dumps({"output": str(output), **report.to_dict()}, indent=2))
    else:
        print(render_report(report, output))
    return 0


def render_report(report: ExpandReport, output: Path) -> str:
    rows = [
        (b.name, b.activation, f"{b.width_before} -> {b.width_after}", f"{b.nnz_before} -> {b.nnz_after}")
        for b in report.blocks
    ]
    parts = [
        format_table(
            ("block", "activation", "width", "nonzeros"), rows,
            title=f"FPE alpha={report.alpha} split={report.split} seed={report.seed} bias={report.bias} "
            f"prune={report.prune} format={report.format}",
        )
    ]
    if report.calibration:
        cal = [(c["block"], c["layer"], f"{c['rmse_before']:.4g} -> {c['rmse_after']:.4g}") for c in report.calibration]
        parts.append(format_table(("block", "refit layer", "output RMSE vs original"), cal, title="\ncalibration"))
    if report.skipped:
        parts.append(format_table(("block", "reason"), [(s.name, s.reason) for s in report.skipped], title="\nskipped"))
    parts.append(f"\nwrote {output}")
    return "\n".join(parts)
