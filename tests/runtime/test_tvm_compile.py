"""The TVM compile/run path end to end on tiny models: numerics vs onnxruntime, plain models, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

from neurorewrite.runtime import compile, load, ort_session  # noqa: E402
from tests.runtime.tvm_models import ESTIMATE_TARGET, masked, mlp, needs_avx2, reference  # noqa: E402


def _weights(seed: int = 0, density: float = 0.4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (masked(rng, 32, 12, density), rng.standard_normal(32).astype(np.float32),
            masked(rng, 6, 32, density), rng.standard_normal(6).astype(np.float32))


# rows -> kernel by the static estimates for an AVX2 CPU (ESTIMATE_TARGET): dense enough at small batch -> tiles,
# sparse -> gathers, 8 rows or more -> column-blocked (10 rows: a full vector and a scalar tail)
@pytest.mark.parametrize(("n", "density", "kernel"), [
    (1, 0.4, "dense tiles"), (1, 0.05, "sliced-ELL gather"), (10, 0.4, "column-blocked ELL"),
])
def test_sparse_model_matches_onnxruntime_dense(tmp_path: Path, n: int, density: float, kernel: str) -> None:
    needs_avx2()
    w1, b1, w2, b2 = _weights(n, density)
    lib = tmp_path / "m.so"
    _, report = compile(mlp(w1, b1, w2, b2, sparse=True), ESTIMATE_TARGET, output=lib, shapes={"x": [n, 12]},
                        kernel_choice="estimate")
    # a hidden unit whose row is empty is a constant: the preparation folds it into the second layer's bias
    assert [k["out_features"] for k in report.sparse_kernels] == [int((w1 != 0).any(axis=1).sum()), 6]
    assert report.sparse_kernels[0]["kernel"].startswith(kernel) and report.sparse_kernels[0]["choice"] == "estimated"
    x = np.random.default_rng(7).standard_normal((n, 12)).astype(np.float32)
    dense = ort_session(mlp(w1, b1, w2, b2, sparse=False), providers=["CPUExecutionProvider"])
    expected = dense.run(None, {"x": x})[0]
    got = load(lib)({"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(got, reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)


def test_plain_onnx_model_compiles_without_sparse_kernels(tmp_path: Path) -> None:
    w1, b1, w2, b2 = _weights(3)
    model = mlp(w1, b1, w2, b2, sparse=False, input_shape=[2, 3, 12])
    _, report = compile(model, "llvm", output=tmp_path / "d.so")
    assert report.sparse_kernels == []
    x = np.random.default_rng(1).standard_normal((2, 3, 12)).astype(np.float32)
    expected = ort_session(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(load(tmp_path / "d.so")(x)[0], expected, rtol=1e-4, atol=1e-5)


def test_cli_compiles_a_sparse_model_and_writes_library_and_description(tmp_path: Path) -> None:
    w1, b1, w2, b2 = _weights(4)
    onnx.save(mlp(w1, b1, w2, b2, sparse=True, input_shape=["batch", 2, 12]), tmp_path / "m.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "neurorewrite.cli", "compile", str(tmp_path / "m.onnx"), "--shape", "x=3,2,12",
         "-o", str(tmp_path / "m.so")], capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "sparse kernels (2" in result.stdout and "chosen by" in result.stdout and "estimated" in result.stdout
    x = np.random.default_rng(2).standard_normal((3, 2, 12)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "m.so")(x)[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
    assert (tmp_path / "m.so.json").exists()


@pytest.mark.parametrize(("n", "first_kernel"), [(1, "labeled tiles x4"), (3, "labeled tiles x4"), (16, "column-blocked ELL")])
def test_expanded_model_folds_tied_children_and_matches_onnxruntime(exports, tmp_path: Path, n: int, first_kernel: str) -> None:
    from neurorewrite.api import expand

    needs_avx2()
    model, _ = expand(exports["torchscript_gemm"], alpha=4, split="random", seed=2, format="sparse")
    _, report = compile(model, ESTIMATE_TARGET, output=tmp_path / "f.so", shapes={"x": [n, 16]}, kernel_choice="estimate")
    assert [row["parent_nonzeros"] for row in report.folded] and len(report.sparse_kernels) >= 2
    assert report.sparse_kernels[0]["kernel"].startswith(first_kernel)
    dense, _ = expand(exports["torchscript_gemm"], alpha=4, split="random", seed=2, format="dense")  # unfolded
    x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
    expected = ort_session(dense, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = load(tmp_path / "f.so")({"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_one_symbolic_library_runs_every_batch_choosing_its_kernel_per_call(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    w1, b1 = masked(rng, 96, 40, 0.4), rng.standard_normal(96).astype(np.float32)
    w2, b2 = masked(rng, 10, 96, 0.4), rng.standard_normal(10).astype(np.float32)
    lib = tmp_path / "any.so"
    needs_avx2()
    _, report = compile(mlp(w1, b1, w2, b2, sparse=True), ESTIMATE_TARGET, output=lib, kernel_choice="estimate")
    assert report.inputs == {"x": ["batch", 40]}
    first = report.sparse_kernels[0]
    assert first["rows"] == "batch" and "dense tiles" in first["kernel"] and "column-blocked ELL" in first["kernel"]
    model = load(lib)
    for n in (1, 3, 7, 8, 9, 31, 64, 100):  # both kernels, full and partial vectors, the scalar tail
        x = rng.standard_normal((n, 40)).astype(np.float32)
        np.testing.assert_allclose(model(x)[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)


def test_symbolic_batch_and_sequence_of_an_expanded_model(exports, tmp_path: Path) -> None:
    from neurorewrite.api import expand

    model, _ = expand(exports["torchscript_gemm"], alpha=4, split="random", seed=3, format="sparse")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    _, report = compile(model, "llvm", output=tmp_path / "e.so", kernel_choice="estimate")
    dense, _ = expand(exports["torchscript_gemm"], alpha=4, split="random", seed=3, format="dense")
    session = ort_session(dense, providers=["CPUExecutionProvider"])
    compiled = load(tmp_path / "e.so")
    for n in (1, 5, 16, 33):
        x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
        want = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(compiled({"x": x})[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_an_fpe_block_is_transposed_once_in_and_once_out(exports) -> None:
    """Between its two sparse layers the block stays feature-major: activation, children's sum and the
    untied copies run on the kernels' (features, n) output, no transpose between them."""
    from neurorewrite.api import expand
    from neurorewrite.passes.prepare import prepare_for_runtime
    from neurorewrite.runtime.tvm_import import import_model
    from neurorewrite.runtime.tvm_target import parse_target

    model, _ = expand(exports["torchscript_gemm"], alpha=4, split="random", seed=2, format="sparse")
    prepared, report = prepare_for_runtime(model, "tvm")
    assert report.folded  # the second layer reads the children's sum
    mod, kernels = import_model(prepared, {"x": [16, 16]}, parse_target("llvm"), scheduled=True, measure=False)
    text = mod["main"].script()
    assert text.count("tiled_transpose") == 2 and len(kernels) >= 2
    assert "R.sum(" in text


