"""ELL packing of a fixed sparse matrix: every row padded to the same width, ready for a TensorIR kernel.

After FPE every row of a block holds about the same number of nonzeros (each child row about
``D / alpha``), so padding rows to the widest one wastes little and gives the kernel fixed-length,
vectorisable loops. Padding entries have value 0 and column 0, so they add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.errors import InvalidOptionError


@dataclass(frozen=True)
class EllMatrix:
    """``values[o, j] * x[indices[o, j]]`` summed over ``j`` gives row ``o`` of ``W x``."""

    values: np.ndarray  # (out_features, width) float32
    indices: np.ndarray  # (out_features, width) int16 or int32 column indices
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.values.shape[0])

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    @property
    def padding(self) -> float:
        """Fraction of stored entries that are padding (0 for perfectly balanced rows)."""
        stored = self.values.size
        return 0.0 if stored == 0 else float(np.mean(self.values == 0))

    def transposed(self) -> EllMatrix:
        """The same matrix with (width, out_features) arrays, the layout of the row-vector kernel."""
        return EllMatrix(np.ascontiguousarray(self.values.T), np.ascontiguousarray(self.indices.T), self.in_features)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros((self.out_features, self.in_features), dtype=np.float32)
        rows = np.repeat(np.arange(self.out_features), self.width)
        np.add.at(dense, (rows, self.indices.reshape(-1).astype(np.int64)), self.values.reshape(-1))
        return dense


def index_dtype(in_features: int) -> str:
    """The narrowest signed integer type that holds every column index (fewer bytes to stream)."""
    return "int16" if in_features <= np.iinfo(np.int16).max + 1 else "int32"


def ell_from_csr(
    values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int, where: str = "SparseLinear"
) -> EllMatrix:
    """Pack a CSR matrix (``indptr`` of length ``out_features + 1``) into ELL, rows padded to the widest."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    indices = np.asarray(indices).reshape(-1).astype(np.int64)
    indptr = np.asarray(indptr).reshape(-1).astype(np.int64)
    if indptr.size < 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != values.size:
        raise InvalidOptionError(f"{where}: indptr must start at 0, never decrease and end at nnz={values.size}")
    if indices.size != values.size:
        raise InvalidOptionError(f"{where}: {indices.size} indices for {values.size} values")
    if indices.size and (indices.min() < 0 or indices.max() >= in_features):
        raise InvalidOptionError(f"{where}: a column index is outside 0..{in_features - 1}")
    out_features = indptr.size - 1
    counts = np.diff(indptr)
    width = max(int(counts.max(initial=0)), 1)
    rows = np.repeat(np.arange(out_features), counts)
    slots = np.arange(values.size) - np.repeat(indptr[:-1], counts)
    ell_values = np.zeros((out_features, width), dtype=np.float32)
    ell_indices = np.zeros((out_features, width), dtype=index_dtype(in_features))
    ell_values[rows, slots] = values
    ell_indices[rows, slots] = indices
    return EllMatrix(ell_values, ell_indices, in_features)


def ell_from_dense(weight: np.ndarray) -> EllMatrix:
    """Pack the nonzeros of a dense ``(out, in)`` weight (the pattern is whatever is nonzero)."""
    weight = np.asarray(weight, dtype=np.float32)
    mask = weight != 0
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    cols = np.nonzero(mask)[1]
    return ell_from_csr(weight[mask], cols, indptr, weight.shape[1])
