"""The tiled transpose kernel against numpy, on shapes that are and are not multiples of the tile."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.kernels.transpose import transpose_func
from neurorewrite.runtime.tvm_target import parse_target


@pytest.mark.parametrize(("rows", "cols"), [(37, 50), (64, 16), (16, 64), (5, 3), (1, 33)])
def test_transpose_matches_numpy(rows: int, cols: int) -> None:
    func = transpose_func(rows, cols)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=parse_target("llvm"))
    x = np.random.default_rng(rows * cols).standard_normal((rows, cols)).astype(np.float32)
    y = tvm.runtime.tensor(np.zeros((cols, rows), np.float32))
    lib["main"](tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), x.T)


def test_one_symbolic_transpose_serves_every_batch() -> None:
    func = transpose_func(None, 50)  # (batch, 50) -> (50, batch), batch symbolic
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=parse_target("llvm"))
    for rows in (1, 17, 40):
        x = np.random.default_rng(rows).standard_normal((rows, 50)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((50, rows), np.float32))
        lib["main"](tvm.runtime.tensor(x), y)
        np.testing.assert_array_equal(y.numpy(), x.T)
