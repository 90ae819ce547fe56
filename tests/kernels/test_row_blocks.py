"""Row blocks (kernels/row_blocks.py): a layer whose leading rows are dense and whose other rows are nearly
empty runs as two kernels, stacked; a uniform layer stays whole. The split library computes the layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from neurorewrite.kernels.row_blocks import MIN_BLOCK_ROWS, dense_prefix  # noqa: E402
from neurorewrite.ops import csr_arrays  # noqa: E402
from neurorewrite.runtime import compile, load  # noqa: E402
from tests.runtime.tvm_models import ESTIMATE_TARGET, masked, mlp, needs_avx2, reference  # noqa: E402


def lead_then_sparse(rng: np.random.Generator, lead: int, rest: int, d: int, rest_density: float) -> np.ndarray:
    """``lead`` rows about 3/4 full above ``rest`` rows about ``rest_density`` full (a calibrated first layer)."""
    return np.concatenate([masked(rng, lead, d, 0.75), masked(rng, rest, d, rest_density)])


@pytest.mark.parametrize(("lead", "rest", "rest_density", "prefix"), [
    (96, 200, 0.02, 96),  # the calibrated shape: split after the lead rows
    (96, 200, 0.15, 0),  # the rest too full to gain from a block of its own
    (MIN_BLOCK_ROWS - 1, 200, 0.02, 0),  # a block too small to pay for its kernel call
    (96, MIN_BLOCK_ROWS - 1, 0.02, 0),
    (296, 0, 0.0, 0),  # all dense: one layer
])
def test_the_dense_prefix(lead: int, rest: int, rest_density: float, prefix: int) -> None:
    w = lead_then_sparse(np.random.default_rng(0), lead, rest, 64, rest_density)
    assert dense_prefix(csr_arrays(w)[2], 64) == prefix


def test_uniform_rows_stay_whole() -> None:
    w = masked(np.random.default_rng(1), 300, 64, 0.3)
    assert dense_prefix(csr_arrays(w)[2], 64) == 0


@pytest.mark.parametrize("n", [1, 12])
def test_a_split_layer_runs_two_kernels_and_computes_the_layer(tmp_path: Path, n: int) -> None:
    needs_avx2()
    rng = np.random.default_rng(2)
    w1, b1 = lead_then_sparse(rng, 96, 200, 64, 0.02), rng.standard_normal(296).astype(np.float32)
    w2, b2 = masked(rng, 8, 296, 0.3), rng.standard_normal(8).astype(np.float32)
    _, report = compile(mlp(w1, b1, w2, b2, sparse=True), ESTIMATE_TARGET, output=tmp_path / "r.so",
                        shapes={"x": [n, 64]}, kernel_choice="estimate")
    first, second, third = report.sparse_kernels
    assert first["node"].endswith("/dense rows") and first["out_features"] == 96
    # the empty rows among the sparse ones are constants the preparation folds into the second layer's bias
    assert second["node"].endswith("/sparse rows") and second["out_features"] == (w1[96:] != 0).any(axis=1).sum()
    assert first["nonzeros"] + second["nonzeros"] == np.count_nonzero(w1) and third["out_features"] == 8
    x = rng.standard_normal((n, 64)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "r.so")(x)[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
