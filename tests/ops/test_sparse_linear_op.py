"""The operator's one validator: every consumer raises the same error for the same bad CSR arrays."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.errors import ModelLoadError
from neurorewrite.ops import check_csr, csr_arrays, densify, sparse_linear_reference
from neurorewrite.runtime.ort import ort_session
from tests.passes.test_sparse_to_standard import sparse_model

BROKEN = {  # (values, indices, indptr, in_features) -> the problem the message names
    "indptr ends early": ((np.ones(3, np.float32), np.array([0, 1, 2]), np.array([0, 1, 2]), 4), "indptr"),
    "indptr decreases": ((np.ones(3, np.float32), np.array([0, 1, 2]), np.array([0, 2, 1, 3]), 4), "indptr"),
    "index outside": ((np.ones(2, np.float32), np.array([0, 9]), np.array([0, 1, 2]), 4), "outside 0..3"),
    "negative index": ((np.ones(2, np.float32), np.array([0, -1]), np.array([0, 1, 2]), 4), "outside 0..3"),
    "fewer indices": ((np.ones(2, np.float32), np.array([0]), np.array([0, 1, 2]), 4), "indices for 2 values"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_csr_is_one_load_error(case: str) -> None:
    arrays, problem = BROKEN[case]
    with pytest.raises(ModelLoadError, match=f"layer x: inconsistent CSR arrays.*{problem}"):
        check_csr(*arrays, where="layer x")


def test_every_consumer_uses_the_validator() -> None:
    """onnxruntime preparation and the TVM packings raise the same error type and wording."""
    from neurorewrite.kernels.ell import ell_from_csr, sliced_ell_from_csr

    values, indices, indptr = np.ones(2, np.float32), np.array([0, 9]), np.array([0, 1, 2])
    messages = []
    for consume in (
        lambda: ell_from_csr(values, indices, indptr, 4),
        lambda: sliced_ell_from_csr(values, indices, indptr, 4, lanes=8),
    ):
        with pytest.raises(ModelLoadError, match="inconsistent CSR arrays") as info:
            consume()
        messages.append(str(info.value).split(": ", 1)[1])
    w = np.zeros((6, 10), np.float32)
    w[:, 1] = 1.0
    broken = np.array([0, 1, 2, 3, 4, 5, 999], np.int16)
    with pytest.raises(ModelLoadError, match="inconsistent CSR arrays") as info:
        ort_session(sparse_model(w, None, indptr_override=broken), providers=["CPUExecutionProvider"])
    assert "indptr" in str(info.value) and len(set(messages)) == 1


def test_reference_is_the_dense_product() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    values, indices, indptr = csr_arrays(w)
    np.testing.assert_array_equal(densify(values, indices, indptr, 7, 5), w)
    x = rng.standard_normal((3, 2, 7)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    np.testing.assert_allclose(sparse_linear_reference(x, values, indices, indptr, b, 7), x @ w.T + b, rtol=1e-6)
