"""The batched sparse-linear kernel on CPU: column-blocked ELL, register tiles of rows x batch, any batch.

Activations are feature-major (``XT`` of shape ``(in_features, n)``, ``YT`` of ``(out_features, n)``,
:mod:`neurorewrite.kernels.feature_major`): every stored nonzero multiplies one contiguous row of
``XT``, vectorised over the batch. The input columns are cut into blocks of ``column_block`` (so the
``XT`` rows a block reads stay in L1); within a block each tile of ``rows`` output rows (padded only
to its widest row in that block) accumulates ``vectors`` SIMD vectors of the batch in registers. The
output tile is read and written once per column block, the bias loaded by the first block.

Which tile runs is chosen per machine by measurement (:mod:`neurorewrite.kernels.measure`): the
accumulators (``rows x vectors``) must hide the FMA latency yet fit the register file (16 vector
registers with AVX2, 32 with AVX-512), and the best shape differs between CPUs. The batch is
symbolic: full tiles, then single-vector tiles, then a scalar tail for ``n`` not a multiple of the
vector width, so one compiled function serves every batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from neurorewrite.kernels.choice import Candidate, SparseLinearTask, register_kernel, simd_lanes
from neurorewrite.kernels.ell import index_dtype as narrowest_index_dtype

CHUNKS = 16  # parallel work items (row-tile ranges); TVM's pool spreads them over its threads
MIN_ROWS = 8  # below this batch the small-batch kernels are cheaper everywhere measured


@dataclass(frozen=True)
class Tile:
    """A register tile: ``rows`` output rows x ``vectors`` SIMD vectors of ``lanes`` batch columns."""

    rows: int
    vectors: int
    lanes: int
    column_block: int = 256

    @property
    def batch(self) -> int:
        return self.vectors * self.lanes

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.batch}/{self.column_block}"


@dataclass(frozen=True)
class BlockedEll:
    """Tile ``t = block * row_tiles + row_tile`` is ``values[ptr[t]:ptr[t+1], :]`` (one column per tile row)."""

    values: np.ndarray  # (stored, rows) float32
    indices: np.ndarray  # (stored, rows) int16/int32 absolute column indices
    tile_ptr: np.ndarray  # (blocks * row_tiles + 1,) int32
    in_features: int
    out_features: int
    rows: int
    column_block: int

    @property
    def row_tiles(self) -> int:
        return -(-self.out_features // self.rows)

    @property
    def blocks(self) -> int:
        return -(-self.in_features // self.column_block)

    @property
    def stored(self) -> int:
        return int(self.values.shape[0])


def blocked_ell_from_csr(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int,
                         index_type: str, rows: int = 4, column_block: int = 256) -> BlockedEll:
    """Pack a (validated) CSR matrix; entries keep CSR order within a row and block."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    cols = np.asarray(indices).reshape(-1).astype(np.int64)
    indptr = np.asarray(indptr).reshape(-1).astype(np.int64)
    out_features = indptr.size - 1
    row_tiles, blocks = -(-out_features // rows), -(-in_features // column_block)
    row = np.repeat(np.arange(out_features), np.diff(indptr))
    block = cols // column_block
    key = row * blocks + block  # non-decreasing: CSR is row-major with ascending columns
    counts = np.bincount(key, minlength=out_features * blocks).reshape(out_features, blocks)
    rank = np.arange(key.size) - np.searchsorted(key, key, side="left")
    padded = np.zeros((row_tiles * rows, blocks), dtype=np.int64)
    padded[:out_features] = counts
    widths = padded.reshape(row_tiles, rows, blocks).max(axis=1).T.reshape(-1)  # block-major tiles
    tile_ptr = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    slot = tile_ptr[block * row_tiles + row // rows] + rank
    out_values = np.zeros((max(int(tile_ptr[-1]), 1), rows), dtype=np.float32)
    out_indices = np.zeros((max(int(tile_ptr[-1]), 1), rows), dtype=index_type)
    out_values[slot, row % rows] = values
    out_indices[slot, row % rows] = cols
    return BlockedEll(out_values, out_indices, tile_ptr, in_features, out_features, rows, column_block)


def blocked_rows_func(ell: BlockedEll, tile: Tile, n: int | None = None) -> tvm.tirx.PrimFunc:
    """PrimFunc(XT (in, n), V, I, tile_ptr, bias (out,), YT (out, n)); ``n`` None: symbolic.

    Row tiles are split into :data:`CHUNKS` contiguous chunks run in parallel, each walking every
    column block over its own tiles: one fork-join per call, and a chunk reuses each XT block
    across its tiles.
    """
    if ell.rows != tile.rows or ell.column_block != tile.column_block:
        raise ValueError(f"packing {ell.rows}/{ell.column_block} does not match tile {tile.label}")
    d, out, stored, tiles, blocks = ell.in_features, ell.out_features, ell.stored, ell.row_tiles, ell.blocks
    rows, lanes, vectors = tile.rows, tile.lanes, tile.vectors
    bt, index_dtype = tile.batch, str(ell.indices.dtype)
    vec = f"float32x{lanes}"
    chunks = min(CHUNKS, tiles)
    per_chunk = -(-tiles // chunks)
    N = tvm.tirx.Var("n", "int64") if n is None else n  # noqa: N806 (a TVMScript shape)

    @T.macro
    def tile_pass(XT, V, I, P, B, YT, t, blk, base, nv):  # noqa: ANN001, N803
        acc = T.alloc_buffer((rows, nv * lanes), "float32", scope="local")
        for r in T.unroll(rows):
            for v in T.unroll(nv):
                if blk == 0:
                    acc[r, T.ramp(v * lanes, 1, lanes)] = T.broadcast(B[T.min(t * rows + r, out - 1)], lanes)
                else:
                    acc[r, T.ramp(v * lanes, 1, lanes)] = YT.vload([T.min(t * rows + r, out - 1), base + v * lanes], vec)
        for k in range(P[blk * tiles + t], P[blk * tiles + t + 1]):
            for r in T.unroll(rows):
                for v in T.unroll(nv):
                    acc[r, T.ramp(v * lanes, 1, lanes)] = acc.vload([r, v * lanes], vec) + T.broadcast(
                        V[k, r], lanes) * XT.vload([T.Cast("int64", I[k, r]), base + v * lanes], vec)
        for r in T.unroll(rows):
            if t * rows + r < out:
                for v in T.unroll(nv):
                    YT[t * rows + r, T.ramp(base + v * lanes, 1, lanes)] = acc.vload([r, v * lanes], vec)

    @T.prim_func(private=True)
    def func(
        XT: T.Buffer((d, N), "float32"), V: T.Buffer((stored, rows), "float32"),
        I: T.Buffer((stored, rows), index_dtype), P: T.Buffer((blocks * tiles + 1,), "int32"),
        B: T.Buffer((out,), "float32"), YT: T.Buffer((out, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for c in T.parallel(chunks):
            for blk, tt in T.grid(blocks, per_chunk):
                if c * per_chunk + tt < tiles:
                    # the tile's weights of this block stay in L1 across the batch tiles
                    for b0 in range(N // bt):
                        tile_pass(XT, V, I, P, B, YT, c * per_chunk + tt, blk, b0 * bt, vectors)
                    for b0 in range(N % bt // lanes):
                        tile_pass(XT, V, I, P, B, YT, c * per_chunk + tt, blk, N // bt * bt + b0 * lanes, 1)
                    for b in range(N % lanes):  # the scalar tail
                        t = c * per_chunk + tt
                        col = N // lanes * lanes + b
                        acc = T.alloc_buffer((rows,), "float32", scope="local")
                        for r in T.unroll(rows):
                            acc[r] = T.if_then_else(blk == 0, B[T.min(t * rows + r, out - 1)],
                                                    YT[T.min(t * rows + r, out - 1), col])
                        for k in range(P[blk * tiles + t], P[blk * tiles + t + 1]):
                            for r in T.unroll(rows):
                                acc[r] = acc[r] + V[k, r] * XT[T.Cast("int64", I[k, r]), col]
                        for r in T.unroll(rows):
                            if t * rows + r < out:
                                YT[t * rows + r, col] = acc[r]

    return func


def tiles_for(lanes: int) -> list[Tile]:
    """The register tiles worth timing for a SIMD width: 4 to 16 accumulators, leaving registers free."""
    registers = 32 if lanes >= 16 else 16
    shapes = [(1, 4), (2, 2), (2, 4), (4, 1), (4, 2), (3, 4), (4, 3), (4, 4), (8, 2)]
    return [Tile(r, v, lanes) for r, v in shapes if 4 <= r * v <= registers - 4 and (r * v <= 8 or registers == 32)]


@register_kernel("column-blocked ELL")
def blocked_candidates(task: SparseLinearTask) -> list[Candidate]:
    """Every register tile of the target's SIMD width (CPU only)."""
    if not task.cpu:
        return []
    lanes = simd_lanes(task.target)
    index_type = narrowest_index_dtype(task.in_features)
    out = []
    for tile in tiles_for(lanes):
        def pack(tile: Tile = tile) -> tuple[tvm.tirx.PrimFunc, list[np.ndarray]]:
            ell = blocked_ell_from_csr(task.values, task.indices, task.indptr, task.in_features, index_type,
                                       tile.rows, tile.column_block)
            return blocked_rows_func(ell, tile), [ell.values, ell.indices, ell.tile_ptr, task.dense_bias()]

        def estimate(n: int, tile: Tile = tile) -> float:
            # ns: 2 FMAs-worth of loads per vector per nonzero, a tile pads ~15%, half speed below 8 rows
            vectors = -(-n // tile.lanes)
            return task.nonzeros * 1.15 * vectors * 0.25 * (1.0 if n >= MIN_ROWS else 2.0) / (tile.rows * tile.vectors) ** 0.1
        out.append(Candidate("column-blocked ELL", tile.label, pack, estimate))
    return out
