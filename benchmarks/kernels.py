"""Kernel benchmark: every candidate kernel of the paper-faithful FFN's layers, alone, against the machine's peaks.

The FFN 768 -> 3072 -> 768 (ReLU) at alpha 4 (random split, global prune) gives three sparse layers:
W1' (the children, 1.57 M nonzeros), W2 (the second layer folded to its parents, 0.78 M) and W2'
untied (the second layer as a calibrated or fine-tuned model has it: 3.14 M, children no longer
tied; values perturbed here, the pattern is the expansion's). Each candidate the kernel choice would
time (:mod:`neurorewrite.kernels.choice`) runs alone at batch 1 and 32 with 1 and 2 threads, next to
onnxruntime's dense MatMul of the original layer. Printed per kernel: time, the multiply-adds it
executes (stored entries, zeros of its tiles included) and the useful ones, the bytes it streams
(its packed weights plus input and output), GFLOP/s over useful multiply-adds, the fraction of the
measured FMA peak and of the cache / DRAM read bandwidth (``benchmarks/peak.py``), the 2-thread
speed-up, and which candidate the measured choice takes. Best of ``--repeats`` calls (caches warm).

Run: ``python -m benchmarks.kernels [--repeats N] [--layers W1 W2 W2u]`` from the repository root.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import tvm
from onnx import TensorProto, helper, numpy_helper

from benchmarks.deploy import export_ffn
from benchmarks.peak import Peaks, cpu_line, load_average, measure_peaks
from neurorewrite.api import expand
from neurorewrite.kernels.choice import SparseLinearTask, candidates_for, choice_from_costs
from neurorewrite.kernels.measure import compile_alone
from neurorewrite.passes.fold_tied import fold_tied_children
from neurorewrite.rewriter.graph import GraphIndex, get_attr
from neurorewrite.runtime.tvm_session import set_threads
from neurorewrite.runtime.tvm_target import parse_target
from neurorewrite.table import format_table

ALPHA = 4
BATCHES = (1, 32)
THREADS = (1, 2)


def best_us(run: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def ffn_layers(untied_seed: int = 0) -> dict[str, tuple[list[np.ndarray], int, int, int]]:
    """name -> (CSR arrays, in, out, alpha) of the paper-faithful FFN's sparse layers."""
    with tempfile.TemporaryDirectory() as tmp:
        sparse, _ = expand(export_ffn(Path(tmp), torch.nn.ReLU), alpha=ALPHA, split="random", format="sparse")
    folded, _ = fold_tied_children(sparse)
    layers = {}
    for key, model in (("fold", folded), ("raw", sparse)):
        index = GraphIndex.build(model.graph)
        for node in model.graph.node:
            if node.op_type != "SparseLinear":
                continue
            csr = [index.constant_value(t) for t in node.input[1:4]]
            d, o = int(get_attr(node, "in_features", 0)), int(get_attr(node, "out_features", 0))
            if key == "fold" and d == 768:
                layers["W1' (children)"] = (csr, d, o, ALPHA)
            elif key == "fold" and node.name.endswith("/parents"):
                layers["W2 (folded parents)"] = (csr, d, o, 1)
            elif key == "raw" and d == 3072 * ALPHA:
                values = csr[0] * (1 + 0.01 * np.random.default_rng(untied_seed).standard_normal(csr[0].size)).astype(np.float32)
                layers["W2' untied (as calibrated)"] = ([values, csr[1], csr[2]], d, o, ALPHA)
    return layers


