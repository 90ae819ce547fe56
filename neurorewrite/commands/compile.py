"""``neurorewrite compile``: build an ONNX model into a TVM library, tuning the sparse kernels."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neurorewrite.errors import InvalidOptionError
from neurorewrite.paths import suffixed_output
from neurorewrite.progress import ProgressBar
from neurorewrite.table import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile a (rewritten) ONNX model into a TVM library, with tuned sparse kernels",
        description="Import an ONNX model with TVM's Relax frontend, map ai.neurorewrite.SparseLinear nodes to the "
        "project's TensorIR kernels, optionally tune with MetaSchedule (records kept in a database folder and reused "
        "on the next compile), and export a shared library plus LIBRARY.json describing its inputs.",
    )
    p.add_argument("model", type=Path, help="input ONNX model")
    p.add_argument("-o", "--output", type=Path, help="output library (default: MODEL.so beside the input; W.so.so for a model named W.so)")
    p.add_argument("--target", default="llvm", help="llvm (this CPU), cuda, or a TVM target JSON dict")
    p.add_argument("--tune", action="store_true", help="tune with MetaSchedule (tasks already in --database are reused)")
    p.add_argument("--trials", type=int, default=None, help="measurement budget for --tune (default 128)")
    p.add_argument("--database", type=Path, help="tuning database folder (default: OUTPUT.tuning beside the output)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                   help="fix the shape of an input with symbolic dims (repeatable), e.g. --shape x=1,768: the fast "
                   "path, and what --tune needs; a named dim it fixes is fixed in every input (--shape "
                   "input_ids=1,128 fixes the attention mask too), and what the shapes determine (masks, reshape "
                   "targets) becomes constants, as Hugging Face exports need; without it the library keeps the "
                   "symbolic dims and runs any batch, each sparse layer choosing its kernel per call")
    p.add_argument("--kernel-choice", choices=("measure", "estimate"), default="measure",
                   help="measure (default): time each sparse layer's candidate kernels on this machine once and keep "
                   "the choice in the tuning database; estimate: rank them by static costs (used anyway for other targets)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run)


def parse_shapes(items: list[str]) -> dict[str, list[int]]:
    shapes = {}
    for item in items:
        name, sep, dims = item.rpartition("=")
        try:
            values = [int(v) for v in dims.replace("x", ",").split(",") if v]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v <= 0 for v in values):
            raise InvalidOptionError(f"--shape {item!r}: expected NAME=D0,D1,... with positive integers")
        shapes[name] = values
    return shapes


def run(args: argparse.Namespace) -> int:
    from neurorewrite.runtime.tvm_compile import DEFAULT_TRIALS, compile

    if args.trials is not None and not args.tune:
        raise InvalidOptionError("--trials only applies with --tune")
    output = args.output or suffixed_output(args.model, ".so")  # never the input, even for a model named w.so
    _, report = compile(
        args.model, target=args.target, output=output, tune=args.tune,
        trials=DEFAULT_TRIALS if args.trials is None else args.trials, database=args.database,
        shapes=parse_shapes(args.shape), progress=ProgressBar("tune"), kernel_choice=args.kernel_choice,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    rows = [(k["node"], k["in_features"], k["out_features"], k["rows"], k["nonzeros"], k["kernel"], k["choice"])
            for k in report.sparse_kernels]
    parts = [format_table(("node", "in", "out", "rows", "nonzeros", "kernel", "chosen by"), rows,
                          title=f"sparse kernels ({len(rows)}; none means a plain Relax import)")]
    if report.folded:
        folded = [(f["node"], f["nonzeros"], f["parent_nonzeros"], f["untied_nonzeros"]) for f in report.folded]
        parts.append(format_table(("node", "nonzeros", "as parents", "untied"), folded,
                                  title="\ntied children summed first (the parents' weights are read once)"))
    if report.constant:
        constant = [(c["node"], c["children"], c["constant"], c["folded_nonzeros"]) for c in report.constant]
        parts.append(format_table(("node", "children", "constant", "entries moved to the bias"), constant,
                                  title="\nchildren without an input folded into the next layer's bias"))
    summary = [("target", report.target), ("inputs", json.dumps(report.inputs)),
               ("tuned tasks", f"{report.tuned_tasks} ({report.trials} trials)" if args.tune else "not tuned"),
               ("database", report.database or "-"), ("tune time", f"{report.seconds_tune:.1f}s"),
               ("build time", f"{report.seconds_build:.1f}s")]
    summary += [("note", note) for note in report.notes]
    parts.append(format_table(("", ""), summary, title=""))
    parts.append(f"\nwrote {report.output} and {report.output}.json")
    print("\n".join(parts))
    return 0
