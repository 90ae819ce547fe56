"""The small-batch sparse-linear kernel on CPU: sliced ELL, hardware gathers, SIMD across output rows.

At batch 1 a sparse linear layer is a sparse matrix-vector product and memory bound: the kernel streams
the values and the narrow indices once, in the order they are stored (:class:`SlicedEll`: one vector
load = one entry of ``lanes`` consecutive rows), gathers the matching inputs with one ``vgatherdps``
(the input vector stays in L1/L2) and accumulates ``lanes`` rows at once, starting from the bias.
TVM's code generator turns a vector load with a non-contiguous index into one scalar load per lane, so
the gather is spelled as the LLVM x86 intrinsic. Slices run in parallel (TVM's thread pool).

The kernel is written fully scheduled (``tirx.is_scheduled``): tuning leaves it alone.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.script import tirx as T

from neurorewrite.kernels.choice import KernelPlan, SparseLinearTask, emit_narrow, register_kernel
from neurorewrite.kernels.ell import sliced_ell_from_csr
from neurorewrite.kernels.sparse_linear import ROWS_LAYOUT_MIN

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


def gather_gemv_func(
    n: int, in_features: int, slices: int, stored: int, lanes: int, index_dtype: str
) -> tvm.tirx.PrimFunc:
    """``Y[b, o] = bias[o] + sum_k V[k, o % lanes] * X[b, I[k, o % lanes]]`` over slice ``o // lanes``.

    PrimFunc(X (n, in), V (stored, lanes), I (stored, lanes), slice_ptr (slices+1,), bias (slices*lanes,),
    Y (n, slices*lanes)); rows past the layer's out_features are padding the caller slices off.
    """
    vec, ivec, width = f"float32x{lanes}", f"int32x{lanes}", slices * lanes

    @T.prim_func(private=True)
    def func(
        X: T.Buffer((n, in_features), "float32"), V: T.Buffer((stored, lanes), "float32"),
        I: T.Buffer((stored, lanes), index_dtype), P: T.Buffer((slices + 1,), "int32"),
        B: T.Buffer((width,), "float32"), Y: T.Buffer((n, width), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for s in T.parallel(slices):
            for b in range(n):
                acc = T.alloc_buffer((lanes,), "float32", scope="local")
                acc[T.ramp(0, 1, lanes)] = B.vload([s * lanes], vec)
                for k in range(P[s], P[s + 1]):
                    column = T.Cast(ivec, I.vload([k, 0], f"{index_dtype}x{lanes}"))
                    acc[T.ramp(0, 1, lanes)] = acc.vload([0], vec) + V.vload([k, 0], vec) * _gather(
                        lanes, T.address_of(X[b, 0]), column
                    )
                Y[b, T.ramp(s * lanes, 1, lanes)] = acc.vload([0], vec)

    return func


@register_kernel("sliced-ELL gather", priority=30)
def plan_gather_gemv(task: SparseLinearTask) -> KernelPlan | None:
    """Below 8 rows on a CPU with a gather instruction: sliced ELL on the untransposed input, bias inside."""
    lanes = gather_lanes(task.target)
    if not lanes or task.rows >= ROWS_LAYOUT_MIN:
        return None
    sell = sliced_ell_from_csr(task.values, task.indices, task.indptr, task.in_features, lanes, where=f"SparseLinear {task.name}")

    def emit(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        width = sell.slices * lanes
        func = gather_gemv_func(task.rows, task.in_features, sell.slices, sell.values.shape[0], lanes, str(sell.indices.dtype))
        gv = bb.add_func(func, "sell_gather_linear")
        consts = [relax.const(a) for a in (sell.values, sell.indices, sell.slice_ptr, task.padded_bias(width))]
        y = bb.emit(relax.call_tir(gv, [x, *consts], relax.TensorType((task.rows, width), "float32")))
        return emit_narrow(bb, y, task.rows, task.out_features, (task.rows, width))

    return KernelPlan("sliced-ELL gather", emit)