def dense_ort(d: int, o: int, threads: int) -> ort.InferenceSession:
    w = np.random.default_rng(0).standard_normal((d, o)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", o])], [numpy_helper.from_array(w, "w")])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def layer_rows(name: str, layer: tuple, peaks: Peaks, repeats: int, target: tvm.target.Target) -> list[tuple]:
    csr, d, o, alpha = layer
    task = SparseLinearTask(name, d, o, *csr, None, alpha, target)
    candidates = candidates_for(task)
    built = compile_alone(candidates, target)
    device = tvm.cpu(0)
    rng = np.random.default_rng(0)
    useful = task.nonzeros
    results: dict[str, dict[tuple[int, int], float]] = {}
    for c in candidates:
        if c.name not in built:
            continue
        _, weights = c.build()
        args_w = [tvm.runtime.tensor(w, device) for w in weights]
        results[c.name] = {}
        for n in BATCHES:
            xt = tvm.runtime.tensor(rng.standard_normal((d, n)).astype(np.float32), device)
            yt = tvm.runtime.tensor(np.zeros((o, n), np.float32), device)
            for t in THREADS:
                set_threads(t, spinning=True)
                f = built[c.name]
                results[c.name][(n, t)] = best_us(lambda f=f, xt=xt, yt=yt: f(xt, *args_w, yt), repeats)
    choice = choice_from_costs({k: {n: v[(n, THREADS[-1])] for n in BATCHES} for k, v in results.items()}, "measured")
    rows = []
    # the original dense layer in onnxruntime: W1 is 768 x 3072, W2 3072 x 768 (its parents' shape)
    dense_in, dense_out = (768, 3072) if d == 768 else (3072, 768)
    dense_times = {}
    for t in THREADS:
        session = dense_ort(dense_in, dense_out, t)
        for n in BATCHES:
            x = rng.standard_normal((n, dense_in)).astype(np.float32)
            dense_times[(n, t)] = best_us(lambda s=session, x=x: s.run(None, {"x": x}), repeats)
    dense_bytes = dense_in * dense_out * 4
    for n in BATCHES:
        rows.append(_row(name, "onnxruntime dense MatMul (original layer)", n, dense_times, dense_in * dense_out,
                         dense_in * dense_out, dense_bytes + 4 * n * (dense_in + dense_out), peaks, ""))
        for c in candidates:
            if c.name not in results:
                continue
            _, weights = c.build()
            stored = _executed(c, weights)
            streamed = sum(w.nbytes for w in weights) + 4 * n * (d + o)
            mark = "chosen" if choice.kernel_for(n) == c.name else ""
            rows.append(_row(name, c.name, n, results[c.name], stored, useful, streamed, peaks, mark))
    return rows


def _executed(candidate, weights: list[np.ndarray]) -> int:  # noqa: ANN001
    """Multiply-adds per row the kernel executes: its stored weight entries (tile zeros and padding
    included), times alpha for labeled tiles (one masked multiply-add per child and entry)."""
    per_entry = int(candidate.kernel.rsplit("x", 1)[1]) if candidate.kernel.startswith("labeled tiles x") else 1
    return int(weights[0].size) * per_entry


def _row(layer: str, kernel: str, n: int, times: dict, executed: int, useful: int, streamed: int, peaks: Peaks,
         mark: str) -> tuple:
    one, two = times[(n, 1)], times[(n, 2)]
    best = min(one, two)
    gflops = 2 * useful * n / best / 1e3
    threads = 2 if two < one else 1
    return (layer, kernel, n, f"{one:.0f}", f"{two:.0f}", f"{one / two:.2f}x", f"{executed * n / 1e6:.2f}",
            f"{useful * n / 1e6:.2f}", f"{streamed / 1e6:.2f}", f"{gflops:.1f}",
            f"{100 * 2 * executed * n / best / 1e3 / peaks.gflops[threads]:.0f}%",
            f"{100 * streamed / best / 1e3 / peaks.cache_gbs[threads]:.0f}%",
            f"{100 * streamed / best / 1e3 / peaks.dram_gbs[threads]:.0f}%", mark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--layers", nargs="+", default=["W1", "W2", "W2u"], choices=["W1", "W2", "W2u"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    print(load_average())
    peaks = measure_peaks(THREADS)
    for line in peaks.lines():
        print(line)
    target = parse_target("llvm")
    wanted = {"W1": "W1'", "W2": "W2 ", "W2u": "W2' untied"}
    rows = []
    for name, layer in ffn_layers().items():
        if any(name.startswith(wanted[k]) for k in args.layers):
            rows += layer_rows(name, layer, peaks, args.repeats, target)
    print(format_table(
        ("layer", "kernel", "batch", "1 thread us", "2 threads us", "2-thread speed-up", "executed M MAC",
         "useful M MAC", "MB streamed", "useful GFLOP/s", "% FMA peak", "% cache BW", "% DRAM BW", "choice"), rows,
        title=f"\nkernels alone, best of {args.repeats} calls; % of peak with the faster thread count "
              "(FMA: executed multiply-adds; bandwidth: bytes streamed)",
    ))
    print(load_average())


if __name__ == "__main__":
    main()
