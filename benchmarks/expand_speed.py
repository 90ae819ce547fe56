"""Speed and peak memory of the expand pass on a model with ~100 M parameters in MLP blocks.

    python -m benchmarks.expand_speed [--blocks 12] [--d 1024] [--hidden 4096] [--alpha 4]

Builds a residual stack of FFN blocks (MatMul+Add -> Gelu -> MatMul+Add, plus the residual Add) with
onnx.helper, writes it, then runs ``neurorewrite expand`` on it in a fresh process and reports the wall
time and that process's peak resident memory against the issue's targets: under 60 s, and peak memory
under 3x (bytes of the input model + bytes of the written model).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.machine import describe


def build_ffn_stack(blocks: int, d: int, hidden: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for k in range(blocks):
        p = f"layer{k}"
        inits += [
            numpy_helper.from_array((rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32), f"{p}.w1"),
            numpy_helper.from_array((rng.standard_normal(hidden) * 0.01).astype(np.float32), f"{p}.b1"),
            numpy_helper.from_array((rng.standard_normal((hidden, d)) / np.sqrt(hidden)).astype(np.float32), f"{p}.w2"),
            numpy_helper.from_array((rng.standard_normal(d) * 0.01).astype(np.float32), f"{p}.b2"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"{p}.w1"], [f"{p}.h0"], name=f"{p}.fc1"),
            helper.make_node("Add", [f"{p}.h0", f"{p}.b1"], [f"{p}.h1"], name=f"{p}.fc1_bias"),
            helper.make_node("Gelu", [f"{p}.h1"], [f"{p}.a"], name=f"{p}.gelu"),
            helper.make_node("MatMul", [f"{p}.a", f"{p}.w2"], [f"{p}.y0"], name=f"{p}.fc2"),
            helper.make_node("Add", [f"{p}.y0", f"{p}.b2"], [f"{p}.y1"], name=f"{p}.fc2_bias"),
            helper.make_node("Add", [x, f"{p}.y1"], [f"{p}.out"], name=f"{p}.residual"),
        ]
        x = f"{p}.out"
    graph = helper.make_graph(
        nodes, "ffn_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", d])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--alpha", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        src, out = Path(tmp) / "stack.onnx", Path(tmp) / "stack.fpe.onnx"
        model = build_ffn_stack(args.blocks, args.d, args.hidden)
        params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        onnx.save_model(model, str(src))
        del model
        cmd = [sys.executable, "-m", "neurorewrite.cli", "expand", str(src), "--alpha", str(args.alpha), "-o", str(out)]
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            sys.exit(f"expand failed: {result.stderr}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        in_bytes, out_bytes = file_bytes(src), file_bytes(out)
    budget = 3 * (in_bytes + out_bytes)
    print(f"model: {args.blocks} FFN blocks {args.d} -> {args.hidden} -> {args.d}, {params / 1e6:.1f} M parameters, alpha {args.alpha}")
    print(f"input {in_bytes / 1e6:.0f} MB, written {out_bytes / 1e6:.0f} MB")
    print(f"expand wall time: {wall:.1f} s   (target < 60 s: {'met' if wall < 60 else 'MISSED'})")
    print(f"peak RSS: {peak / 1e6:.0f} MB = {peak / (in_bytes + out_bytes):.2f}x (input + written)"
          f"   (target < 3x = {budget / 1e6:.0f} MB: {'met' if peak < budget else 'MISSED'})")


if __name__ == "__main__":
    main()
