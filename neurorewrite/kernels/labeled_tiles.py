"""The small-batch kernels that stream dense parent tiles: FPE children with child labels, or plain dense tiles.

Rows ``j*alpha .. j*alpha+alpha-1`` of an expanded first linear W1' are the children of parent ``j``,
and their inputs are disjoint. Collapsed, all their nonzeros fit one row of an ``(H, D)`` matrix, with
a label per entry naming the child it belongs to (a pruned entry is a zero with label 0). The kernel
streams that matrix in tiles of ``lanes`` parents, stored input-major so one vector load reads input
``i`` of ``lanes`` parents; it multiplies by the broadcast ``x[i]`` and adds the product to the
accumulator of its child. No gathers (slow on AMD Zen: ``benchmarks/kernels.py``). Two encodings of
the labels, both timed by the kernel choice:

- ``labels``: an ``int8`` label per entry, one masked add per child (``alpha`` accumulators per
  sample); cheap with AVX-512 mask registers.
- ``bits`` (``alpha <= 4``): the label in the two lowest mantissa bits of the weight itself (the
  weight moves by at most 3 units in the last place, ~4e-7 relative), so the tile is the dense
  tile's 4 bytes per entry. The accumulators are the sum of all products and the sums under bit 0,
  bit 1 and both; the children are recovered as ``h0 = A - B0 - B1 + C``, ``h1 = B0 - C``,
  ``h2 = B1 - C``, ``h3 = C``. Masks come from shifting a bit into the sign (AVX2 blends on it).

With ``alpha == 1`` (any sparse layer, no labels) the kernel is a plain dense GEMV over the
zero-filled tiles. Samples share one pass over a tile in blocks that fit the vector registers.
All kernels take feature-major ``XT (in, n)`` and write ``YT (out, n)``, ``n`` symbolic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from neurorewrite.kernels.choice import Candidate, SparseLinearTask, register_kernel, simd_lanes

MAX_TILE_BYTES = 64 << 20  # never pack more than this (a layer far too sparse for tiles)
MIN_DENSITY = 1 / 4  # below this the zero-filled tiles stream 4x the stored nonzeros: not worth timing


@dataclass(frozen=True)
class LabeledTiles:
    """``values[t, i, l]``: the weight of input ``i`` in parent ``t*lanes + l``; ``labels`` the child
    (None when ``alpha == 1`` or with the labels in the weights' bits); ``bias[t, k, l]`` the bias of
    that parent's child ``k``."""

    values: np.ndarray  # (tiles, in_features, lanes) float32
    labels: np.ndarray | None  # (tiles, in_features, lanes) int8
    bias: np.ndarray  # (tiles, alpha, lanes) float32
    alpha: int
    out_features: int  # rows of the layer: alpha * parents
    encoding: str  # "labels", "bits" or "dense"

    @property
    def tiles(self) -> int:
        return int(self.values.shape[0])

    @property
    def lanes(self) -> int:
        return int(self.values.shape[2])

    @property
    def in_features(self) -> int:
        return int(self.values.shape[1])

    def arrays(self) -> list[np.ndarray]:
        return [self.values] + ([] if self.labels is None else [self.labels]) + [self.bias]


def siblings_disjoint(indices: np.ndarray, indptr: np.ndarray, in_features: int, alpha: int) -> bool:
    """Whether rows come in runs of ``alpha`` (one parent's children) whose inputs do not overlap."""
    rows = indptr.size - 1
    if rows % alpha:
        return False
    if alpha == 1:
        return True
    parent = np.repeat(np.arange(rows) // alpha, np.diff(indptr.astype(np.int64)))
    counts = np.bincount(parent * in_features + indices.astype(np.int64), minlength=1)
    return bool(counts.max(initial=0) <= 1)


def labeled_tiles_from_csr(
    values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int, alpha: int,
    bias: np.ndarray | None = None, lanes: int = 32, encoding: str = "labels",
) -> LabeledTiles | None:
    """Pack a CSR layer whose rows are ``alpha`` children per parent; None if two siblings share an input
    (or the encoding cannot hold alpha labels)."""
    rows = indptr.size - 1
    if (encoding == "bits" and not 2 <= alpha <= 4) or not siblings_disjoint(indices, indptr, in_features, alpha):
        return None
    row = np.repeat(np.arange(rows), np.diff(indptr.astype(np.int64)))
    parent, child, col = row // alpha, row % alpha, indices.astype(np.int64)
    parents = rows // alpha
    tiles = -(-parents // lanes)
    dense = np.zeros((tiles * lanes, in_features), dtype=np.float32)
    dense[parent, col] = values
    labels = None
    if alpha > 1:
        lab = np.zeros((tiles * lanes, in_features), dtype=np.int8)
        lab[parent, col] = child
        if encoding == "bits":
            bits = dense.view(np.int32)
            bits &= ~np.int32(3)
            bits |= lab.astype(np.int32)
        else:
            labels = np.ascontiguousarray(lab.reshape(tiles, lanes, in_features).transpose(0, 2, 1))
    tiled = np.ascontiguousarray(dense.reshape(tiles, lanes, in_features).transpose(0, 2, 1))
    b = np.zeros((tiles * lanes, alpha), dtype=np.float32)
    if bias is not None:
        b[:parents] = np.asarray(bias, dtype=np.float32).reshape(parents, alpha)
    return LabeledTiles(tiled, labels, np.ascontiguousarray(b.reshape(tiles, lanes, alpha).transpose(0, 2, 1)),
                        alpha, rows, encoding if alpha > 1 else "dense")


def _samples_per_pass(alpha: int, vectors: int, registers: int) -> int:
    """Samples sharing one pass over a tile: their accumulators plus the per-entry temporaries (the
    weights, one masked copy per child, masks, the broadcast input) must fit the vector registers."""
    temporaries = alpha * vectors + 3 if alpha > 1 else vectors + 1
    return max(1, min(8, (registers - temporaries) // (alpha * vectors)))


def labeled_gemv_func(tiles: LabeledTiles, vector: int, n: int | None = None) -> tvm.tirx.PrimFunc:
    """PrimFunc(XT (in, n), values, [labels,] bias, YT (out, n)); ``vector`` the SIMD width in floats,
    ``n`` None: symbolic. Samples run ``block`` at a time per pass over a tile, the rest one by one."""
    alpha, d, count, lanes, out = tiles.alpha, tiles.in_features, tiles.tiles, tiles.lanes, tiles.out_features
    registers = 32 if vector >= 16 else 16
    block = _samples_per_pass(alpha, max(1, lanes // vector), registers)
    vec = f"float32x{lanes}"
    zero = T.broadcast(T.float32(0), lanes)
    N = tvm.tirx.Var("n", "int64") if n is None else n  # noqa: N806 (a TVMScript shape)

    if tiles.encoding == "dense":
        @T.macro
        def dense_pass(XT, V, B, YT, t, base, nb):  # noqa: ANN001, N803
            acc = T.alloc_buffer((nb, lanes), "float32", scope="local")
            for bi in T.unroll(nb):
                acc[bi, T.ramp(0, 1, lanes)] = B.vload([t, 0, 0], vec)
            for i in range(d):
                w = V.vload([t, i, 0], vec)
                for bi in T.unroll(nb):
                    acc[bi, T.ramp(0, 1, lanes)] = acc.vload([bi, 0], vec) + T.broadcast(XT[i, base + bi], lanes) * w
            for bi in T.unroll(nb):
                for lane in range(lanes):
                    if t * lanes + lane < out:
                        YT[t * lanes + lane, base + bi] = acc[bi, lane]

        @T.prim_func(private=True)
        def dense(XT: T.Buffer((d, N), "float32"), V: T.Buffer((count, d, lanes), "float32"),
                  B: T.Buffer((count, 1, lanes), "float32"), YT: T.Buffer((out, N), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for t in T.parallel(count):
                for bo in range(N // block):
                    dense_pass(XT, V, B, YT, t, bo * block, block)
                for bi in range(N % block):
                    dense_pass(XT, V, B, YT, t, N // block * block + bi, 1)

        return dense

    if tiles.encoding == "labels":
        @T.macro
        def labels_pass(XT, V, L, B, YT, t, base, nb):  # noqa: ANN001, N803
            acc = T.alloc_buffer((nb, alpha, lanes), "float32", scope="local")
            for bi in T.unroll(nb):
                for k in T.unroll(alpha):
                    acc[bi, k, T.ramp(0, 1, lanes)] = B.vload([t, k, 0], vec)
            for i in range(d):
                w = V.vload([t, i, 0], vec)
                lab = L.vload([t, i, 0], f"int8x{lanes}")
                for bi in T.unroll(nb):
                    x = T.broadcast(XT[i, base + bi], lanes)
                    for k in T.unroll(alpha):
                        acc[bi, k, T.ramp(0, 1, lanes)] = acc.vload([bi, k, 0], vec) + x * T.Select(
                            lab == T.broadcast(T.int8(k), lanes), w, zero)
            for bi in T.unroll(nb):
                for lane in range(lanes):
                    for k in T.unroll(alpha):
                        if (t * lanes + lane) * alpha + k < out:
                            YT[(t * lanes + lane) * alpha + k, base + bi] = acc[bi, k, lane]

        @T.prim_func(private=True)
        def labeled(XT: T.Buffer((d, N), "float32"), V: T.Buffer((count, d, lanes), "float32"),
                    L: T.Buffer((count, d, lanes), "int8"), B: T.Buffer((count, alpha, lanes), "float32"),
                    YT: T.Buffer((out, N), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            for t in T.parallel(count):
                for bo in range(N // block):
                    labels_pass(XT, V, L, B, YT, t, bo * block, block)
                for bi in range(N % block):
                    labels_pass(XT, V, L, B, YT, t, N // block * block + bi, 1)

        return labeled

    ivec = f"int32x{lanes}"

    def pick(mask: object, w: object) -> object:
        """``w`` where the mask's sign bit is set, else 0: one ``vblendvps`` on AVX2."""
        if lanes == 8 and vector == 8:
            return T.call_llvm_pure_intrin(vec, "llvm.x86.avx.blendv.ps.256", zero, w, T.reinterpret(vec, mask))
        return T.Select(mask < T.broadcast(0, lanes), w, zero)

    @T.macro
    def bits_pass(XT, V, B, YT, t, base, nb):  # noqa: ANN001, N803
        # sums of the products: all (A), under label bit 0 (B0), bit 1 (B1), both (C)
        acc = T.alloc_buffer((nb, alpha, lanes), "float32", scope="local")
        for bi in T.unroll(nb):
            for k in T.unroll(alpha):
                acc[bi, k, T.ramp(0, 1, lanes)] = zero
        for i in range(d):
            w = V.vload([t, i, 0], vec)
            bits = T.reinterpret(ivec, w)
            low = T.shift_left(bits, T.broadcast(31, lanes))  # label bit 0 in the sign
            high = T.shift_left(bits, T.broadcast(30, lanes))  # label bit 1 in the sign
            w_low = pick(low, w)
            w_high = pick(high, w)
            w_both = pick(T.bitwise_and(low, high), w)
            for bi in T.unroll(nb):
                x = T.broadcast(XT[i, base + bi], lanes)
                acc[bi, 0, T.ramp(0, 1, lanes)] = acc.vload([bi, 0, 0], vec) + x * w
                acc[bi, 1, T.ramp(0, 1, lanes)] = acc.vload([bi, 1, 0], vec) + x * w_low
                if alpha >= 3:
                    acc[bi, 2 % alpha, T.ramp(0, 1, lanes)] = acc.vload([bi, 2 % alpha, 0], vec) + x * w_high
                if alpha == 4:
                    acc[bi, 3 % alpha, T.ramp(0, 1, lanes)] = acc.vload([bi, 3 % alpha, 0], vec) + x * w_both
        for bi in T.unroll(nb):
            for lane in range(lanes):
                c3 = T.if_then_else(alpha == 4, acc[bi, 3 % alpha, lane], T.float32(0))
                b1 = T.if_then_else(alpha >= 3, acc[bi, 2 % alpha, lane], T.float32(0))
                kids = T.alloc_buffer((alpha,), "float32", scope="local")
                kids[0] = acc[bi, 0, lane] - acc[bi, 1, lane] - b1 + c3
                kids[1] = acc[bi, 1, lane] - c3
                if alpha >= 3:
                    kids[2 % alpha] = b1 - c3
                if alpha == 4:
                    kids[3 % alpha] = c3
                for k in T.unroll(alpha):
                    if (t * lanes + lane) * alpha + k < out:
                        YT[(t * lanes + lane) * alpha + k, base + bi] = kids[k] + B[t, k, lane]

    @T.prim_func(private=True)
    def bit_labeled(XT: T.Buffer((d, N), "float32"), V: T.Buffer((count, d, lanes), "float32"),
                    B: T.Buffer((count, alpha, lanes), "float32"), YT: T.Buffer((out, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for t in T.parallel(count):
            for bo in range(N // block):
                bits_pass(XT, V, B, YT, t, bo * block, block)
            for bi in range(N % block):
                bits_pass(XT, V, B, YT, t, N // block * block + bi, 1)

    return bit_labeled


def _candidate(task: SparseLinearTask, alpha: int, lanes: int, vector: int, encoding: str) -> Candidate | None:
    parents = task.out_features // alpha
    entries = -(-parents // lanes) * lanes * task.in_features
    if entries * (5 if encoding == "labels" else 4) > MAX_TILE_BYTES:
        return None

    def pack() -> tuple[tvm.tirx.PrimFunc, list[np.ndarray]]:
        tiles = labeled_tiles_from_csr(task.values, task.indices, task.indptr, task.in_features, alpha,
                                       task.bias, lanes, encoding)
        assert tiles is not None  # checked above
        return labeled_gemv_func(tiles, vector), tiles.arrays()

    per_entry = 0.045 if alpha == 1 else (0.04 if encoding == "bits" else 0.03) * alpha  # ns, one sample

    def estimate(n: int) -> float:
        return entries * per_entry * (1 + 0.6 * (n - 1))

    kernel = "dense tiles" if alpha == 1 else f"labeled tiles x{alpha}"
    return Candidate(kernel, f"{encoding + ' ' if alpha > 1 else ''}{lanes}", pack, estimate)


@register_kernel("labeled tiles")
def labeled_candidates(task: SparseLinearTask) -> list[Candidate]:
    """On a CPU: labeled tiles (both encodings) when the rows are FPE children with disjoint inputs, and
    dense tiles for layers at least 1/4 dense; tiles of one and two SIMD vectors of parents."""
    if not task.cpu:
        return []
    vector = simd_lanes(task.target)
    found: list[Candidate | None] = []
    if task.alpha > 1 and siblings_disjoint(task.indices, task.indptr, task.in_features, task.alpha):
        for encoding in ("labels", "bits"):
            found += [_candidate(task, task.alpha, lanes, vector, encoding) for lanes in (vector, 2 * vector)]
    if task.density >= MIN_DENSITY:
        found += [_candidate(task, 1, lanes, vector, "dense") for lanes in (vector, 2 * vector, 4 * vector)]
    return [c for c in found if c is not None]
