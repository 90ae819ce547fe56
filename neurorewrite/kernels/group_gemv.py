"""The small-batch kernel for an untied FPE second layer: each row a list of 1 x alpha blocks, no gathers.

After calibration or fine-tuning the children of a parent no longer share their outgoing weight, so
the second layer cannot be folded (:mod:`neurorewrite.passes.fold_tied`), but its sparsity pattern is
still the tied one: a row keeps all ``alpha`` child columns of a parent or none. Stored as one index
per block and ``alpha`` contiguous values, a row's dot product reads ``alpha`` consecutive hidden
values per index: two (AVX2) or four (AVX-512) blocks fill one SIMD vector, loaded as 128-bit pieces
from the feature-major input, multiplied by the block's weights and summed across lanes at the row's
end. One index per ``alpha`` weights, and no gather instruction. Rows run in parallel chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm.script import tirx as T

from neurorewrite.kernels.blocked_rows import MIN_GROUP_FILL, grouped_fill
from neurorewrite.kernels.choice import Candidate, SparseLinearTask, register_kernel, simd_lanes
from neurorewrite.kernels.ell import index_dtype as narrowest_index_dtype

CHUNKS = 16
CHAINS = 4  # independent accumulators per row: hide the FMA latency


@dataclass(frozen=True)
class GroupRows:
    """Row ``o`` is entries ``ptr[o]:ptr[o+1]`` (padded to whole accumulator rounds); entry ``e`` is
    ``values[e, :]`` at input columns ``indices[e]*group .. +group``."""

    values: np.ndarray  # (entries, group) float32
    indices: np.ndarray  # (entries,) int16/int32 block index
    row_ptr: np.ndarray  # (out + 1,) int32
    in_features: int
    group: int


def group_rows_from_csr(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, in_features: int, group: int,
                        per_vector: int, index_type: str) -> GroupRows:
    """One entry per (row, aligned run of ``group`` columns); each row padded with zero entries to a
    multiple of ``per_vector * CHAINS`` (entries sharing one SIMD vector, vectors per accumulator round)."""
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    cols = np.asarray(indices).reshape(-1).astype(np.int64)
    indptr = np.asarray(indptr).reshape(-1).astype(np.int64)
    out = indptr.size - 1
    row = np.repeat(np.arange(out), np.diff(indptr))
    key = row * (in_features // group + 1) + cols // group
    new = np.r_[True, key[1:] != key[:-1]] if key.size else np.zeros(0, dtype=bool)
    entry = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    counts = np.bincount(row[first], minlength=out)
    step = per_vector * CHAINS
    padded = -(-counts // step) * step
    row_ptr = np.concatenate([[0], np.cumsum(padded)]).astype(np.int32)
    position = row_ptr[row[first]] + (np.arange(first.size) - np.repeat(np.r_[0, np.cumsum(counts)][:-1], counts))
    out_values = np.zeros((max(int(row_ptr[-1]), 1), group), dtype=np.float32)
    out_indices = np.zeros(max(int(row_ptr[-1]), 1), dtype=index_type)
    out_values[position[entry], cols % group] = values
    out_indices[position] = cols[first] // group
    return GroupRows(out_values, out_indices, row_ptr, in_features, group)


def group_gemv_func(packed: GroupRows, lanes: int, n: int | None = None) -> tvm.tirx.PrimFunc:
    """PrimFunc(XT (in, n), values, indices, row_ptr, bias (out,), YT (out, n)); ``n`` None: symbolic.

    Batch 1 reads each block's inputs as one contiguous ``group``-float piece; other batches read the
    piece with stride ``n`` (the same arithmetic, slower loads)."""
    group, d = packed.group, packed.in_features
    entries, out = packed.values.shape[0], packed.row_ptr.size - 1
    per = lanes // group  # blocks per vector
    vec, piece = f"float32x{lanes}", f"float32x{group}"
    index_dtype = str(packed.indices.dtype)
    chunks = min(CHUNKS, out)
    per_chunk = -(-out // chunks)
    N = tvm.tirx.Var("n", "int64") if n is None else n  # noqa: N806 (a TVMScript shape)

    def inputs(XT, I, e, b, contiguous: bool):  # noqa: ANN001, ANN202, N803
        """The ``per`` blocks' input pieces of entry vector ``e`` joined into one vector."""
        pieces = []
        for q in range(per):
            start = T.Cast("int64", I[e * per + q]) * group
            if contiguous:
                pieces.append(XT.vload([start, 0], piece))
            else:  # stride n between a block's inputs: one scalar load each
                pieces += [XT[start + g, b] for g in range(group)]
        return T.Shuffle(pieces, list(range(lanes)))

    @T.prim_func(private=True)
    def func(XT: T.Buffer((d, N), "float32"), V: T.Buffer((entries, group), "float32"),
             I: T.Buffer((entries,), index_dtype), P: T.Buffer((out + 1,), "int32"),
             B: T.Buffer((out,), "float32"), YT: T.Buffer((out, N), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for c in T.parallel(chunks):
            for oo in range(per_chunk):
                if c * per_chunk + oo < out:
                    o = c * per_chunk + oo
                    for b in range(N):
                        acc = T.alloc_buffer((CHAINS, lanes), "float32", scope="local")
                        for u in T.unroll(CHAINS):
                            acc[u, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
                        for e in range(P[o] // (per * CHAINS), P[o + 1] // (per * CHAINS)):
                            for u in T.unroll(CHAINS):
                                if N == 1:
                                    acc[u, T.ramp(0, 1, lanes)] = acc.vload([u, 0], vec) + V.vload(
                                        [(e * CHAINS + u) * per, 0], vec) * inputs(XT, I, e * CHAINS + u, b, True)
                                else:
                                    acc[u, T.ramp(0, 1, lanes)] = acc.vload([u, 0], vec) + V.vload(
                                        [(e * CHAINS + u) * per, 0], vec) * inputs(XT, I, e * CHAINS + u, b, False)
                        total = T.alloc_buffer((1,), "float32", scope="local")
                        total[0] = B[o]
                        for u in T.unroll(CHAINS):
                            for lane in range(lanes):
                                total[0] = total[0] + acc[u, lane]
                        YT[o, b] = total[0]

    return func


@register_kernel("parent blocks")
def group_candidates(task: SparseLinearTask) -> list[Candidate]:
    """On a CPU, for a layer whose columns come in full runs of the model's alpha (an untied FPE second
    layer): blocks of one vector (and, with AVX-512, of half a vector)."""
    alpha = task.alpha
    lanes = simd_lanes(task.target)
    if (not task.cpu or alpha not in (2, 4) or lanes % alpha or task.in_features % alpha
            or grouped_fill(task.indices, task.indptr, alpha) < MIN_GROUP_FILL):
        return []
    index_type = narrowest_index_dtype(task.in_features // alpha)
    out = []
    for width in sorted({lanes, 8}):
        def pack(width: int = width) -> tuple[tvm.tirx.PrimFunc, list[np.ndarray]]:
            packed = group_rows_from_csr(task.values, task.indices, task.indptr, task.in_features, alpha,
                                         width // alpha, index_type)
            return group_gemv_func(packed, width), [packed.values, packed.indices, packed.row_ptr, task.dense_bias()]

        def estimate(n: int) -> float:
            return task.nonzeros * 0.06 * n * (1.0 if n == 1 else 3.0)  # ns: a vector per 2 blocks, strided past 1

        out.append(Candidate("parent blocks", f"x{alpha} {width}", pack, estimate))
    return out
