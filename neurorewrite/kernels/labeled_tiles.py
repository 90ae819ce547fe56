"""The small-batch kernel for FPE children on CPU: dense parent tiles with child labels, no gathers.

Rows ``j*alpha .. j*alpha+alpha-1`` of an expanded first linear W1' are the children of parent ``j``,
and their inputs are disjoint. Collapsed, all their nonzeros fit one row of an ``(H, D)`` matrix, with
an ``int8`` label per entry naming the child it belongs to (a pruned entry is a zero with any label).
The kernel streams that matrix in tiles of ``lanes`` parents, stored input-major so one vector load
reads input ``i`` of ``lanes`` parents; it multiplies by the broadcast ``x[i]`` and adds the product into
the accumulator of each child under the label's mask. That trades the sliced-ELL kernel's hardware
gather per nonzero (the bottleneck on AMD Zen: about 0.45 ns each, ``benchmarks/kernels.py``) for
``alpha`` masked adds per stored entry, and reads 5 bytes per entry instead of 6 per nonzero plus padding.
With ``alpha == 1`` (any sparse layer, no labels) it is a plain dense GEMV over the zero-filled matrix.

Which kernel a layer gets is decided by :func:`prefer_labeled` from the measured costs below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from neurorewrite.kernels.choice import KernelPlan, SparseLinearTask, emit_narrow, register_kernel
from neurorewrite.kernels.gather_gemv import gather_lanes
from neurorewrite.kernels.sparse_linear import ROWS_LAYOUT_MIN

LANES = 32  # two AVX-512 vectors (four AVX2) of parents per tile: independent FMA chains
# Per-entry costs on the 2-core AMD EPYC (Zen 4) CI machine (``benchmarks/kernels.py``), relative to one
# streamed entry of the alpha=1 kernel (0.045 ns at batch 1, L3-resident): a gathered nonzero about 10
# (0.42-0.46 ns), a labeled entry about 0.65*alpha (0.114 ns at alpha 4).
_GATHER_COST = 10.0
_LABEL_COST = 0.65
_MAX_ACCUMULATORS = 16  # vector registers kept for accumulators (of 32 with AVX-512)
# The costs above hold while the tiles stay in the last-level cache (32 MiB here); a layer whose
# zero-filled tiles are larger streams them from memory, where a gathered nonzero is cheaper.
_MAX_TILE_BYTES = 16 << 20


@dataclass(frozen=True)
class LabeledTiles:
    """``values[t, i, l]``: the weight of input ``i`` in parent ``t*lanes + l``; ``labels`` the child (or
    None when ``alpha == 1``); ``bias[t, k, l]`` the bias of that parent's child ``k``."""

    values: np.ndarray  # (tiles, in_features, lanes) float32
    labels: np.ndarray | None  # (tiles, in_features, lanes) int8
    bias: np.ndarray  # (tiles, alpha, lanes) float32
    alpha: int
    out_features: int  # rows of the layer: alpha * parents

    @property
    def tiles(self) -> int:
        return int(self.values.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.values.shape[1])

    @property
    def rows(self) -> int:
        """Output rows the kernel writes (``out_features`` plus padding parents)."""
        return self.tiles * LANES * self.alpha


def prefer_labeled(nnz: int, parents: int, in_features: int, alpha: int) -> bool:
    """Whether streaming the ``parents x in_features`` tiles costs less than gathering ``nnz`` entries."""
    entries = parents * in_features
    if entries * (4 if alpha == 1 else 5) > _MAX_TILE_BYTES:
        return False
    per_entry = 1.0 if alpha == 1 else _LABEL_COST * alpha
    return entries * per_entry < nnz * _GATHER_COST


