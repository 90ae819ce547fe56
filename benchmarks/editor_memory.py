"""Peak memory of one weight-replacing edit on the ~100 M parameter FFN stack: our editor vs onnx-graphsurgeon.

    python -m benchmarks.editor_memory [--blocks 12] [--d 1024] [--hidden 4096]

The edit is what ``expand`` does to a graph: every block's two weight initializers are replaced by new
arrays of 4x the size (alpha 4, dense format), and the model is serialised. Each editor runs in a
fresh process on the same saved model; the script prints each process's wall time and peak resident
memory. This is the measurement behind ``docs/architecture.md``'s choice of graph editor.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from benchmarks.expand_speed import build_ffn_stack
from benchmarks.machine import describe

OURS = """
import sys, numpy as np, onnx
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears, read_weights
model = onnx.load(sys.argv[1])
index = GraphIndex.build(model.graph)
def updates():
    for lin in find_linears(index).values():
        w, b = read_weights(index, lin)
        yield NewWeights(lin, np.repeat(w, 4, axis=0 if lin.name.endswith("fc1") else 1), None)
new = replace_weights(model, updates())
del model, index
data = new.SerializeToString()
print(len(data))
"""

GRAPHSURGEON = """
import sys, numpy as np, onnx
import onnx_graphsurgeon as gs
graph = gs.import_onnx(onnx.load(sys.argv[1]))
for node in graph.nodes:
    if node.op == "MatMul":
        weight = node.inputs[1]
        axis = 1 if node.name.endswith("fc1") else 0
        node.inputs[1] = gs.Constant(weight.name + ".fpe", np.repeat(weight.values, 4, axis=axis))
graph.cleanup()
new = gs.export_onnx(graph)
del graph
data = new.SerializeToString()
print(len(data))
"""


def run(code: str, path: Path) -> tuple[float, int]:
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise SystemExit("the peak of this run is hidden by an earlier, larger one: run each editor alone")
    return wall, peak * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--editor", choices=("ours", "graphsurgeon", "both"), default="both")
    args = parser.parse_args()
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        path = Path(tmp) / "stack.onnx"
        onnx.save_model(build_ffn_stack(args.blocks, args.d, args.hidden), str(path))
        size = path.stat().st_size
        print(f"model: {args.blocks} FFN blocks {args.d} -> {args.hidden} -> {args.d}, {size / 1e6:.0f} MB; "
              "edit: every weight replaced by one 4x its size, then serialised")
        # RUSAGE_CHILDREN keeps the largest child's peak: run the lighter editor first
        for name, code in (("ours", OURS), ("onnx-graphsurgeon", GRAPHSURGEON)):
            if args.editor not in ("both", name.split("-")[-1]):
                continue
            wall, peak = run(code, path)
            print(f"{name:18s} wall {wall:6.1f} s   peak RSS {peak / 1e6:6.0f} MB = {peak / size:.2f}x the input")


if __name__ == "__main__":
    main()
