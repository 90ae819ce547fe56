"""Emitting a layer's chosen kernels into a Relax module: one call for a fixed batch, a dispatch otherwise.

For a static batch the one kernel chosen for it is called. For a symbolic batch the choice can name a
kernel per range of batch sizes (small-batch tiles below some ``n``, the column-blocked kernel above);
then the layer becomes a private Relax function whose body branches on ``n`` (``relax.If`` on a
``PrimValue``), so the library picks its kernel on every call. Each kernel's packed weights are
constants of the module. Input and output are feature-major (``XT (in, n)`` -> ``YT (out, n)``).
"""

from __future__ import annotations

import tvm
from tvm import relax

from neurorewrite.kernels.choice import Candidate, Choice, SparseLinearTask

Dim = int | tvm.tirx.Expr


def _call(bb: relax.BlockBuilder, task: SparseLinearTask, candidate: Candidate, xt: relax.Expr, n: Dim,
          scheduled: bool) -> relax.Expr:
    """``YT`` from ``XT`` by one kernel, bias included (an unemitted expression)."""
    func, weights = candidate.build()
    if isinstance(n, int):
        func = specialize_batch(func, n)
    if candidate.schedule is not None and scheduled:
        func = candidate.schedule(func)
    # opaque: Relax must not fuse neighbours into a kernel (its schedule would be lost)
    func = func.with_attr("op_pattern", 8)
    gv = bb.add_func(func, candidate.kernel.replace(" ", "_").replace("-", "_").lower())
    out = relax.TensorType((task.out_features, n), "float32")
    yt: relax.Expr = relax.call_tir(gv, [xt, *(relax.const(w) for w in weights)], out)
    if not candidate.bias_inside and task.bias is not None:
        yt = relax.op.add(yt, relax.const(task.dense_bias().reshape(-1, 1)))
    return yt


def emit_layer(bb: relax.BlockBuilder, task: SparseLinearTask, candidates: list[Candidate], choice: Choice,
               xt: relax.Expr, n: Dim, scheduled: bool) -> relax.Expr:
    """Emit ``YT = W @ XT + bias`` with the kernel(s) ``choice`` names; returns the bound ``YT``."""
    by_name = {c.name: c for c in candidates}
    if isinstance(n, int):
        return bb.emit(_call(bb, task, by_name[choice.kernel_for(n)], xt, n, scheduled))
    if len(choice.kernels) == 1:
        return bb.emit(_call(bb, task, by_name[choice.kernels[0]], xt, n, scheduled))
    # the importer is inside the main function's block: build the dispatch function by hand
    m = tvm.tirx.Var("n", "int64")
    param = relax.Var("xt", relax.TensorType((task.in_features, m), "float32"))
    body = _call(bb, task, by_name[choice.ranges[-1][1]], param, m, scheduled)
    for start, _ in reversed(choice.ranges[1:]):
        below = _call(bb, task, by_name[choice.kernel_for(start - 1)], param, m, scheduled)
        body = relax.If(relax.prim_value(m < start), _seq(below), _seq(body))
    out = relax.TensorType((task.out_features, m), "float32")
    func = relax.Function([param], _seq(body), out).with_attr("global_symbol", "")
    func = bb.normalize(func.without_attr("global_symbol"))
    gv = bb.add_func(func, "sparse_dispatch")
    return bb.emit(relax.Call(gv, [xt]))


def specialize_batch(func: tvm.tirx.PrimFunc, n: int) -> tvm.tirx.PrimFunc:
    """``func`` with its symbolic batch (the last dimension of its first argument ``XT``) fixed to ``n``."""
    xt = func.params[0].ty  # a buffer type: shape and dtype
    batch = xt.shape[-1]
    if not isinstance(batch, tvm.tirx.Var):
        return func
    value = tvm.tirx.IntImm(batch.ty.dtype if hasattr(batch.ty, "dtype") else "int64", n)
    return func.specialize({func.params[0]: tvm.tirx.decl_buffer((*xt.shape[:-1], value), xt.dtype, name="XT")})


def _seq(expr: relax.Expr) -> relax.Expr:
    return expr if isinstance(expr, relax.SeqExpr) else relax.SeqExpr([], expr)

