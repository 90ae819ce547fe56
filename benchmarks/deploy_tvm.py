"""TVM deploy benchmark: an FFN block 768 -> 3072 -> 768 (ReLU), dense in onnxruntime vs FPE (alpha 4,
random split, global prune) as SparseLinear compiled with the TVM kernels, untuned and tuned.

Per batch: compile with the default schedules; tune into a fresh database (``--trials``, timed); compile
again from that database (the warm re-compile, timed); then time dense ORT, TVM default and TVM tuned
interleaved (median of ``--repeats``), with the same thread count on both sides (``--threads``).
The error column compares TVM with onnxruntime running the same sparse model.

Run: ``.venv/bin/python -m benchmarks.deploy_tvm [--trials N] [--batches 1 32] [--threads T]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe
from neurorewrite.fpe import FPEConfig, block_seed, expand_block
from neurorewrite.progress import ProgressBar
from neurorewrite.runtime.bench import bench_sessions
from neurorewrite.runtime.ort import ort_session
from neurorewrite.runtime.tvm_compile import DEFAULT_TRIALS, compile
from neurorewrite.runtime.tvm_run import CompiledModel
from neurorewrite.runtime.tvm_session import TvmSession, input_specs, set_threads
from neurorewrite.table import format_table
from tests.runtime.tvm_models import mlp

D, H, ALPHA = 768, 3072, 4


def ffn_weights(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """torch.nn.Linear's default init, so the two layers have their usual relative scales."""
    def linear(o: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        bound = 1 / np.sqrt(i)
        return (rng.uniform(-bound, bound, (o, i)).astype(np.float32), rng.uniform(-bound, bound, o).astype(np.float32))
    return (*linear(H, D), *linear(D, H))


def bench_batch(n: int, e, dense, args, tmp: Path) -> tuple:
    model = mlp(e.w1, e.b1, e.w2, e.b2, sparse=True, input_shape=[n, D])
    specs = [s.__class__(s.name, ["batch", D]) for s in input_specs(model)]
    _, report = compile(model, "llvm", output=tmp / f"default{n}.so")
    sessions = {"dense ORT": dense, "TVM default": TvmSession(specs, {n: CompiledModel(tmp / f"default{n}.so")})}
    tune_s = warm_s = float("nan")
    if args.trials > 0:
        lib, db = tmp / f"tuned{n}.so", tmp / f"db{n}"
        start = time.monotonic()
        compile(model, "llvm", output=lib, tune=True, trials=args.trials, database=db,
                progress=ProgressBar(f"tune batch {n}", force=True))
        tune_s = time.monotonic() - start
        start = time.monotonic()
        compile(model, "llvm", output=lib, tune=True, trials=args.trials, database=db)
        warm_s = time.monotonic() - start
        sessions["TVM tuned"] = TvmSession(specs, {n: CompiledModel(lib)})
    x = np.random.default_rng(1).standard_normal((n, D)).astype(np.float32)
    want = ort_session(model, providers=["CPUExecutionProvider"], threads=1).run(None, {"x": x})[0]
    err = max(float(np.abs(s.run(None, {"x": x})[0] - want).max() / np.abs(want).max())
              for label, s in sessions.items() if label != "dense ORT")
    result = bench_sessions(sessions, (n,), repeats=args.repeats)
    ms = {label: result.median[(label, n)] * 1e3 for label in sessions}
    tuned = ms.get("TVM tuned", float("nan"))
    widths = "/".join(str(k["width"]) for k in report.sparse_kernels)
    return (n, f"{ms['dense ORT']:.3f}", f"{ms['TVM default']:.3f}", f"{ms['TVM default'] / ms['dense ORT']:.2f}x",
            f"{tuned:.3f}", f"{tuned / ms['dense ORT']:.2f}x", widths, f"{tune_s:.0f}s", f"{warm_s:.1f}s", f"{err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    set_threads(args.threads)
    print(describe())
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = ffn_weights(rng)
    e = expand_block(w1, b1, w2, b2, FPEConfig(alpha=ALPHA, split="random", seed=block_seed(0, 0)))
    print(f"FPE alpha={ALPHA}: nnz {e.nnz_before} -> {e.nnz_after}; W1' {np.count_nonzero(e.w1)}, W2' {np.count_nonzero(e.w2)}")
    dense = ort_session(mlp(w1, b1, w2, b2, sparse=False), providers=["CPUExecutionProvider"], threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_batch(n, e, dense, args, Path(tmp)) for n in args.batches]
    print(format_table(
        ("batch", "dense ORT ms", "TVM default ms", "ratio", "TVM tuned ms", "ratio", "kernel widths", "tune",
         "warm compile", "max rel err vs ORT"), rows,
        title=f"\nFFN {D}->{H}->{D}, trials={args.trials}, {args.threads} thread(s) each, median of {args.repeats} interleaved runs",
    ))


if __name__ == "__main__":
    main()
