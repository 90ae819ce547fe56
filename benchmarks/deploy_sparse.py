"""Sparse layers in plain onnxruntime: every form we have for ``--format sparse``, layer by layer.

The FFN's sparse layers (``benchmarks/kernels.py``: W1' children, W2 folded parents, W2' untied) as
onnxruntime runs them: ``densify`` (the weight rebuilt dense, one MatMul: the default of
``ort_session``), ``gather`` (ELL: Gather, Mul, ReduceSum) and onnxruntime's own sparse kernel,
``com.microsoft.SparseToDenseMatMul`` (CSR weight bound as a sparse input, Transposes around it),
next to the dense MatMul of the original layer. Best of ``--repeats`` calls, ``--threads`` threads,
one session at a time (caches warm).

Run: ``python -m benchmarks.deploy_sparse [--threads T] [--repeats N]`` from the repository root.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from benchmarks.kernels import best_us, dense_ort, ffn_layers
from benchmarks.peak import cpu_line, load_average
from neurorewrite.ops import sparse_linear_node
from neurorewrite.runtime.ort import ort_session
from neurorewrite.table import format_table

BATCHES = (1, 32)


def sparse_model(csr: list[np.ndarray], d: int, o: int):  # noqa: ANN201 (an onnx ModelProto)
    from onnx import numpy_helper

    names = ["w.values", "w.indices", "w.indptr"]
    node = sparse_linear_node(["x", *names], "y", "layer", d, o)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", o])],
                              [numpy_helper.from_array(a, n) for a, n in zip(csr, names)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.neurorewrite", 1)])


def contrib_runner(csr: list[np.ndarray], d: int, o: int, threads: int) -> Callable[[np.ndarray], Callable[[], object]]:
    """``com.microsoft.SparseToDenseMatMul``: Y^T = W @ X^T with W a CSR sparse input."""
    values, indices, indptr = csr
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),
             helper.make_node("SparseToDenseMatMul", ["w", "xt"], ["yt"], domain="com.microsoft"),
             helper.make_node("Transpose", ["yt"], ["y"], perm=[1, 0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", d]),
                                           helper.make_sparse_tensor_value_info("w", TensorProto.FLOAT, [o, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", o])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    weight = ort.OrtValue.ort_value_from_sparse_tensor(ort.SparseTensor.sparse_csr_from_numpy(
        [o, d], values.astype(np.float32), indices.astype(np.int64), indptr.astype(np.int64), ort.OrtDevice.make("cpu", 0)))

    def bind(x: np.ndarray) -> Callable[[], object]:
        feed = {"x": ort.OrtValue.ortvalue_from_numpy(x)._ortvalue, "w": weight._ortvalue}
        return lambda: session._sess.run_with_ort_values(feed, ["y"], None)

    return bind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    print(load_average())
    rows = []
    rng = np.random.default_rng(0)
    for name, (csr, d, o, _alpha) in ffn_layers().items():
        dense_in, dense_out = (768, 3072) if d == 768 else (3072, 768)
        runners: dict[str, Callable[[np.ndarray], Callable[[], object]]] = {}
        original = dense_ort(dense_in, dense_out, args.threads)
        for method in ("densify", "gather"):
            session = ort_session(sparse_model(csr, d, o), providers=["CPUExecutionProvider"], threads=args.threads,
                                  sparse_method=method)
            runners[f"sparse ({method})"] = lambda x, s=session: (lambda: s.run(None, {"x": x}))
        runners["com.microsoft.SparseToDenseMatMul"] = contrib_runner(csr, d, o, args.threads)
        for n in BATCHES:
            x_orig = rng.standard_normal((n, dense_in)).astype(np.float32)
            base = best_us(lambda: original.run(None, {"x": x_orig}), args.repeats)
            rows.append((name, "onnxruntime dense MatMul (original layer)", n, f"{base:.0f}", "1.00x"))
            x = rng.standard_normal((n, d)).astype(np.float32)
            for label, make in runners.items():
                repeats = args.repeats if "SparseToDense" not in label else max(2, args.repeats // 10)
                us = best_us(make(x), repeats)
                rows.append((name, label, n, f"{us:.0f}", f"{us / base:.2f}x"))
    print(format_table(("layer", "form", "batch", "us", "vs original layer"), rows,
                       title=f"\nsparse layers in onnxruntime {ort.__version__}, {args.threads} threads, best of {args.repeats}"))
    print(load_average())


if __name__ == "__main__":
    main()
