"""TVM deploy benchmark: the paper-faithful FPE FFN compiled by ``neurorewrite compile`` against the dense original.

FFN 768 -> 3072 -> 768 (ReLU) exported from torch (``benchmarks.deploy.export_ffn``), widened by
``neurorewrite.expand`` (alpha 4, random split, global prune, ``format="sparse"``): the file the tool
writes. TVM libraries, each with its kernels chosen by timing them on this machine (kept in the tuning
database): ``tvm`` (one library per batch, ``--shape``, MetaSchedule ``--trials``), ``tvm any batch``
(one library without ``--shape``: symbolic batch, a kernel per call), ``tvm untied`` (the children
untied as by fine-tuning) and ``tvm calibrated`` (the file ``expand --calibrate`` writes, its inputless
children folded into the bias: see ``benchmarks/deploy.py``). Printed: the kernel each sparse layer runs per
batch, compile and tuning times (first compile, then the warm one that reads the database), the
error against onnxruntime on the same file, then latency and ratios against the dense original in
onnxruntime with both harnesses of ``benchmarks/deploy.py`` (per process with runtime defaults, and
interleaved), with the threads given.

Run: ``python -m benchmarks.deploy_tvm [--trials N] [--threads T] [--harness process|interleaved|both]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from benchmarks.deploy import BATCHES, VARIANTS, _calibrated, _untied, _written, bench_model, export_ffn
from benchmarks.peak import cpu_line, load_average
from neurorewrite.runtime.ort import ort_session
from neurorewrite.runtime.tvm_compile import DEFAULT_TRIALS, compile
from neurorewrite.runtime.tvm_run import CompiledModel
from neurorewrite.runtime.tvm_session import set_threads
from neurorewrite.table import format_table

TVM_VARIANTS = ["tvm", "tvm any batch", "tvm untied", "tvm calibrated"]


def compile_report(path: Path, folder: Path, args: argparse.Namespace) -> list[tuple]:
    """Compile ``path`` per batch (tuned) and for any batch, twice each: chosen kernels, times, error."""
    model = onnx.load(str(path))
    session = ort_session(path, providers=["CPUExecutionProvider"], threads=1)
    rows = []
    for batch in (*BATCHES, None):
        shapes = None if batch is None else {"x": [batch, 768]}
        lib = folder / f"{path.stem}.report.{batch or 'any'}.so"
        tune = args.trials > 0 and batch is not None
        start = time.monotonic()
        _, report = compile(model, "llvm", output=lib, shapes=shapes, tune=tune, trials=args.trials,
                            database=folder / f"{path.stem}.report.tuning")
        first = time.monotonic() - start
        start = time.monotonic()
        compile(model, "llvm", output=lib, shapes=shapes, tune=tune, trials=args.trials,
                database=folder / f"{path.stem}.report.tuning")
        warm = time.monotonic() - start
        compiled = CompiledModel(lib)
        errors = []
        for n in BATCHES if batch is None else (batch,):
            x = np.random.default_rng(n).standard_normal((n, 768)).astype(np.float32)
            want = session.run(None, {"x": x})[0]
            errors.append(float(np.abs(compiled(x)[0] - want).max() / np.abs(want).max()))
        kernels = "; ".join(f"{'/'.join(part for part in k['node'].split('/') if part != 'sparse')}: {k['kernel']}"
                            for k in report.sparse_kernels if k["nonzeros"] > 1)
        rows.append((path.stem, batch or "any", kernels, f"{report.seconds_tune:.0f}s", f"{first:.0f}s", f"{warm:.1f}s",
                     f"{max(errors):.1e}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help="MetaSchedule trials per batch (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--harness", choices=("process", "interleaved", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    set_threads(args.threads, spinning=True)
    print(cpu_line())
    print(load_average())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        original = export_ffn(folder, torch.nn.ReLU)
        sparse = _written(original, folder, "sparse", split="random", format="sparse")
        rows = [row for path in (sparse, _untied(original, folder), _calibrated(original, folder))
                for row in compile_report(path, folder, args)]
        print(format_table(("model", "batch", "kernels (measured choice)", "tune", "compile", "warm compile",
                            "max rel err vs onnxruntime"), rows,
                           title=f"\nFFN 768->3072->768 ReLU, alpha 4 (random split, global prune), {args.trials} trials per batch"))
        options = argparse.Namespace(threads=args.threads, tvm_trials=args.trials, rounds=args.rounds, runs=args.runs,
                                     repeats=args.repeats, variants=TVM_VARIANTS)
        for harness in (["process", "interleaved"] if args.harness == "both" else [args.harness]):
            table = bench_model(original, folder, options, harness)
            headers = ["model", "variant", "file vs original"]
            for n in BATCHES:
                headers += [f"b{n} weight MB", f"b{n} M MAC/row", f"batch {n} us", f"batch {n} ratio"]
            print(format_table(headers, table, title=f"\n{harness} harness, {args.threads} threads (original: dense in onnxruntime)"))
    assert set(TVM_VARIANTS) <= set(VARIANTS)
    print(load_average())


if __name__ == "__main__":
    main()
