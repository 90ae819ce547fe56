"""``ai.neurorewrite.SparseLinear``: a linear layer whose weight is stored in CSR form.

The schema is ``docs/sparse-op.md``. This module is the operator's one home: its domain, name and
version, the CSR builders (narrowest index types), the node builder, :func:`check_csr` (the one
validator: every consumer, onnxruntime preparation and TVM kernels alike, raises the same
:class:`ModelLoadError` for the same bad arrays), and :func:`sparse_linear_reference`, the numpy
definition the tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from neurorewrite.errors import DataError, ModelLoadError

DOMAIN = "ai.neurorewrite"
OP = "SparseLinear"
VERSION = 1
FORMATS_SUPPORTED = ("csr",)  # other values are reserved (ELL, BSR) and rejected by every consumer


@dataclass(frozen=True)
class CsrMatrix:
    """A validated CSR weight of shape ``(out_features, in_features)``; index arrays widened to int64."""

    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    in_features: int
    out_features: int

    @property
    def nonzeros(self) -> int:
        return int(self.values.size)

    @property
    def rows(self) -> np.ndarray:
        """The row of every stored entry."""
        return np.repeat(np.arange(self.out_features), np.diff(self.indptr))

    def to_dense(self) -> np.ndarray:
        return densify(self.values, self.indices, self.indptr, self.in_features, self.out_features)


def narrowest_int(max_value: int) -> type:
    """The narrowest signed integer type holding ``0..max_value``."""
    for dtype in (np.int8, np.int16, np.int32):
        if max_value <= np.iinfo(dtype).max:
            return dtype
    return np.int64


def csr_arrays(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(values, indices, indptr)`` of ``w`` (out, in); explicit zeros are not stored.

    ``indices`` fits ``in - 1`` and ``indptr`` fits ``nnz``, each in the narrowest signed type.
    """
    rows, cols = np.nonzero(w)  # row-major order: rows ascending, columns ascending within a row
    return csr_from_entries(w[rows, cols], rows, cols, w.shape)


def csr_from_entries(
    values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR arrays of entries already in row-major order, with :func:`csr_arrays`' index types."""
    out, inp = shape
    indptr = np.zeros(out + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=out), out=indptr[1:])
    return (
        np.ascontiguousarray(values),
        np.asarray(cols).astype(narrowest_int(max(inp - 1, 0))),
        indptr.astype(narrowest_int(int(indptr[-1]))),
    )


def check_csr(
    values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int,
    out_features: int | None = None, bias: np.ndarray | None = None, where: str = OP,
) -> CsrMatrix:
    """The arrays as a :class:`CsrMatrix`, or a ModelLoadError naming ``where`` and what is wrong."""
    values = np.asarray(values).reshape(-1)
    indices = np.asarray(indices).reshape(-1).astype(np.int64)
    indptr = np.asarray(indptr).reshape(-1).astype(np.int64)
    n_out = indptr.size - 1 if out_features is None else int(out_features)
    problem = None
    if indptr.shape != (n_out + 1,) or indptr.size < 1 or indptr[0] != 0 or (np.diff(indptr) < 0).any() \
            or indptr[-1] != values.size:
        problem = f"indptr must have {n_out + 1} entries, start at 0, never decrease and end at nnz={values.size}"
    elif indices.size != values.size:
        problem = f"{indices.size} indices for {values.size} values"
    elif indices.size and (indices.min() < 0 or indices.max() >= in_features):
        problem = f"a column index is outside 0..{in_features - 1}"
    elif bias is not None and np.asarray(bias).shape != (n_out,):
        problem = f"bias has shape {list(np.asarray(bias).shape)}, expected [{n_out}]"
    if problem is not None:
        raise ModelLoadError(
            f"{where}: inconsistent CSR arrays for a {n_out}x{in_features} {OP}: {problem} (see docs/sparse-op.md)"
        )
    return CsrMatrix(values, indices, indptr, int(in_features), n_out)


def densify(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int, out_features: int) -> np.ndarray:
    """The dense ``(out_features, in_features)`` weight of (valid) CSR arrays."""
    w = np.zeros((out_features, in_features), dtype=values.dtype)
    w[np.repeat(np.arange(out_features), np.diff(np.asarray(indptr, np.int64))), np.asarray(indices, np.int64)] = values
    return w


def sparse_linear_reference(
    x: np.ndarray, values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, bias: np.ndarray | None = None,
    in_features: int | None = None,
) -> np.ndarray:
    """``Y[..., o] = sum_k values[k] * X[..., indices[k]] + bias[o]`` over row ``o`` of the CSR arrays."""
    in_features = in_features if in_features is not None else int(np.asarray(indices).max(initial=-1)) + 1
    if x.shape[-1] != in_features:
        raise DataError(f"{OP}: the input has {x.shape[-1]} features, the layer expects {in_features}")
    csr = check_csr(values, indices, indptr, in_features, bias=bias)
    y = x @ csr.to_dense().T
    return y if bias is None else y + bias


def sparse_linear_node(inputs: Sequence[str], output: str, name: str, in_features: int, out_features: int,
                       **extra: object) -> onnx.NodeProto:
    """The node: inputs ``[X, values, indices, indptr(, bias)]``, format ``csr``."""
    attrs = {"in_features": int(in_features), "out_features": int(out_features), "format": "csr", **extra}
    return helper.make_node(OP, list(inputs), [output], name=name, domain=DOMAIN, **attrs)


def is_sparse_linear(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP
