"""Row blocks: a sparse layer whose leading rows are dense-enough and whose other rows are nearly empty
runs as two layers, each with its own kernel, their outputs stacked.

After calibration and the fold of constant children (:mod:`neurorewrite.passes.fold_constant`, which
puts the longest rows first) an FPE first layer is a block of lead children, each with about 3/4 of
its parent's inputs, above thousands of children with a handful each. One kernel for both is a bad
fit: dense tiles stream the zeros of the sparse rows (on the 768 -> 3072 FFN: 24 MB instead of
9.4 MB), and an ELL kernel pads every row of a block to the longest. Split at the end of the dense
prefix, each block gets the candidate the choice measures fastest for it.
"""

from __future__ import annotations

import numpy as np

from neurorewrite.kernels.choice import SparseLinearTask

DENSE_ROW = 1 / 4  # a row at least this full runs well in dense tiles (labeled_tiles.MIN_DENSITY)
SPARSE_REST = 1 / 16  # the rows after the prefix must be at most this full on average to be worth a block
MIN_BLOCK_ROWS = 64  # a smaller block costs more in an extra kernel call than it saves


def dense_prefix(indptr: np.ndarray, in_features: int) -> int:
    """The number of leading rows to run as their own block (0: keep the layer whole)."""
    lengths = np.diff(np.asarray(indptr, dtype=np.int64))
    dense = lengths >= DENSE_ROW * in_features
    prefix = int(dense.size if dense.all() else np.argmin(dense))
    rest = lengths[prefix:]
    if prefix < MIN_BLOCK_ROWS or rest.size < MIN_BLOCK_ROWS:
        return 0
    return prefix if rest.sum() < SPARSE_REST * rest.size * in_features else 0


def row_block(task: SparseLinearTask, start: int, stop: int, name: str) -> SparseLinearTask:
    """Rows ``start .. stop - 1`` of ``task`` as a layer of their own."""
    indptr = np.asarray(task.indptr, dtype=np.int64)
    first, last = int(indptr[start]), int(indptr[stop])
    bias = None if task.bias is None else np.asarray(task.bias).reshape(-1)[start:stop]
    return SparseLinearTask(name, task.in_features, stop - start, task.values[first:last], task.indices[first:last],
                            indptr[start:stop + 1] - first, bias, task.alpha, task.target)
