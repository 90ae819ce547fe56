"""TVM deploy benchmark: an FFN block 768 -> 3072 -> 768, dense in onnxruntime vs FPE (alpha 4, random
split, global prune) as SparseLinear compiled with the tuned TVM kernels. One thread each, side by side.

Run: ``.venv/bin/python -m benchmarks.deploy_tvm [--trials N] [--batches 1 32]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before tvm starts its thread pool

import numpy as np

from benchmarks.machine import describe
from neurorewrite.fpe import FPEConfig, block_seed, expand_block
from neurorewrite.progress import ProgressBar
from neurorewrite.runtime.ort import ort_session
from neurorewrite.runtime.tvm_compile import DEFAULT_TRIALS, compile
from neurorewrite.runtime.tvm_run import load
from neurorewrite.table import format_table
from tests.runtime.tvm_models import mlp

D, H, ALPHA = 768, 3072, 4


def ffn_weights(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """torch.nn.Linear's default init, so the two layers have their usual relative scales."""
    def linear(o: int, i: int) -> tuple[np.ndarray, np.ndarray]:
        bound = 1 / np.sqrt(i)
        return (rng.uniform(-bound, bound, (o, i)).astype(np.float32), rng.uniform(-bound, bound, o).astype(np.float32))
    return (*linear(H, D), *linear(D, H))


def median_ms(fn, runs: int) -> float:  # noqa: ANN001
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    print(describe())
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = ffn_weights(rng)
    e = expand_block(w1, b1, w2, b2, FPEConfig(alpha=ALPHA, split="random", seed=block_seed(0, 0)))
    print(f"FPE alpha={ALPHA}: nnz {e.nnz_before} -> {e.nnz_after}; W1' {np.count_nonzero(e.w1)}, W2' {np.count_nonzero(e.w2)}")
    dense = ort_session(mlp(w1, b1, w2, b2, sparse=False), providers=["CPUExecutionProvider"], threads=1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.batches:
            model = mlp(e.w1, e.b1, e.w2, e.b2, sparse=True, input_shape=[n, D])
            lib = os.path.join(tmp, f"ffn{n}.so")
            _, report = compile(model, "llvm", output=lib, tune=args.trials > 0, trials=args.trials,
                                progress=ProgressBar(f"tune batch {n}", force=True))
            start = time.monotonic()
            compile(model, "llvm", output=lib, tune=args.trials > 0, trials=args.trials)
            warm = time.monotonic() - start
            run = load(lib)
            x = rng.standard_normal((n, D)).astype(np.float32)
            ref = dense.run(None, {"x": x})[0]
            out = run(x)[0]
            ref_fpe = np.maximum(x @ e.w1.T + e.b1, 0) @ e.w2.T + e.b2
            err = float(np.max(np.abs(out - ref_fpe)) / np.max(np.abs(ref_fpe)))
            t_dense = median_ms(lambda: dense.run(None, {"x": x}), args.runs)
            t_tvm = median_ms(lambda: run(x), args.runs)
            widths = "/".join(str(k["width"]) for k in report.sparse_kernels)
            rows.append((n, f"{t_dense:.3f}", f"{t_tvm:.3f}", f"{t_tvm / t_dense:.2f}x", widths,
                         f"{report.seconds_tune:.0f}s", f"{warm:.1f}s", f"{err:.1e}"))
            del ref
    print(format_table(("batch", "dense ORT ms", "FPE TVM ms", "ratio", "ELL widths", "tune", "warm compile",
                        "max rel err"), rows, title=f"\nFFN {D}->{H}->{D}, trials={args.trials}, 1 thread each"))


if __name__ == "__main__":
    main()
