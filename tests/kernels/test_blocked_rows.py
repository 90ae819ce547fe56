"""Column-blocked ELL packing and the batched kernel against numpy, alone and inside a compiled model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.kernels.blocked_rows import (
    COLUMN_BLOCK,
    ROW_TILE,
    batch_tile,
    blocked_ell_from_csr,
    blocked_rows_func,
)
from neurorewrite.runtime import compile, load
from neurorewrite.runtime.tvm_import import import_model
from neurorewrite.runtime.tvm_target import parse_target
from tests.runtime.tvm_models import masked, mlp, reference


def _csr(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = w != 0
    return w[mask], np.nonzero(mask)[1], np.concatenate([[0], np.cumsum(mask.sum(axis=1))])


def test_packing_keeps_every_nonzero_in_its_tile_and_block() -> None:
    w = masked(np.random.default_rng(0), 10, COLUMN_BLOCK + 44, 0.3)
    w[7] = 0.0
    ell = blocked_ell_from_csr(*_csr(w), in_features=w.shape[1], index_type="int16")
    assert ell.blocks == 2 and ell.row_tiles == 3 and ell.tile_ptr.size == 2 * 3 + 1
    dense = np.zeros((ell.row_tiles * ROW_TILE, w.shape[1]), np.float32)
    for tile in range(ell.tile_ptr.size - 1):
        block, row_tile = divmod(tile, ell.row_tiles)
        for k in range(ell.tile_ptr[tile], ell.tile_ptr[tile + 1]):
            for r in range(ROW_TILE):
                col = int(ell.indices[k, r])
                if ell.values[k, r] != 0:
                    assert col // COLUMN_BLOCK == block
                dense[row_tile * ROW_TILE + r, col] += ell.values[k, r]
    np.testing.assert_array_equal(dense[:10], w)


@pytest.mark.parametrize("n", [16, 32, 48])
def test_kernel_matches_numpy_with_bias(n: int) -> None:
    rng = np.random.default_rng(n)
    w, bias = masked(rng, 13, 300, 0.2), rng.standard_normal(13).astype(np.float32)
    ell = blocked_ell_from_csr(*_csr(w), in_features=300, index_type="int16")
    padded = np.zeros(ell.row_tiles * ROW_TILE, np.float32)
    padded[:13] = bias
    func = blocked_rows_func(n, ell).with_attr("global_symbol", "k")
    lib = tvm.compile(tvm.IRModule({"k": func}), target=parse_target("llvm"))
    xt = rng.standard_normal((300, n)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((padded.size, n), np.float32))
    lib["k"](*(tvm.runtime.tensor(a) for a in (xt, ell.values, ell.indices, ell.tile_ptr, padded)), out)
    np.testing.assert_allclose(out.numpy()[:13], w @ xt + bias[:, None], rtol=1e-4, atol=1e-4)
    assert batch_tile(n) == (32 if n % 32 == 0 else 16) and batch_tile(9) == 0


def test_compiled_mlp_at_batch_16_uses_the_blocked_kernel(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w1, b1 = masked(rng, 30, 20, 0.3), rng.standard_normal(30).astype(np.float32)
    w2, b2 = masked(rng, 7, 30, 0.3), rng.standard_normal(7).astype(np.float32)
    model = mlp(w1, b1, w2, b2, sparse=True, input_shape=[2, 8, 20])
    mod, _ = import_model(model, {"x": [2, 8, 20]}, parse_target("llvm"), scheduled=True)
    assert sum(gv.name_hint.startswith("blocked_ell_linear") for gv in mod.functions) == 2
    compile(model, "llvm", output=tmp_path / "m.so")
    x = rng.standard_normal((2, 8, 20)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "m.so")(x)[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
