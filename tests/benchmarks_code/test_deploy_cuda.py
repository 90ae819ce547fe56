"""The CUDA benchmark's libraries: built for every batch setting it times (code generation and nvcc, no GPU needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from tests.runtime.tvm_models import masked, mlp  # noqa: E402


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA sources cannot be built")
def test_cuda_libraries_build_for_fixed_and_any_batch(tmp_path: Path) -> None:
    from benchmarks.deploy_cuda import BATCHES, cuda_libraries

    rng = np.random.default_rng(0)
    sparse = tmp_path / "m.onnx"
    sparse.write_bytes(mlp(masked(rng, 32, 12, 0.4), np.zeros(32, np.float32), masked(rng, 6, 32, 0.4),
                           np.zeros(6, np.float32), sparse=True).SerializeToString())
    libraries = cuda_libraries(sparse, tmp_path, trials=0)
    assert set(libraries["tvm"]) == set(BATCHES) and set(libraries["tvm any batch"]) == {0}
    assert all(p.exists() and Path(str(p) + ".json").exists() for libs in libraries.values() for p in libs.values())
