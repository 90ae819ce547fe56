"""``neurorewrite bench``: latency of models side by side in onnxruntime, as ratios to the first."""

from __future__ import annotations

import argparse
from pathlib import Path

from neurorewrite.errors import InvalidOptionError, ModelLoadError
from neurorewrite.passes.sparse_to_standard import METHODS
from neurorewrite.progress import ProgressBar
from neurorewrite.runtime.bench import BenchResult
from neurorewrite.table import format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time models side by side in onnxruntime (CPU); ratios against the first",
        description="Run every MODEL on the same random inputs, interleaved, and print median latency per "
        "batch size with the ratio against the first model, plus each file's size. Models in the sparse "
        "format run through a standard-op conversion (--sparse-method).",
    )
    p.add_argument("models", type=Path, nargs="+", metavar="MODEL", help="ONNX models; the first is the reference")
    p.add_argument("--batch", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model and batch (default 20)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    p.add_argument("--sparse-method", default="densify", choices=METHODS, help="how SparseLinear runs in onnxruntime")
    p.set_defaults(handler=run)


def parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise InvalidOptionError(f"--batch must be comma-separated positive integers, got {text!r}") from None
    if not batches or any(b < 1 for b in batches):
        raise InvalidOptionError(f"--batch must be comma-separated positive integers, got {text!r}")
    return batches


def run(args: argparse.Namespace) -> int:
    from neurorewrite.runtime.bench import bench_files

    batches = parse_batches(args.batch)
    if args.repeats < 1:
        raise InvalidOptionError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise InvalidOptionError(f"--threads must be between 1 and 1024, got {args.threads}")
    for path in args.models:
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such file")
    result = bench_files(
        args.models, batches, args.repeats, args.threads, args.sparse_method, progress=ProgressBar("bench"),
    )
    print(render(result))
    return 0


def render(result: BenchResult) -> str:
    header = ["model", "bytes", "bytes ratio"]
    for b in result.batches:
        header += [f"batch {b} us", f"batch {b} ratio"]
    ref = result.labels[0]
    rows = []
    for label in result.labels:
        row = [label, str(result.nbytes.get(label, "")), f"{result.nbytes[label] / result.nbytes[ref]:.2f}x" if result.nbytes else ""]
        for b in result.batches:
            row += [f"{result.median[(label, b)] * 1e6:.0f}", f"{result.ratio(label, b):.2f}x"]
        rows.append(tuple(row))
    return format_table(tuple(header), rows, title="median latency in onnxruntime (CPU), runs interleaved")
