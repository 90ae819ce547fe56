"""ELL packing of a fixed sparse matrix: every row padded to the same width, ready for a TensorIR kernel.

After FPE every row of a block holds about the same number of nonzeros (each child row about
``D / alpha``), so padding rows to the widest one wastes little and gives the kernel fixed-length,
vectorisable loops. Padding entries have value 0 and column 0, so they add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.ops import check_csr


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
    """Pack a CSR matrix (``indptr`` of length ``out_features + 1``) into ELL, rows padded to the widest.

    The arrays are checked by :func:`neurorewrite.ops.check_csr` (a ModelLoadError naming ``where``)."""
    csr = check_csr(np.asarray(values, dtype=np.float32), indices, indptr, in_features, where=where)
    values, indices, indptr = csr.values, csr.indices, csr.indptr
    out_features = csr.out_features
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


@dataclass(frozen=True)
class SlicedEll:
    """Sliced ELL (SELL-C): rows in slices of ``lanes``; within a slice, entry ``k`` of each row is stored
    side by side (``values[ptr[s] + k, lane]``), so one vector load reads one entry of ``lanes`` rows.

    Each slice is padded only to its own widest row; rows past ``out_features`` (the last slice) are empty.
    """

    values: np.ndarray  # (stored, lanes) float32
    indices: np.ndarray  # (stored, lanes) int16 or int32
    slice_ptr: np.ndarray  # (slices + 1,) int32: slice s is values[slice_ptr[s]:slice_ptr[s+1]]
    in_features: int
    out_features: int

    @property
    def lanes(self) -> int:
        return int(self.values.shape[1])

    @property
    def slices(self) -> int:
        return int(self.slice_ptr.size - 1)

    def to_dense(self) -> np.ndarray:
        dense = np.zeros((self.slices * self.lanes, self.in_features), dtype=np.float32)
        slot_slice = np.repeat(np.arange(self.slices), np.diff(self.slice_ptr))
        rows = slot_slice[:, None] * self.lanes + np.arange(self.lanes)[None, :]
        np.add.at(dense, (rows.reshape(-1), self.indices.reshape(-1).astype(np.int64)), self.values.reshape(-1))
        return dense[: self.out_features]


def sliced_ell_from_csr(
    values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int, lanes: int,
    where: str = "SparseLinear",
) -> SlicedEll:
    """Pack a CSR matrix into :class:`SlicedEll` with ``lanes`` rows per slice (checked like :func:`ell_from_csr`)."""
    ell = ell_from_csr(values, indices, indptr, in_features, where)  # validates; rows padded to the global width
    counts = np.diff(np.asarray(indptr).reshape(-1).astype(np.int64))
    slices = -(-ell.out_features // lanes)
    padded_counts = np.zeros(slices * lanes, dtype=np.int64)
    padded_counts[: counts.size] = counts
    widths = padded_counts.reshape(slices, lanes).max(axis=1)
    slice_ptr = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    sell_values = np.zeros((int(slice_ptr[-1]), lanes), dtype=np.float32)
    sell_indices = np.zeros((int(slice_ptr[-1]), lanes), dtype=ell.indices.dtype)
    rows = np.repeat(np.arange(ell.out_features), counts)
    slots = np.arange(rows.size) - np.repeat(np.asarray(indptr).reshape(-1)[:-1].astype(np.int64), counts)
    position = slice_ptr[rows // lanes] + slots
    sell_values[position, rows % lanes] = ell.values[rows, slots]
    sell_indices[position, rows % lanes] = ell.indices[rows, slots]
    return SlicedEll(sell_values, sell_indices, slice_ptr, in_features, ell.out_features)
