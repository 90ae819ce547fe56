"""TVM deploy benchmark: an FFN block 768 -> 3072 -> 768 (ReLU), dense in onnxruntime vs FPE (alpha 4,
random split, global prune) as SparseLinear compiled with the TVM kernels, untuned and tuned.

The FFN is exported from torch (``benchmarks.deploy.export_ffn``) and widened by ``neurorewrite.expand``
with ``format="sparse"``, so the benchmark times the file the tool writes. Per batch: compile with the
default schedules; tune into a fresh database (``--trials``, timed); compile again from that database
(the warm re-compile, timed); then time dense ORT, TVM default and TVM tuned interleaved (median of
``--repeats``), with the same thread count on both sides (``--threads``).
The error column compares TVM with onnxruntime running the same sparse model.

Run: ``.venv/bin/python -m benchmarks.deploy_tvm [--trials N] [--batches 1 32] [--threads T]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from benchmarks.deploy import export_ffn
from benchmarks.machine import describe
from neurorewrite.api import expand
from neurorewrite.progress import ProgressBar
from neurorewrite.runtime.bench import bench_sessions
from neurorewrite.runtime.ort import ort_session
from neurorewrite.runtime.tvm_compile import DEFAULT_TRIALS, compile
from neurorewrite.runtime.tvm_run import CompiledModel
from neurorewrite.runtime.tvm_session import TvmSession, input_specs, set_threads
from neurorewrite.table import format_table

D, H, ALPHA = 768, 3072, 4


def bench_batch(n: int, sparse: onnx.ModelProto, dense: ort.InferenceSession, args: argparse.Namespace,
                tmp: Path) -> tuple:
    """One table row: compile (and tune) ``sparse`` for batch ``n`` and time it against ``dense``."""
    shapes = {"x": [n, D]}
    specs = input_specs(sparse)
    compile(sparse, "llvm", output=tmp / f"default{n}.so", shapes=shapes)
    sessions = {"dense ORT": dense, "TVM default": TvmSession(specs, {n: CompiledModel(tmp / f"default{n}.so")})}
    tune_s = warm_s = float("nan")
    if args.trials > 0:
        lib, db = tmp / f"tuned{n}.so", tmp / f"db{n}"
        start = time.monotonic()
        compile(sparse, "llvm", output=lib, tune=True, trials=args.trials, database=db, shapes=shapes,
                progress=ProgressBar(f"tune batch {n}", force=True))
        tune_s = time.monotonic() - start
        start = time.monotonic()
        compile(sparse, "llvm", output=lib, tune=True, trials=args.trials, database=db, shapes=shapes)
        warm_s = time.monotonic() - start
        sessions["TVM tuned"] = TvmSession(specs, {n: CompiledModel(lib)})
    x = np.random.default_rng(1).standard_normal((n, D)).astype(np.float32)
    want = ort_session(sparse, providers=["CPUExecutionProvider"], threads=1).run(None, {"x": x})[0]
    err = max(float(np.abs(s.run(None, {"x": x})[0] - want).max() / np.abs(want).max())
              for label, s in sessions.items() if label != "dense ORT")
    result = bench_sessions(sessions, (n,), repeats=args.repeats)
    ms = {label: result.median[(label, n)] * 1e3 for label in sessions}
    tuned = ms.get("TVM tuned", float("nan"))
    return (n, f"{ms['dense ORT']:.3f}", f"{ms['TVM default']:.3f}", f"{ms['TVM default'] / ms['dense ORT']:.2f}x",
            f"{tuned:.3f}", f"{tuned / ms['dense ORT']:.2f}x", f"{tune_s:.0f}s", f"{warm_s:.1f}s", f"{err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads, spinning=False)
    torch.set_num_threads(1)
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        original = export_ffn(Path(tmp), torch.nn.ReLU)
        sparse, report = expand(original, alpha=ALPHA, split="random", prune="global", format="sparse")
        print(f"FPE alpha={ALPHA}: " + "; ".join(
            f"{b.name} width {b.width_before} -> {b.width_after}, nnz {b.nnz_before} -> {b.nnz_after}" for b in report.blocks))
        dense = ort_session(original, providers=["CPUExecutionProvider"], threads=args.threads, spinning=False)
        rows = [bench_batch(n, sparse, dense, args, Path(tmp)) for n in args.batches]
    print(format_table(
        ("batch", "dense ORT ms", "TVM default ms", "ratio", "TVM tuned ms", "ratio", "tune",
         "warm compile", "max rel err vs ORT"), rows,
        title=f"\nFFN {D}->{H}->{D}, trials={args.trials}, {args.threads} thread(s) each, median of {args.repeats} interleaved runs",
    ))


if __name__ == "__main__":
    main()
