"""CUDA: code generation for the sparse kernels is checked here without a GPU; execution needs one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from neurorewrite.runtime import compile, load  # noqa: E402
from tests.runtime.tvm_models import masked, mlp, reference  # noqa: E402


def _weights() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(5)
    return (masked(rng, 32, 12, 0.4), rng.standard_normal(32).astype(np.float32),
            masked(rng, 6, 32, 0.4), rng.standard_normal(6).astype(np.float32))


def _sources(module) -> list[str]:  # noqa: ANN001
    found = [module.inspect_source()] if module.kind == "cuda" else []
    for child in module.imports:
        found += _sources(child)
    return found


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA sources cannot be built")
@pytest.mark.parametrize("shape", [[4, 12], None], ids=["fixed batch", "any batch"])
def test_cuda_source_builds_for_the_sparse_kernels(shape: list | None) -> None:
    executable, report = compile(mlp(*_weights(), sparse=True, input_shape=shape), "cuda")
    assert '"kind":"cuda"' in report.target.replace(" ", "")
    assert {k["choice"] for k in report.sparse_kernels} == {"estimated"}  # nothing to time a GPU kernel on here
    assert all(k["kernel"].startswith("TensorIR ELL") for k in report.sparse_kernels)
    text = "\n".join(_sources(executable.mod))
    assert "__global__" in text and "tensorir_ell" in text


@pytest.mark.gpu  # skipped where no GPU is present (tests/declared.py); where one is, it runs and must pass
def test_cuda_execution_matches_numpy(tmp_path: Path) -> None:
    weights = _weights()
    compile(mlp(*weights, sparse=True, input_shape=[4, 12]), "cuda", output=tmp_path / "m.so")
    x = np.random.default_rng(0).standard_normal((4, 12)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "m.so")(x)[0], reference(x, *weights), rtol=1e-4, atol=1e-4)
    compile(mlp(*weights, sparse=True), "cuda", output=tmp_path / "any.so")
    for n in (1, 9, 40):
        x = np.random.default_rng(n).standard_normal((n, 12)).astype(np.float32)
        np.testing.assert_allclose(load(tmp_path / "any.so")(x)[0], reference(x, *weights), rtol=1e-4, atol=1e-4)
