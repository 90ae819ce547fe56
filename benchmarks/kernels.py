"""Kernel micro-benchmark: the numbers behind the TVM kernel choices (``kernels/labeled_tiles.py``).

On the paper-faithful FFN 768 -> 3072 -> 768 at alpha 4 (random split, global prune, folded), batch 1,
one thread: each layer through the sliced-ELL gather kernel and through labeled / dense parent tiles,
as ns per stored nonzero and per tile entry; then a 4096 x 512 transpose as Relax compiles it
unscheduled against ``kernels/transpose.py``. Median of ``--repeats`` calls each, kernels alone.

Run: ``.venv/bin/python -m benchmarks.kernels [--repeats N]`` from the repository root.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from benchmarks.deploy import export_ffn
from benchmarks.machine import describe
from neurorewrite.api import expand
from neurorewrite.kernels.ell import sliced_ell_from_csr
from neurorewrite.kernels.gather_gemv import gather_gemv_func, gather_lanes
from neurorewrite.kernels.labeled_tiles import labeled_gemv_func, labeled_tiles_from_csr
from neurorewrite.kernels.transpose import transpose_func
from neurorewrite.passes.fold_tied import fold_tied_children
from neurorewrite.rewriter.graph import GraphIndex, get_attr
from neurorewrite.runtime.tvm_session import set_threads
from neurorewrite.runtime.tvm_target import parse_target
from neurorewrite.table import format_table

ALPHA = 4


def median_us(run: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def build(func: tvm.tirx.PrimFunc, target: tvm.target.Target):  # -> a TVM packed function
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def layer_rows(name: str, csr: list[np.ndarray], d: int, alpha: int, target, repeats: int) -> list[tuple]:
    """The layer through the gather kernel and through (labeled) tiles, batch 1."""
    values = csr[0]
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, d)).astype(np.float32))
    lanes = gather_lanes(target)
    sell = sliced_ell_from_csr(*csr, in_features=d, lanes=lanes)
    gather = build(gather_gemv_func(1, d, sell.slices, sell.values.shape[0], lanes, str(sell.indices.dtype)), target)
    g_args = [x, *(tvm.runtime.tensor(a) for a in (sell.values, sell.indices, sell.slice_ptr,
                                                   np.zeros(sell.slices * lanes, np.float32))),
              tvm.runtime.tensor(np.zeros((1, sell.slices * lanes), np.float32))]
    tiles = labeled_tiles_from_csr(*csr, in_features=d, alpha=alpha)
    assert tiles is not None
    tiled = build(labeled_gemv_func(1, tiles, lanes), target)
    arrays = [tiles.values] + ([] if tiles.labels is None else [tiles.labels]) + [tiles.bias]
    t_args = [x, *(tvm.runtime.tensor(a) for a in arrays), tvm.runtime.tensor(np.zeros((1, tiles.rows), np.float32))]
    us_gather = median_us(lambda: gather(*g_args), repeats)
    us_tiles = median_us(lambda: tiled(*t_args), repeats)
    entries = tiles.values.size
    kind = f"labeled tiles x{alpha}" if alpha > 1 else "dense tiles"
    return [
        (name, "sliced-ELL gather", values.size, f"{us_gather:.0f}", f"{us_gather * 1e3 / values.size:.3f} per nonzero"),
        (name, kind, entries, f"{us_tiles:.0f}", f"{us_tiles * 1e3 / entries:.3f} per entry"),
    ]


def transpose_rows(target, repeats: int) -> list[tuple]:
    rows, cols = 4096, 512
    bb = relax.BlockBuilder()
    x_var = relax.Var("x", relax.TensorType((rows, cols), "float32"))
    with bb.function("main", [x_var]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.permute_dims(x_var))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32))
    tiled = build(transpose_func(rows, cols), target)
    y = tvm.runtime.tensor(np.zeros((cols, rows), np.float32))
    return [
        (f"transpose {rows}x{cols}", "Relax permute_dims (unscheduled)", rows * cols, f"{median_us(lambda: vm['main'](x), repeats):.0f}", ""),
        (f"transpose {rows}x{cols}", "kernels/transpose.py", rows * cols, f"{median_us(lambda: tiled(x, y), repeats):.0f}", ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    set_threads(1, spinning=False)
    torch.set_num_threads(1)
    print(describe())
    target = parse_target("llvm")
    with tempfile.TemporaryDirectory() as tmp:
        sparse, _ = expand(export_ffn(Path(tmp), torch.nn.ReLU), alpha=ALPHA, split="random", format="sparse")
    folded, _ = fold_tied_children(sparse)
    index = GraphIndex.build(folded.graph)
    nodes = [n for n in folded.graph.node if n.op_type == "SparseLinear"]
    first, parents = nodes[0], next(n for n in nodes if n.name.endswith("/parents"))
    rows = []
    for name, node, alpha in (("W1' (children)", first, ALPHA), ("W2 (folded parents)", parents, 1)):
        csr = [index.constant_value(t) for t in node.input[1:4]]
        rows += layer_rows(name, csr, int(get_attr(node, "in_features", 0)), alpha, target, args.repeats)
    rows += transpose_rows(target, args.repeats)
    print(format_table(("layer", "kernel", "nonzeros / entries", "us", "ns"), rows,
                       title=f"\nbatch 1, 1 thread, median of {args.repeats} calls, kernels alone (caches warm)"))


if __name__ == "__main__":
    main()
