"""Labeled parent tiles: packing FPE children (int8 labels or label bits), the small-batch kernels against numpy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.fpe.block import scatter_children
from neurorewrite.kernels.choice import SparseLinearTask, simd_lanes
from neurorewrite.kernels.labeled_tiles import labeled_candidates, labeled_gemv_func, labeled_tiles_from_csr, siblings_disjoint
from neurorewrite.ops import csr_arrays
from neurorewrite.runtime.tvm_target import parse_target


HOST = 0  # lanes / vector of a case built for this machine's CPU (its vector width, tiles of two vectors)


def _children(rng: np.random.Generator, parents: int, d: int, alpha: int) -> np.ndarray:
    """An expanded first linear: each parent's (pruned) inputs dealt to ``alpha`` children."""
    w = rng.standard_normal((parents, d)).astype(np.float32) * (rng.random((parents, d)) < 0.7)
    return scatter_children(w, rng.integers(0, alpha, (parents, d)), alpha)


@pytest.mark.parametrize(("alpha", "encoding", "lanes", "vector"), [
    (1, "dense", 8, 8), (1, "dense", 32, 16), (4, "labels", 8, 8), (4, "labels", 32, 16), (3, "labels", 16, 8),
    (4, "bits", 8, 8), (4, "bits", 16, 16), (3, "bits", 8, 8), (2, "bits", 16, 8),
    # built for this machine's CPU at the vector width the registry picks for it: on an AVX-512 host the
    # 16-float kernels run as AVX-512 code, which the x86-64 builds above only compile
    *(pytest.param(alpha, encoding, HOST, HOST, id=f"{alpha}-{encoding}-this-cpu")
      for alpha, encoding in ((4, "labels"), (3, "labels"), (4, "bits"), (2, "bits"))),
])
def test_kernel_matches_numpy_at_every_batch(alpha: int, encoding: str, lanes: int, vector: int) -> None:
    if vector == HOST:
        target = parse_target("llvm")
        vector = simd_lanes(target)
        lanes = 2 * vector
    elif vector == 8:
        target = parse_target("llvm")
    else:
        target = parse_target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 1})
    rng = np.random.default_rng(alpha * 10 + lanes)
    parents, d = 37, 50  # parents not a multiple of the lanes: the last tile is padding
    w = _children(rng, parents, d, alpha)
    bias = rng.standard_normal(parents * alpha).astype(np.float32)
    tiles = labeled_tiles_from_csr(*csr_arrays(w), in_features=d, alpha=alpha, bias=bias, lanes=lanes, encoding=encoding)
    assert tiles is not None and tiles.tiles == -(-parents // lanes) and tiles.encoding == encoding
    assert (tiles.labels is None) == (encoding != "labels")
    lib = tvm.compile(tvm.IRModule({"main": labeled_gemv_func(tiles, vector).with_attr("global_symbol", "main")}), target=target)
    for n in (1, 2, 5, 9):  # one sample, a pass of several, and the remainder
        xt = rng.standard_normal((d, n)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((parents * alpha, n), np.float32))
        lib["main"](*(tvm.runtime.tensor(a) for a in [xt, *tiles.arrays()]), y)
        np.testing.assert_allclose(y.numpy(), w @ xt + bias[:, None], rtol=1e-5, atol=2e-5)


def test_label_bits_move_each_weight_by_at_most_three_ulp() -> None:
    rng = np.random.default_rng(0)
    w = _children(rng, 40, 30, 4)
    tiles = labeled_tiles_from_csr(*csr_arrays(w), in_features=30, alpha=4, lanes=8, encoding="bits")
    plain = labeled_tiles_from_csr(*csr_arrays(w), in_features=30, alpha=4, lanes=8, encoding="labels")
    moved = np.abs(tiles.values.view(np.int32) - plain.values.view(np.int32))
    assert moved.max() <= 3 and (tiles.values.view(np.int32) & 3 == plain.labels).all()
    assert (tiles.values[plain.values == 0] == 0).all()  # pruned entries stay exact zeros (label 0)
    assert labeled_tiles_from_csr(*csr_arrays(_children(rng, 8, 30, 5)), in_features=30, alpha=5, encoding="bits") is None


def test_siblings_that_share_an_input_are_not_packed() -> None:
    w = _children(np.random.default_rng(0), 8, 12, 2)
    w[1, 3] = w[0, 3] = 1.0  # children 0 and 1 of parent 0 both read input 3
    assert not siblings_disjoint(*csr_arrays(w)[1:], in_features=12, alpha=2)
    assert labeled_tiles_from_csr(*csr_arrays(w), in_features=12, alpha=2) is None
    assert labeled_tiles_from_csr(*csr_arrays(w[:15]), in_features=12, alpha=2) is None  # odd row count
    assert labeled_tiles_from_csr(*csr_arrays(w), in_features=12, alpha=1) is not None


def test_candidates_follow_structure_and_density() -> None:
    rng = np.random.default_rng(1)
    target = parse_target("llvm")

    def names(w: np.ndarray, alpha: int) -> set[str]:
        task = SparseLinearTask("t", w.shape[1], w.shape[0], *csr_arrays(w), None, alpha, target)
        return {c.kernel for c in labeled_candidates(task)}

    children = _children(rng, 64, 40, 4)  # 17% dense as children, 70% as parents
    assert names(children, 4) == {"labeled tiles x4"}
    dense_enough = rng.standard_normal((64, 40)).astype(np.float32) * (rng.random((64, 40)) < 0.5)
    assert names(dense_enough, 1) == {"dense tiles"}
    assert names(dense_enough * (rng.random((64, 40)) < 0.2), 1) == set()  # 10% dense: gathers or blocks
