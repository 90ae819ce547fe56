"""The per-process harness: each model alone in a worker process, rounds alternating, medians by batch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from neurorewrite.errors import DataError
from neurorewrite.runtime.bench_process import Worker, bench_processes
from tests.runtime.tvm_models import masked, mlp


def _files(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    w1, b1 = masked(rng, 40, 24, 0.3), rng.standard_normal(40).astype(np.float32)
    w2, b2 = masked(rng, 12, 40, 0.3), rng.standard_normal(12).astype(np.float32)
    dense, sparse = tmp_path / "dense.onnx", tmp_path / "sparse.onnx"
    dense.write_bytes(mlp(w1, b1, w2, b2, sparse=False).SerializeToString())
    sparse.write_bytes(mlp(w1, b1, w2, b2, sparse=True).SerializeToString())
    return dense, sparse


def test_each_model_runs_in_its_own_process_and_gets_a_median_per_batch(tmp_path: Path) -> None:
    dense, sparse = _files(tmp_path)
    seen: list[str] = []
    workers = {"dense": Worker("ort", str(dense), threads=1), "sparse": Worker("ort", str(sparse), threads=1)}
    result = bench_processes(workers, (1, 3), rounds=2, runs=3, warmup=1, progress=lambda d, t, label: seen.append(label))
    assert seen == ["dense", "sparse", "sparse", "dense"]  # alternating order
    assert set(result.median) == {(m, b) for m in workers for b in (1, 3)} and min(result.median.values()) > 0


def test_a_failing_worker_names_the_model(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="model broken"):
        bench_processes({"broken": Worker("ort", str(tmp_path / "missing.onnx"))}, (1,), rounds=1, runs=1, warmup=0)


def test_a_compiled_library_runs_in_a_worker(tmp_path: Path) -> None:
    pytest.importorskip("tvm")
    from neurorewrite.runtime import compile

    _, sparse = _files(tmp_path)
    compile(sparse, "llvm", output=tmp_path / "any.so", kernel_choice="estimate")
    result = bench_processes({"tvm": Worker("tvm", str(tmp_path / "any.so"), threads=1)}, (1, 9), rounds=1, runs=2, warmup=1)
    assert result.median[("tvm", 9)] > 0


def test_token_id_inputs_are_fed_as_integers(tmp_path: Path) -> None:
    """A model that reads int64 ids (an embedding lookup) runs in a worker, in onnxruntime and compiled."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32), "table")
    graph = helper.make_graph([helper.make_node("Gather", ["table", "ids"], ["y"])], "lookup",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], [table])
    path = tmp_path / "lookup.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    workers = {"ort": Worker("ort", str(path), threads=1)}
    if importlib.util.find_spec("tvm") is not None:
        from neurorewrite.runtime import compile

        compile(path, "llvm", output=tmp_path / "lookup.so", shapes={"ids": [2, 16]}, kernel_choice="estimate")
        workers["tvm"] = Worker("tvm", str(tmp_path / "lookup.so"), threads=1, libraries={2: str(tmp_path / "lookup.so")})
    result = bench_processes(workers, (2,), rounds=1, runs=2, warmup=1)
    assert all(result.median[(label, 2)] > 0 for label in workers)


def test_a_worker_without_preparation_runs_the_file_as_stored(tmp_path: Path) -> None:
    """``prepare=False`` is plain onnxruntime: it cannot run the project's operator, which ``ort_session``
    rewrites at load."""
    _, sparse = _files(tmp_path)
    assert bench_processes({"prepared": Worker("ort", str(sparse), threads=1)}, (1,), rounds=1, runs=2, warmup=1).median
    with pytest.raises(DataError, match="model as stored"):
        bench_processes({"model as stored": Worker("ort", str(sparse), threads=1, prepare=False)}, (1,), rounds=1, runs=1,
                        warmup=0)
