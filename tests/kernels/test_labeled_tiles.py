"""Labeled parent tiles: packing FPE children and the small-batch kernel against numpy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.fpe.block import scatter_children
from neurorewrite.kernels.labeled_tiles import LANES, labeled_gemv_func, labeled_tiles_from_csr, prefer_labeled
from neurorewrite.ops import csr_arrays
from neurorewrite.runtime.tvm_target import parse_target


def _children(rng: np.random.Generator, parents: int, d: int, alpha: int) -> np.ndarray:
    """An expanded first linear: each parent's (pruned) inputs dealt to ``alpha`` children."""
    w = rng.standard_normal((parents, d)).astype(np.float32) * (rng.random((parents, d)) < 0.7)
    return scatter_children(w, rng.integers(0, alpha, (parents, d)), alpha)


@pytest.mark.parametrize(("alpha", "n", "vector"), [(1, 1, 16), (1, 5, 16), (4, 1, 16), (4, 3, 8), (3, 5, 16)])
def test_kernel_matches_numpy(alpha: int, n: int, vector: int) -> None:
    rng = np.random.default_rng(alpha * 10 + n)
    parents, d = 37, 50  # parents not a multiple of LANES: the last tile is padding
    w = _children(rng, parents, d, alpha)
    bias = rng.standard_normal(parents * alpha).astype(np.float32)
    tiles = labeled_tiles_from_csr(*csr_arrays(w), in_features=d, alpha=alpha, bias=bias)
    assert tiles is not None and tiles.tiles == -(-parents // LANES) and (tiles.labels is None) == (alpha == 1)
    func = labeled_gemv_func(n, tiles, vector)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=parse_target("llvm"))
    x = rng.standard_normal((n, d)).astype(np.float32)
    arrays = [x, tiles.values] + ([] if tiles.labels is None else [tiles.labels]) + [tiles.bias]
    args = [tvm.runtime.tensor(a) for a in [*arrays, np.zeros((n, tiles.rows), np.float32)]]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy()[:, : parents * alpha], x @ w.T + bias, rtol=1e-5, atol=1e-5)


def test_siblings_that_share_an_input_are_not_packed() -> None:
    w = _children(np.random.default_rng(0), 8, 12, 2)
    w[1, 3] = w[0, 3] = 1.0  # children 0 and 1 of parent 0 both read input 3
    assert labeled_tiles_from_csr(*csr_arrays(w), in_features=12, alpha=2) is None
    assert labeled_tiles_from_csr(*csr_arrays(w[:15]), in_features=12, alpha=2) is None  # odd row count
    assert labeled_tiles_from_csr(*csr_arrays(w), in_features=12, alpha=1) is not None


def test_choice_follows_density() -> None:
    # an FPE first layer keeps most parent entries: tiles; a 5%-dense layer: gathers
    assert prefer_labeled(nnz=1_500_000, parents=3072, in_features=768, alpha=4)
    assert prefer_labeled(nnz=800_000, parents=768, in_features=3072, alpha=1)
    assert not prefer_labeled(nnz=100_000, parents=768, in_features=3072, alpha=1)
    assert not prefer_labeled(nnz=300_000, parents=3072, in_features=768, alpha=4)
    # an untied FPE second layer, 768 x 12288 zero-filled (38 MB), would stream from memory: gathers
    assert not prefer_labeled(nnz=3_150_000, parents=768, in_features=12288, alpha=1)
