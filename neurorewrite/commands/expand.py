"""``neurorewrite expand``: FPE-expand the MLP blocks of an ONNX model."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import BIAS_MODES, DEFAULT_LEAD_SHARE, PRUNE_MODES, SPLITS
from neurorewrite.passes.expand_blocks import ExpandReport
from neurorewrite.progress import ProgressBar
from neurorewrite.rewriter.lowering import LOWERINGS
from neurorewrite.table import format_table


DEFAULT_REFIT = "w2"


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
    p.add_argument("--split", default=None, choices=SPLITS,
                   help="how inputs are shared among children (default: tiered with --calibrate, random without)")
    p.add_argument("--groups", type=Path, help="JSON list of input-index groups, for --split groups")
    p.add_argument("--lead-share", type=float, default=None, metavar="SHARE",
                   help="tiered split: the share of each neuron's inputs (its largest terms) dealt to its first "
                   f"child, the rest in balanced tiers to the others (default {DEFAULT_LEAD_SHARE} with --calibrate, "
                   "balanced tiers without)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--bias", default="split", choices=BIAS_MODES, help="hidden bias per child: split (b/alpha, default: measured better before calibration) or copy")
    p.add_argument("--prune", default="global", choices=PRUNE_MODES, help="one threshold over both layers, or per layer")
    p.add_argument("--layers", nargs="+", metavar="NAME_OR_REGEX", help="only blocks whose linear node names match")
    p.add_argument("--calibrate", type=Path, metavar="SAMPLE.npz",
                   help="win quality back label-free on sample inputs (one array per model input, axis 0 = samples; "
                   "positions an attention_mask input masks out are not rows)")
    p.add_argument("--prune-by", choices=("activation", "magnitude"), default=None,
                   help="prune scores: activation (magnitudes times the sample's activation statistics; default "
                   "with --calibrate unless --split is tiered) or magnitude (the default otherwise)")
    p.add_argument("--refit", choices=("w2", "block", "none"), default=None,
                   help="what --calibrate refits: w2 (each block's last linear, least squares), block (then the "
                   "whole block, masks fixed, by gradient steps) or none (the sample only informs --prune-by "
                   f"activation); default {DEFAULT_REFIT}")
    p.add_argument("--refit-per", choices=("child", "parent"), default="child",
                   help="W2 refit: a weight per child (default), or one per parent shared by its children (a Gram "
                   "alpha^2 times smaller: for wide models)")
    p.add_argument("--support", choices=("hessian", "kept"), default="hessian",
                   help="W2 refit per child: which weights each row keeps, same count per row: chosen again from the "
                   "sample's second moments (hessian, default: OBS saliency) or the prune's (kept)")
    p.add_argument("--first-layer", choices=("lead", "keep"), default=None,
                   help="W1' under --calibrate: lead (each parent's lead child, the one carrying most of its "
                   "pre-activation, is refit to the parent's whole pre-activation by least squares on the sample, "
                   "same weights kept; not for gated blocks) or keep (W1' as expanded); default lead with "
                   "--refit-per child, keep with --refit-per parent")
    p.add_argument("--target", choices=("residual", "output"), default="residual",
                   help="what a block is fit to: the original block's output, plus (residual, default) the drift "
                   "of the residual stream it adds to")
    p.add_argument("--holdout", type=float, default=0.2, metavar="SHARE",
                   help="share of the sample's samples held out of the fit and only scored (default 0.2)")
    p.add_argument("--solver", choices=("cg", "exact"), default="cg",
                   help="least-squares solver: cg (all rows at once, default) or exact (a dense solve per row: small layers)")
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
    from neurorewrite.api import CalibrationWarning, default_output, expand

    alpha = parse_alpha(args.alpha)
    output = args.output or default_output(args.model)  # expand refuses an output that is one of its inputs
    options = None
    if args.calibrate is not None:
        from neurorewrite.passes.calibrate import CalibrateOptions

        options = CalibrateOptions(refit=args.refit or DEFAULT_REFIT, target=args.target, holdout=args.holdout,
                                   solver=args.solver, refit_per=args.refit_per, support=args.support,
                                   first=args.first_layer)
    elif (args.refit or args.holdout != 0.2 or args.target != "residual" or args.solver != "cg" or args.refit_per != "child"
          or args.support != "hessian" or args.first_layer is not None):
        raise InvalidOptionError("--refit, --refit-per, --support, --first-layer, --target, --holdout and --solver set up --calibrate: "
                                 "give --calibrate SAMPLE.npz")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CalibrationWarning)
        _, report = expand(
            args.model, alpha=alpha, split=args.split, seed=args.seed, bias=args.bias, prune=args.prune,
            groups=args.groups, layers=args.layers, calibrate=args.calibrate, output=output,
            progress=ProgressBar("expand"), format=args.format, structured=args.structured,
            prune_by=args.prune_by, calibrate_options=options, lead_share=args.lead_share,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if args.json:
        print(json.dumps({"output": str(output), **report.to_dict()}, indent=2))
    else:
        print(render_report(report, output))
    return 0


def render_report(report: ExpandReport, output: Path) -> str:
    rows = [
        (b.name, b.form, b.activation, f"{b.width_before} -> {b.width_after}", f"{b.nnz_before} -> {b.nnz_after}")
        for b in report.blocks
    ]
    parts = [
        format_table(
            ("block", "form", "activation", "width", "nonzeros"), rows,
            title=f"FPE alpha={report.alpha} split={report.split}"
            f"{'' if report.lead_share is None else f' lead-share={report.lead_share:g}'} seed={report.seed} "
            f"bias={report.bias} prune={report.prune} format={report.format}",
        )
    ]
    if report.calibration:
        shared = lambda c: f" (+{len(c['shared_with'])} block(s) sharing it)" if c.get("shared_with") else ""  # noqa: E731
        cal = [(c["layer"] + shared(c), f"{c['rows']} + {c['holdout_rows']}", c["first"], c["support"],
                f"{'-' if c['rmse_before'] is None else format(c['rmse_before'], '.4g')} -> {c['rmse_after']:.4g}",
                f"{c['holdout_rmse_before']:.4g} -> {c['holdout_rmse_after']:.4g}", f"{c['seconds']:.1f}s")
               for c in report.calibration]
        summary = report.calibration_summary
        title = (f"\ncalibration: refit={summary.get('refit')} target={report.calibration[0]['target']} "
                 f"solver={summary.get('solver')}; rows are positions that are not padding"
                 + ("; fit rows' error before: not measured with a lead refit and held-out rows (theirs is)"
                    if any(c["rmse_before"] is None for c in report.calibration) else ""))
        parts.append(format_table(("refit layer", "rows fit + held out", "first layer", "support", "RMSE vs target (fit rows)",
                                   "RMSE (held-out rows)", "time"), cal, title=title))
    if report.warnings:
        parts.append("\n" + "\n".join(f"warning: {w}" for w in report.warnings))
    notes = [(b.name, note) for b in report.blocks for note in b.notes]
    if notes:
        parts.append(format_table(("block", "note"), notes, title="\nnotes"))
    if report.skipped:
        parts.append(format_table(("block", "reason"), [(s.name, s.reason) for s in report.skipped], title="\nskipped"))
    parts.append(f"\nwrote {output}")
    return "\n".join(parts)
