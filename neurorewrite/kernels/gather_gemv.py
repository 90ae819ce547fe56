"""The small-batch sparse-linear kernel on CPU: sliced ELL, hardware gathers, SIMD across output rows.

At batch 1 a sparse linear layer is a sparse matrix-vector product and memory bound: the kernel streams
the values and the narrow indices once, in the order they are stored (:class:`SlicedEll`: one vector
load = one entry of ``lanes`` consecutive rows), gathers the matching inputs with one ``vgatherdps``
(the input vector stays in L1/L2) and accumulates ``lanes`` rows at once, starting from the bias.
Activations are feature-major (``XT (in, n)``, ``YT (out, n)``), ``n`` symbolic: sample ``b`` gathers
at offsets ``i * n`` from ``XT[0, b]``.
TVM's code generator turns a vector load with a non-contiguous index into one scalar load per lane, so
the gather is spelled as the LLVM x86 intrinsic. Slices run in parallel (TVM's thread pool).

The kernel is written fully scheduled (``tirx.is_scheduled``): tuning leaves it alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from neurorewrite.kernels.choice import Candidate, SparseLinearTask, register_kernel
from neurorewrite.kernels.ell import SlicedEll, sliced_ell_from_csr

_FEATURE = tvm.get_global_func("target.llvm_cpu_has_feature", allow_missing=True)


def gather_lanes(target: tvm.target.Target) -> int:
    """16 with AVX-512, 8 with AVX2, 0 when the target has no gather instruction (use the TE kernel)."""
    if target.kind.name != "llvm" or _FEATURE is None:
        return 0
    for feature, lanes in (("avx512f", 16), ("avx2", 8)):
        if _FEATURE(feature, target):
            return lanes
    return 0


def _gather(lanes: int, base: object, index: object) -> object:
    """``lanes`` floats ``base[index[l]]`` as one hardware gather."""
    vec = f"float32x{lanes}"
    if lanes == 16:
        return T.call_llvm_pure_intrin(
            vec, "llvm.x86.avx512.mask.gather.dps.512",
            T.broadcast(T.float32(0), lanes), base, index, T.broadcast(T.bool(True), lanes), T.int32(4),
        )
    all_lanes = T.reinterpret(vec, T.broadcast(T.int32(-1), lanes))  # AVX2 masks are sign bits of floats
    return T.call_llvm_pure_intrin(
        vec, "llvm.x86.avx2.gather.d.ps.256", T.broadcast(T.float32(0), lanes), base, index, all_lanes, T.int8(4),
    )


def gather_gemv_func(sell: SlicedEll, n: int | None = None) -> tvm.tirx.PrimFunc:
    """``YT[o, b] = bias[o] + sum_k V[k, o % lanes] * XT[I[k, o % lanes], b]`` over slice ``o // lanes``.

    PrimFunc(XT (in, n), V (stored, lanes), I (stored, lanes), slice_ptr (slices+1,), bias (out,),
    YT (out, n)); ``n`` None: symbolic. Rows past out_features (the last slice's padding) are not written.
    """
    lanes, slices, stored, d, out = sell.lanes, sell.slices, int(sell.values.shape[0]), sell.in_features, sell.out_features
    index_dtype = str(sell.indices.dtype)
    vec, ivec = f"float32x{lanes}", f"int32x{lanes}"
    N = tvm.tirx.Var("n", "int64") if n is None else n  # noqa: N806 (a TVMScript shape)

    @T.prim_func(private=True)
    def func(
        XT: T.Buffer((d, N), "float32"), V: T.Buffer((stored, lanes), "float32"),
        I: T.Buffer((stored, lanes), index_dtype), P: T.Buffer((slices + 1,), "int32"),
        B: T.Buffer((out,), "float32"), YT: T.Buffer((out, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for s in T.parallel(slices):
            for b in range(N):
                acc = T.alloc_buffer((lanes,), "float32", scope="local")
                for lane in range(lanes):
                    acc[lane] = B[T.min(s * lanes + lane, out - 1)]
                for k in range(P[s], P[s + 1]):
                    # XT[i, b] sits i * n floats after XT[0, b]
                    column = T.Cast(ivec, I.vload([k, 0], f"{index_dtype}x{lanes}")) * T.broadcast(T.Cast("int32", N), lanes)
                    acc[T.ramp(0, 1, lanes)] = acc.vload([0], vec) + V.vload([k, 0], vec) * _gather(
                        lanes, T.address_of(XT[0, b]), column
                    )
                for lane in range(lanes):
                    if s * lanes + lane < out:
                        YT[s * lanes + lane, b] = acc[lane]

    return func


@register_kernel("sliced-ELL gather")
def gather_candidates(task: SparseLinearTask) -> list[Candidate]:
    """On a CPU with a gather instruction: sliced ELL, slices of one SIMD vector of rows, bias inside."""
    lanes = gather_lanes(task.target)
    if not lanes or task.in_features * 64 >= 2**31:  # the gather's 32-bit offsets must reach every input
        return []

    def pack() -> tuple[tvm.tirx.PrimFunc, list[np.ndarray]]:
        sell = sliced_ell_from_csr(task.values, task.indices, task.indptr, task.in_features, lanes,
                                   where=f"SparseLinear {task.name}")
        return gather_gemv_func(sell), [sell.values, sell.indices, sell.slice_ptr, task.dense_bias()]

    def estimate(n: int) -> float:
        return task.nonzeros * 0.45 * n  # ns per gathered nonzero and sample (AMD Zen 4)

    return [Candidate("sliced-ELL gather", str(lanes), pack, estimate)]