def test_a_calibrated_model_compiles_without_its_constant_children(exports, tmp_path: Path) -> None:
    """The calibration leaves many children without an input; the library computes the first layer's other
    rows only (the constant ones are in the second layer's bias), says so in ``compile``'s summary, and
    still matches onnxruntime on the calibrated dense file, at every batch of a symbolic-batch library."""
    from neurorewrite.api import expand
    from neurorewrite.ops import OP
    from tests.conftest import sample_for

    sample = sample_for(exports["gelu_erf"], batch=400, seed=1)
    sparse, report = expand(exports["gelu_erf"], alpha=4, calibrate=sample, format="sparse")
    constant = report.calibration[0]["constant_inputs"]
    assert constant > 0
    dense, _ = expand(exports["gelu_erf"], alpha=4, calibrate=sample, format="dense")
    sparse.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(sparse, tmp_path / "c.onnx")
    result = subprocess.run(
        [sys.executable, "-m", "neurorewrite.cli", "compile", str(tmp_path / "c.onnx"), "--kernel-choice", "estimate",
         "-o", str(tmp_path / "c.so")], capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    first = next(n for n in sparse.graph.node if n.op_type == OP)
    width = next(a.i for a in first.attribute if a.name == "out_features")
    table = result.stdout.split("children without an input folded into the next layer's bias")[1].splitlines()
    assert table[3].split()[1:3] == [str(width), str(constant)], table  # title, header, rule, the second layer
    kernels = result.stdout.split("sparse kernels")[1].splitlines()
    assert kernels[3].split()[1:3] == ["16", str(width - constant)], kernels  # the first layer: in, out
    session = ort_session(dense, providers=["CPUExecutionProvider"])
    library = load(tmp_path / "c.so")
    for n in (1, 9, 40):
        x = np.random.default_rng(n).standard_normal((n, 16)).astype(np.float32)
        want = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(library({"x": x})[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
