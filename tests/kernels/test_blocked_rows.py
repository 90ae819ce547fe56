"""Column-blocked ELL packing and the batched kernel against numpy: every register tile, any batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.kernels.blocked_rows import Tile, blocked_ell_from_csr, blocked_rows_func, grouped_fill, tiles_for
from neurorewrite.ops import csr_arrays
from neurorewrite.runtime import compile, load
from neurorewrite.runtime.tvm_import import import_model
from neurorewrite.runtime.tvm_target import parse_target
from tests.runtime.tvm_models import masked, mlp, reference


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_packing_keeps_every_nonzero_in_its_tile_and_block(rows: int) -> None:
    w = masked(np.random.default_rng(rows), 10, 300, 0.3)
    w[7] = 0.0
    ell = blocked_ell_from_csr(*csr_arrays(w), in_features=300, index_type="int16", rows=rows, column_block=256)
    assert ell.blocks == 2 and ell.row_tiles == -(-10 // rows) and ell.tile_ptr.size == 2 * ell.row_tiles + 1
    dense = np.zeros((ell.row_tiles * rows, 300), np.float32)
    for tile in range(ell.tile_ptr.size - 1):
        block, row_tile = divmod(tile, ell.row_tiles)
        for k in range(ell.tile_ptr[tile], ell.tile_ptr[tile + 1]):
            for r in range(rows):
                col = int(ell.indices[k, r])
                if ell.values[k, r, 0] != 0:
                    assert col // 256 == block
                dense[row_tile * rows + r, col] += ell.values[k, r, 0]
    np.testing.assert_array_equal(dense[:10], w)


def _run(lib, ell, xt: np.ndarray, bias: np.ndarray, out: int) -> np.ndarray:  # noqa: ANN001
    y = tvm.runtime.tensor(np.zeros((out, xt.shape[1]), np.float32))
    lib["k"](*(tvm.runtime.tensor(a) for a in (xt, ell.values, ell.indices, ell.tile_ptr, bias)), y)
    return y.numpy()


@pytest.mark.parametrize("tile", [Tile(2, 4, 8), Tile(4, 2, 8), Tile(3, 1, 8, 128), Tile(4, 2, 16)], ids=lambda t: t.label)
def test_one_symbolic_kernel_matches_numpy_at_every_batch(tile: Tile) -> None:
    # 13 rows: the last row tile is partly padding; batches below, at and between whole tiles and vectors
    rng = np.random.default_rng(tile.rows)
    w, bias = masked(rng, 13, 300, 0.2), rng.standard_normal(13).astype(np.float32)
    ell = blocked_ell_from_csr(*csr_arrays(w), in_features=300, index_type="int16", rows=tile.rows,
                               column_block=tile.column_block)
    lib = tvm.compile(tvm.IRModule({"k": blocked_rows_func(ell, tile).with_attr("global_symbol", "k")}),
                      target=parse_target("llvm"))
    for n in (1, 7, tile.lanes, tile.batch, tile.batch + tile.lanes + 3, 70):
        xt = rng.standard_normal((300, n)).astype(np.float32)
        np.testing.assert_allclose(_run(lib, ell, xt, bias, 13), w @ xt + bias[:, None], rtol=1e-4, atol=1e-4)


def test_a_static_batch_specialises_the_same_kernel() -> None:
    rng = np.random.default_rng(5)
    w, bias = masked(rng, 9, 40, 0.4), rng.standard_normal(9).astype(np.float32)
    tile = Tile(2, 2, 8)
    ell = blocked_ell_from_csr(*csr_arrays(w), in_features=40, index_type="int16", rows=2, column_block=256)
    func = blocked_rows_func(ell, tile, n=21).with_attr("global_symbol", "k")
    lib = tvm.compile(tvm.IRModule({"k": func}), target=parse_target("llvm"))
    xt = rng.standard_normal((40, 21)).astype(np.float32)
    np.testing.assert_allclose(_run(lib, ell, xt, bias, 9), w @ xt + bias[:, None], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="does not match tile"):
        blocked_rows_func(ell, Tile(4, 2, 8))


def test_register_tiles_fit_the_register_file() -> None:
    for lanes, registers in ((8, 16), (16, 32)):
        tiles = tiles_for(lanes)
        assert tiles and all(4 <= t.rows * t.vectors <= registers - 4 for t in tiles)
    assert max(t.rows * t.vectors for t in tiles_for(8)) <= 8  # AVX2: at most half the 16 registers
    assert max(t.rows * t.vectors for t in tiles_for(16)) > 8  # AVX-512 may use more


def test_compiled_mlp_at_batch_16_uses_the_blocked_kernel(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    w1, b1 = masked(rng, 30, 20, 0.3), rng.standard_normal(30).astype(np.float32)
    w2, b2 = masked(rng, 7, 30, 0.3), rng.standard_normal(7).astype(np.float32)
    model = mlp(w1, b1, w2, b2, sparse=True, input_shape=[2, 8, 20])
    mod, kernels = import_model(model, {"x": [2, 8, 20]}, parse_target("llvm"), scheduled=True, measure=False)
    assert [k["kernel"].split(" ")[0] for k in kernels] == ["column-blocked", "column-blocked"]
    assert sum(gv.name_hint.startswith("column_blocked_ell") for gv in mod.functions) == 2
    compile(model, "llvm", output=tmp_path / "m.so", kernel_choice="estimate")
    x = rng.standard_normal((2, 8, 20)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "m.so")(x)[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)


def untied_second_layer(rng: np.random.Generator, out: int, parents: int, alpha: int) -> np.ndarray:
    """An untied FPE second layer: a row keeps all alpha child columns of a parent or none, values differ."""
    keep = rng.random((out, parents)) < 0.4
    w = (rng.standard_normal((out, parents * alpha)) * np.repeat(keep, alpha, axis=1)).astype(np.float32)
    w[0, np.flatnonzero(w[0])[:1]] = 0.0  # one incomplete run: stored with a zero
    return w


@pytest.mark.parametrize("tile", [Tile(2, 4, 8, 256, 4), Tile(1, 2, 8, 64, 4)], ids=lambda t: t.label)
def test_grouped_entries_read_runs_of_alpha_columns(tile: Tile) -> None:
    rng = np.random.default_rng(tile.rows)
    w, bias = untied_second_layer(rng, 13, 30, 4), rng.standard_normal(13).astype(np.float32)
    csr = csr_arrays(w)
    assert 0.95 < grouped_fill(csr[1], csr[2], 4) < 1.0 and grouped_fill(*csr_arrays(masked(rng, 13, 120, 0.3))[1:], 4) < 0.5
    ell = blocked_ell_from_csr(*csr, in_features=120, index_type="int16", rows=tile.rows, column_block=tile.column_block,
                               group=4)
    assert ell.values.shape[2] == 4 and ell.values.shape[0] * tile.rows < (w != 0).sum()  # one index per run
    lib = tvm.compile(tvm.IRModule({"k": blocked_rows_func(ell, tile).with_attr("global_symbol", "k")}),
                      target=parse_target("llvm"))
    for n in (1, 9, 40):
        xt = rng.standard_normal((120, n)).astype(np.float32)
        np.testing.assert_allclose(_run(lib, ell, xt, bias, 13), w @ xt + bias[:, None], rtol=1e-4, atol=1e-4)
