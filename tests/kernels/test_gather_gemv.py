"""Sliced-ELL packing and the small-batch gather kernel against numpy (AVX-512 and AVX2 variants)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.errors import ModelLoadError
from neurorewrite.kernels.ell import sliced_ell_from_csr
from neurorewrite.kernels.gather_gemv import gather_gemv_func, gather_lanes
from neurorewrite.runtime.tvm_target import host_llvm, parse_target


def _csr(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = w != 0
    return w[mask], np.nonzero(mask)[1], np.concatenate([[0], np.cumsum(mask.sum(axis=1))])


def _weight(rng: np.random.Generator, out_f: int, in_f: int, density: float) -> np.ndarray:
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    w[rng.random(w.shape) >= density] = 0.0
    return w


@pytest.mark.parametrize("lanes", [8, 16])
def test_sliced_ell_round_trips_and_pads_each_slice_to_its_own_width(lanes: int) -> None:
    w = _weight(np.random.default_rng(lanes), 37, 50, 0.2)
    w[5] = 0.0
    w[30, :45] = 1.0  # one long row: only its slice gets wide
    sell = sliced_ell_from_csr(*_csr(w), in_features=50, lanes=lanes)
    np.testing.assert_array_equal(sell.to_dense(), w)
    assert sell.slices == -(-37 // lanes)
    widths = np.diff(sell.slice_ptr)
    assert widths[30 // lanes] >= 45 and widths[0] < 45


def test_sliced_ell_validates_like_ell() -> None:
    with pytest.raises(ModelLoadError, match="inconsistent CSR arrays.*outside"):
        sliced_ell_from_csr(np.ones(2), np.array([0, 9]), np.array([0, 1, 2]), 4, lanes=8)


def _targets() -> list[tuple[str, dict]]:
    native = parse_target("llvm")
    out = []
    if gather_lanes(native) == 16:
        out.append(("avx512", host_llvm()))
    if gather_lanes(native):  # any x86 with AVX-512 also runs AVX2 code
        out.append(("avx2", {"kind": "llvm", "mcpu": "haswell", "num-cores": 1}))
    return out


@pytest.mark.skipif(not _targets(), reason="this CPU has no hardware gather (AVX2/AVX-512)")
@pytest.mark.parametrize("name,spec", _targets(), ids=lambda v: v if isinstance(v, str) else "")
def test_gather_kernel_matches_numpy_at_every_batch(name: str, spec: dict) -> None:
    rng = np.random.default_rng(len(name))
    target = parse_target(spec)
    lanes = gather_lanes(target)
    assert lanes == (16 if name == "avx512" else 8)
    w, bias = _weight(rng, 37, 300, 0.3), rng.standard_normal(37).astype(np.float32)
    sell = sliced_ell_from_csr(*_csr(w), in_features=300, lanes=lanes)
    lib = tvm.compile(tvm.IRModule({"k": gather_gemv_func(sell).with_attr("global_symbol", "k")}), target=target)
    for n in (1, 3, 8):  # feature-major input: sample b gathers at offsets i * n
        xt = rng.standard_normal((300, n)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((37, n), np.float32))
        lib["k"](*(tvm.runtime.tensor(a) for a in (xt, sell.values, sell.indices, sell.slice_ptr, bias)), out)
        np.testing.assert_allclose(out.numpy(), w @ xt + bias[:, None], rtol=1e-4, atol=1e-5)
