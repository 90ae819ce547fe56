"""The batched sparse-linear kernel on CPU: column-blocked sliced ELL, the input block kept in L1.

With ``XT`` of shape ``(in_features, n)`` every stored nonzero multiplies one contiguous row of ``XT``
(vectorised over the batch). Unblocked, those rows are gathered from all of ``XT`` (1.5 MB for 12288
inputs x 32), so each nonzero costs a 128-byte L2 -> L1 transfer and the kernel is L2-bound. Here the
input columns are cut into blocks of :data:`COLUMN_BLOCK` (32 KB of ``XT`` at batch 32): the outer loop
walks the blocks, and within a block each tile of :data:`ROW_TILE` output rows (padded only to its
widest row in that block) accumulates its batch tile in registers. The output tile is read and written
once per column block (bias at the start), cheap next to the nonzeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.script import tirx as T

from neurorewrite.kernels.choice import KernelPlan, SparseLinearTask, emit_narrow, register_kernel
from neurorewrite.kernels.ell import index_dtype as narrowest_index_dtype
from neurorewrite.kernels.sparse_linear import ROWS_LAYOUT_MIN
from neurorewrite.kernels.transpose import emit_transpose

COLUMN_BLOCK = 256  # 32 KB of XT at batch 32; 128 pads more (21% vs 14% on the FFN) for no speed-up
ROW_TILE = 4
LANES = 16
CHUNKS = 8  # parallel work items; TVM's pool spreads them over its threads


@dataclass(frozen=True)
class BlockedEll:
    """Tile ``t = block * row_tiles + row_tile`` is ``values[ptr[t]:ptr[t+1], :]`` (one column per tile row)."""

    values: np.ndarray  # (stored, ROW_TILE) float32
    indices: np.ndarray  # (stored, ROW_TILE) int16/int32 absolute column indices
    tile_ptr: np.ndarray  # (blocks * row_tiles + 1,) int32
    in_features: int
    out_features: int

    @property
    def row_tiles(self) -> int:
        return -(-self.out_features // ROW_TILE)

    @property
    def blocks(self) -> int:
        return -(-self.in_features // COLUMN_BLOCK)


def blocked_ell_from_csr(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int,
                         index_type: str) -> BlockedEll:
    """Pack a (validated) CSR matrix; entries keep CSR order within a row and block."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    cols = np.asarray(indices).reshape(-1).astype(np.int64)
    indptr = np.asarray(indptr).reshape(-1).astype(np.int64)
    out_features = indptr.size - 1
    row_tiles, blocks = -(-out_features // ROW_TILE), -(-in_features // COLUMN_BLOCK)
    rows = np.repeat(np.arange(out_features), np.diff(indptr))
    block = cols // COLUMN_BLOCK
    key = rows * blocks + block  # non-decreasing: CSR is row-major with ascending columns
    counts = np.bincount(key, minlength=out_features * blocks).reshape(out_features, blocks)
    rank = np.arange(key.size) - np.searchsorted(key, key, side="left")
    padded = np.zeros((row_tiles * ROW_TILE, blocks), dtype=np.int64)
    padded[:out_features] = counts
    widths = padded.reshape(row_tiles, ROW_TILE, blocks).max(axis=1).T.reshape(-1)  # block-major tiles
    tile_ptr = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    slot = tile_ptr[block * row_tiles + rows // ROW_TILE] + rank
    out_values = np.zeros((int(tile_ptr[-1]), ROW_TILE), dtype=np.float32)
    out_indices = np.zeros((int(tile_ptr[-1]), ROW_TILE), dtype=index_type)
    out_values[slot, rows % ROW_TILE] = values
    out_indices[slot, rows % ROW_TILE] = cols
    return BlockedEll(out_values, out_indices, tile_ptr, in_features, out_features)


def padded_rows(n: int) -> int:
    """The batch the kernel runs for ``n`` rows: the next multiple of :data:`LANES` (zero rows appended)."""
    return -(-n // LANES) * LANES


def batch_tile(n: int) -> int:
    """Batch columns held in registers per tile (ROW_TILE x batch_tile/16 vector accumulators); 0 = unsupported."""
    return 32 if n % 32 == 0 else LANES if n % LANES == 0 else 0


def blocked_rows_func(n: int, ell: BlockedEll) -> tvm.tirx.PrimFunc:
    """PrimFunc(XT (in, n), V, I, tile_ptr, bias (row_tiles*ROW_TILE,), YT (row_tiles*ROW_TILE, n)).

    Row tiles are split into :data:`CHUNKS` contiguous chunks run in parallel, each walking every
    column block over its own tiles: one fork-join per call (a barrier per block cost milliseconds
    each on a busy machine), and a chunk still reuses each XT block across its tiles.
    """
    d, stored, tiles, blocks = ell.in_features, ell.values.shape[0], ell.row_tiles, ell.blocks
    out, bt, index_dtype = tiles * ROW_TILE, batch_tile(n), str(ell.indices.dtype)
    vec, vectors = f"float32x{LANES}", batch_tile(n) // LANES
    chunks = min(CHUNKS, tiles)
    per_chunk = -(-tiles // chunks)

    @T.prim_func(private=True)
    def func(
        XT: T.Buffer((d, n), "float32"), V: T.Buffer((stored, ROW_TILE), "float32"),
        I: T.Buffer((stored, ROW_TILE), index_dtype), P: T.Buffer((blocks * tiles + 1,), "int32"),
        B: T.Buffer((out,), "float32"), YT: T.Buffer((out, n), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for c in T.parallel(chunks):
            for tt, r, b in T.grid(per_chunk, ROW_TILE, n):
                if c * per_chunk + tt < tiles:
                    YT[(c * per_chunk + tt) * ROW_TILE + r, b] = B[(c * per_chunk + tt) * ROW_TILE + r]
            for b0, blk, tt in T.grid(n // bt, blocks, per_chunk):
                if c * per_chunk + tt < tiles:
                    acc = T.alloc_buffer((ROW_TILE, bt), "float32", scope="local")
                    t = c * per_chunk + tt
                    for r in T.unroll(ROW_TILE):
                        for v in T.unroll(vectors):
                            acc[r, T.ramp(v * LANES, 1, LANES)] = YT.vload([t * ROW_TILE + r, b0 * bt + v * LANES], vec)
                    for k in range(P[blk * tiles + t], P[blk * tiles + t + 1]):
                        for r in T.unroll(ROW_TILE):
                            for v in T.unroll(vectors):
                                acc[r, T.ramp(v * LANES, 1, LANES)] = acc.vload([r, v * LANES], vec) + T.broadcast(
                                    V[k, r], LANES
                                ) * XT.vload([T.Cast("int32", I[k, r]), b0 * bt + v * LANES], vec)
                    for r in T.unroll(ROW_TILE):
                        for v in T.unroll(vectors):
                            YT[t * ROW_TILE + r, T.ramp(b0 * bt + v * LANES, 1, LANES)] = acc.vload([r, v * LANES], vec)

    return func


@register_kernel("column-blocked ELL", priority=10)
def plan_blocked_rows(task: SparseLinearTask) -> KernelPlan | None:
    """8 rows or more on a CPU: the rows are padded with zeros to the kernel's batch tile (a multiple
    of 16), the input transposed in and the output transposed back, the padding sliced off."""
    if not task.cpu or task.rows < ROWS_LAYOUT_MIN:
        return None
    ell = blocked_ell_from_csr(task.values, task.indices, task.indptr, task.in_features, narrowest_index_dtype(task.in_features))

    def emit(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        rows, out = padded_rows(task.rows), ell.row_tiles * ROW_TILE
        gv = bb.add_func(blocked_rows_func(rows, ell), "blocked_ell_linear")
        if rows != task.rows:
            zeros = relax.const(np.zeros((rows - task.rows, task.in_features), dtype=np.float32))
            x = bb.emit(relax.op.concat([x, zeros], axis=0))
        xt = emit_transpose(bb, x, rows, task.in_features)
        consts = [relax.const(a) for a in (ell.values, ell.indices, ell.tile_ptr, task.padded_bias(out))]
        yt = bb.emit(relax.call_tir(gv, [xt, *consts], relax.TensorType((out, rows), "float32")))
        y = emit_transpose(bb, yt, out, rows)
        return emit_narrow(bb, y, task.rows, task.out_features, (rows, out))

    return KernelPlan("column-blocked ELL", emit)
