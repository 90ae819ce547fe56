"""The batched sparse-linear kernel on CPU: column-blocked ELL, register tiles of rows x batch, any batch.

Activations are feature-major (``XT`` of shape ``(in_features, n)``, ``YT`` of ``(out_features, n)``,
:mod:`neurorewrite.kernels.transpose`): every stored nonzero multiplies one contiguous row of
``XT``, vectorised over the batch. With ``group`` G > 1 an entry is a run of G consecutive columns
with one index (an untied FPE second layer: a calibrated or fine-tuned model keeps each parent's
``alpha`` child columns together, so they are read as one 1 x alpha block). The input columns are cut into blocks of ``column_block`` (so the
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
MIN_GROUP_FILL = 0.9  # grouped entries only where runs of alpha columns are this full


@dataclass(frozen=True)
class Tile:
    """A register tile: ``rows`` output rows x ``vectors`` SIMD vectors of ``lanes`` batch columns; an
    entry covers ``group`` consecutive input columns."""

    rows: int
    vectors: int
    lanes: int
    column_block: int = 256
    group: int = 1

    @property
    def batch(self) -> int:
        return self.vectors * self.lanes

    @property
    def label(self) -> str:
        return f"{self.rows}x{self.batch}/{self.column_block}" + (f" g{self.group}" if self.group > 1 else "")


@dataclass(frozen=True)
class BlockedEll:
    """Tile ``t = block * row_tiles + row_tile`` is ``values[ptr[t]:ptr[t+1], :]`` (one column per tile row)."""

    values: np.ndarray  # (stored, rows, group) float32
    indices: np.ndarray  # (stored, rows) int16/int32 absolute index of the entry's first column / group
    tile_ptr: np.ndarray  # (blocks * row_tiles + 1,) int32
    in_features: int
    out_features: int
    rows: int
    column_block: int
    group: int = 1

    @property
    def row_tiles(self) -> int:
        return -(-self.out_features // self.rows)

    @property
    def blocks(self) -> int:
        return -(-self.in_features // self.column_block)

    @property
    def stored(self) -> int:
        return int(self.values.shape[0])


def grouped_fill(indices: np.ndarray, indptr: np.ndarray, group: int) -> float:
    """Nonzeros / stored slots when entries are runs of ``group`` columns (1.0: every run complete)."""
    cols = np.asarray(indices).reshape(-1).astype(np.int64)
    row = np.repeat(np.arange(indptr.size - 1), np.diff(np.asarray(indptr).astype(np.int64)))
    key = row * (int(cols.max(initial=0)) // group + 1) + cols // group
    runs = int(np.count_nonzero(np.diff(key)) + 1) if key.size else 0
    return cols.size / max(1, runs * group)


def _slots(row: np.ndarray, block: np.ndarray, out_features: int, blocks: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tile_ptr, slot)``: tiles block-major, each padded to its widest row in that block; entries
    (sorted by row, then block) keep their order within a row and block."""
    row_tiles = -(-out_features // rows)
    key = row * blocks + block  # non-decreasing: CSR is row-major with ascending columns
    counts = np.bincount(key, minlength=out_features * blocks).reshape(out_features, blocks)
    rank = np.arange(key.size) - np.searchsorted(key, key, side="left")
    padded = np.zeros((row_tiles * rows, blocks), dtype=np.int64)
    padded[:out_features] = counts
    widths = padded.reshape(row_tiles, rows, blocks).max(axis=1).T.reshape(-1)  # block-major tiles
    tile_ptr = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    return tile_ptr, tile_ptr[block * row_tiles + row // rows] + rank


def blocked_ell_from_csr(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int,
                         index_type: str, rows: int = 4, column_block: int = 256, group: int = 1) -> BlockedEll:
    """Pack a (validated) CSR matrix. With ``group`` > 1 the columns are read in aligned runs of
    ``group``: one entry per (row, run), its missing members stored as zeros."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    cols = np.asarray(indices).reshape(-1).astype(np.int64)
    indptr = np.asarray(indptr).reshape(-1).astype(np.int64)
    out_features = indptr.size - 1
    row = np.repeat(np.arange(out_features), np.diff(indptr))
    key = row * (in_features // group + 1) + cols // group
    new = np.r_[True, key[1:] != key[:-1]] if key.size else np.zeros(0, dtype=bool)
    entry = np.cumsum(new) - 1  # the entry (row, run) of every nonzero
    first = np.flatnonzero(new)
    blocks = -(-in_features // column_block)
    tile_ptr, slot = _slots(row[first], cols[first] // column_block, out_features, blocks, rows)
    stored = max(int(tile_ptr[-1]), 1)
    out_values = np.zeros((stored, rows, group), dtype=np.float32)
    out_indices = np.zeros((stored, rows), dtype=index_type)
    out_values[slot[entry], row % rows, cols % group] = values
    out_indices[slot, row[first] % rows] = cols[first] // group
    return BlockedEll(out_values, out_indices, tile_ptr, in_features, out_features, rows, column_block, group)


def blocked_rows_func(ell: BlockedEll, tile: Tile, n: int | None = None) -> tvm.tirx.PrimFunc:
    """PrimFunc(XT (in, n), V, I, tile_ptr, bias (out,), YT (out, n)); ``n`` None: symbolic.

    Row tiles are split into :data:`CHUNKS` contiguous chunks run in parallel, each walking every
    column block over its own tiles: one fork-join per call, and a chunk reuses each XT block
    across its tiles.
    """
    if ell.rows != tile.rows or ell.column_block != tile.column_block or ell.group != tile.group:
        raise ValueError(f"packing {ell.rows}/{ell.column_block} does not match tile {tile.label}")
    d, out, stored, tiles, blocks = ell.in_features, ell.out_features, ell.stored, ell.row_tiles, ell.blocks
    rows, lanes, vectors, group = tile.rows, tile.lanes, tile.vectors, ell.group
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
                for g in T.unroll(group):
                    for v in T.unroll(nv):
                        acc[r, T.ramp(v * lanes, 1, lanes)] = acc.vload([r, v * lanes], vec) + T.broadcast(
                            V[k, r, g], lanes) * XT.vload([T.Cast("int64", I[k, r]) * group + g, base + v * lanes], vec)
        for r in T.unroll(rows):
            if t * rows + r < out:
                for v in T.unroll(nv):
                    YT[t * rows + r, T.ramp(base + v * lanes, 1, lanes)] = acc.vload([r, v * lanes], vec)

    @T.prim_func(private=True)
    def func(
        XT: T.Buffer((d, N), "float32"), V: T.Buffer((stored, rows, group), "float32"),
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
                                for g in T.unroll(group):
                                    acc[r] = acc[r] + V[k, r, g] * XT[T.Cast("int64", I[k, r]) * group + g, col]
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
    tiles = tiles_for(lanes)
    alpha = task.alpha
    if alpha > 1 and task.in_features % alpha == 0 and grouped_fill(task.indices, task.indptr, alpha) >= MIN_GROUP_FILL:
        # an untied FPE second layer: each parent's children read as one 1 x alpha block
        tiles += [Tile(t.rows, t.vectors, t.lanes, t.column_block, alpha) for t in tiles if t.rows <= 2]
    out = []
    for tile in tiles:
        def pack(tile: Tile = tile) -> tuple[tvm.tirx.PrimFunc, list[np.ndarray]]:
            ell = blocked_ell_from_csr(task.values, task.indices, task.indptr, task.in_features, index_type,
                                       tile.rows, tile.column_block, tile.group)
            return blocked_rows_func(ell, tile), [ell.values, ell.indices, ell.tile_ptr, task.dense_bias()]

        def estimate(n: int, tile: Tile = tile) -> float:
            # ns: 2 FMAs-worth of loads per vector per nonzero, a tile pads ~15%, half speed below 8 rows
            vectors = -(-n // tile.lanes)
            per_index = 0.8 if tile.group > 1 else 1.0
            return (task.nonzeros * 1.15 * vectors * 0.25 * per_index * (1.0 if n >= MIN_ROWS else 2.0)
                    / (tile.rows * tile.vectors) ** 0.1)
        out.append(Candidate("column-blocked ELL", tile.label, pack, estimate))
    return out
