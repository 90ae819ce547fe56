"""The small-batch kernel for untied FPE second layers (1 x alpha blocks) against numpy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.kernels.choice import SparseLinearTask
from neurorewrite.kernels.group_gemv import group_candidates, group_gemv_func, group_rows_from_csr
from neurorewrite.ops import csr_arrays
from neurorewrite.runtime.tvm_target import parse_target
from tests.kernels.test_blocked_rows import untied_second_layer
from tests.runtime.tvm_models import masked


@pytest.mark.parametrize("lanes", [8, 16])
def test_kernel_matches_numpy_at_every_batch(lanes: int) -> None:
    rng = np.random.default_rng(lanes)
    w, bias = untied_second_layer(rng, 13, 30, 4), rng.standard_normal(13).astype(np.float32)
    packed = group_rows_from_csr(*csr_arrays(w), in_features=120, group=4, per_vector=lanes // 4, index_type="int16")
    blocks = int((w.reshape(13, 30, 4) != 0).any(axis=2).sum())
    assert int((packed.values != 0).any(axis=1).sum()) == blocks  # one entry (one index) per block of 4
    lib = tvm.compile(tvm.IRModule({"main": group_gemv_func(packed, lanes).with_attr("global_symbol", "main")}),
                      target=parse_target("llvm"))
    for n in (1, 2, 5):  # batch 1 reads contiguous pieces, larger batches strided ones
        xt = rng.standard_normal((120, n)).astype(np.float32)
        y = tvm.runtime.tensor(np.zeros((13, n), np.float32))
        lib["main"](*(tvm.runtime.tensor(a) for a in (xt, packed.values, packed.indices, packed.row_ptr, bias)), y)
        np.testing.assert_allclose(y.numpy(), w @ xt + bias[:, None], rtol=1e-4, atol=1e-4)


def test_offered_only_for_layers_in_runs_of_alpha() -> None:
    rng = np.random.default_rng(0)
    target = parse_target("llvm")
    untied = untied_second_layer(rng, 16, 40, 4)
    assert group_candidates(SparseLinearTask("w2", 160, 16, *csr_arrays(untied), None, 4, target))
    assert not group_candidates(SparseLinearTask("w2", 160, 16, *csr_arrays(untied), None, 1, target))
    scattered = masked(rng, 16, 160, 0.4)
    assert not group_candidates(SparseLinearTask("w", 160, 16, *csr_arrays(scattered), None, 4, target))