def labeled_tiles_from_csr(
    values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int, alpha: int,
    bias: np.ndarray | None = None,
) -> LabeledTiles | None:
    """Pack a CSR layer whose rows are ``alpha`` children per parent; None if two siblings share an input."""
    rows = indptr.size - 1
    if rows % alpha:
        return None
    counts = np.diff(indptr.astype(np.int64))
    row = np.repeat(np.arange(rows), counts)
    parent, child, col = row // alpha, row % alpha, indices.astype(np.int64)
    parents = rows // alpha
    if alpha > 1 and np.unique(parent * in_features + col).size != col.size:
        return None
    tiles = -(-parents // LANES)
    dense = np.zeros((tiles * LANES, in_features), dtype=np.float32)
    dense[parent, col] = values
    tiled = np.ascontiguousarray(dense.reshape(tiles, LANES, in_features).transpose(0, 2, 1))
    labels = None
    if alpha > 1:
        lab = np.zeros((tiles * LANES, in_features), dtype=np.int8)
        lab[parent, col] = child
        labels = np.ascontiguousarray(lab.reshape(tiles, LANES, in_features).transpose(0, 2, 1))
    b = np.zeros((tiles * LANES, alpha), dtype=np.float32)
    if bias is not None:
        b[:parents] = np.asarray(bias, dtype=np.float32).reshape(parents, alpha)
    return LabeledTiles(tiled, labels, np.ascontiguousarray(b.reshape(tiles, LANES, alpha).transpose(0, 2, 1)),
                        alpha, rows)


def labeled_gemv_func(n: int, tiles: LabeledTiles, vector: int) -> tvm.tirx.PrimFunc:
    """``Y[b, j*alpha + k] = bias + sum_i X[b, i] * values[j, i] * (labels[j, i] == k)``.

    PrimFunc(X (n, in), values, [labels,] bias, Y (n, rows)); ``vector`` is the SIMD width in floats.
    Rows of ``batch_block`` samples share one pass over a tile, so the weights stream once per block.
    """
    alpha, d, count = tiles.alpha, tiles.in_features, tiles.tiles
    per_sample = alpha * (LANES // vector)
    block = max(1, min(n, _MAX_ACCUMULATORS // per_sample))
    blocks = -(-n // block)
    vec = f"float32x{LANES}"
    zero = T.broadcast(T.float32(0), LANES)
    width = count * LANES * alpha

    if alpha == 1:
        @T.prim_func(private=True)
        def dense(X: T.Buffer((n, d), "float32"), V: T.Buffer((count, d, LANES), "float32"),
                  B: T.Buffer((count, 1, LANES), "float32"), Y: T.Buffer((n, width), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for t in T.parallel(count):
                for bo in range(blocks):
                    acc = T.alloc_buffer((block, LANES), "float32", scope="local")
                    for bi in T.unroll(block):
                        acc[bi, T.ramp(0, 1, LANES)] = B.vload([t, 0, 0], vec)
                    for i in range(d):
                        w = V.vload([t, i, 0], vec)
                        for bi in T.unroll(block):
                            if bo * block + bi < n:
                                acc[bi, T.ramp(0, 1, LANES)] = acc.vload([bi, 0], vec) + T.broadcast(
                                    X[bo * block + bi, i], LANES) * w
                    for bi in T.unroll(block):
                        if bo * block + bi < n:
                            Y[bo * block + bi, T.ramp(t * LANES, 1, LANES)] = acc.vload([bi, 0], vec)

        return dense

    @T.prim_func(private=True)
    def labeled(X: T.Buffer((n, d), "float32"), V: T.Buffer((count, d, LANES), "float32"),
                L: T.Buffer((count, d, LANES), "int8"), B: T.Buffer((count, alpha, LANES), "float32"),
                Y: T.Buffer((n, width), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for t in T.parallel(count):
            for bo in range(blocks):
                acc = T.alloc_buffer((block, alpha, LANES), "float32", scope="local")
                for bi in T.unroll(block):
                    for k in T.unroll(alpha):
                        acc[bi, k, T.ramp(0, 1, LANES)] = B.vload([t, k, 0], vec)
                for i in range(d):
                    w = V.vload([t, i, 0], vec)
                    lab = L.vload([t, i, 0], f"int8x{LANES}")
                    for bi in T.unroll(block):
                        if bo * block + bi < n:
                            prod = T.broadcast(X[bo * block + bi, i], LANES) * w
                            for k in T.unroll(alpha):
                                acc[bi, k, T.ramp(0, 1, LANES)] = acc.vload([bi, k, 0], vec) + T.Select(
                                    lab == T.broadcast(T.int8(k), LANES), prod, zero)
                for bi in T.unroll(block):
                    if bo * block + bi < n:
                        for lane in range(LANES):
                            for k in T.unroll(alpha):
                                Y[bo * block + bi, (t * LANES + lane) * alpha + k] = acc[bi, k, lane]

    return labeled


@register_kernel("labeled tiles", priority=20)
def plan_labeled_tiles(task: SparseLinearTask) -> KernelPlan | None:
    """Below 8 rows on a CPU: dense parent tiles when they beat gathering the nonzeros (rows read as
    the model's FPE children when siblings have disjoint inputs, else as plain rows), bias inside."""
    if not task.cpu or task.rows >= ROWS_LAYOUT_MIN:
        return None
    for alpha in dict.fromkeys((task.alpha, 1)):
        parents = task.out_features // alpha
        if task.out_features % alpha or not prefer_labeled(task.nonzeros, parents, task.in_features, alpha):
            continue
        tiles = labeled_tiles_from_csr(task.values, task.indices, task.indptr, task.in_features, alpha, task.bias)
        if tiles is not None:
            return KernelPlan(f"labeled tiles x{alpha}" if alpha > 1 else "dense tiles", _emitter(task, tiles))
    return None


def _emitter(task: SparseLinearTask, tiles: LabeledTiles) -> Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]:
    vector = gather_lanes(task.target) or 4  # the SIMD width in floats

    def emit(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        gv = bb.add_func(labeled_gemv_func(task.rows, tiles, vector), "labeled_tiles_linear")
        arrays = [tiles.values] + ([] if tiles.labels is None else [tiles.labels]) + [tiles.bias]
        y = bb.emit(relax.call_tir(gv, [x, *(relax.const(a) for a in arrays)],
                                   relax.TensorType((task.rows, tiles.rows), "float32")))
        return emit_narrow(bb, y, task.rows, task.out_features, (task.rows, tiles.rows))

    return emit
