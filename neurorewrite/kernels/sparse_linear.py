"""TensorIR kernels for a fixed-pattern sparse linear layer (ELL layout), and their schedules.

The kernels work on transposed activations: ``XT`` is ``(in_features, n)`` and ``YT`` is
``(out_features, n)`` with ``n`` the number of rows (batch x sequence). Then one stored nonzero
multiplies a contiguous row of ``XT``, which vectorises over ``n``. Two layouts:

- ``rows``  (``n >= ROWS_LAYOUT_MIN``): values/indices ``(out, width)``; vector lanes run over ``n``.
- ``cols``  (small ``n``, e.g. batch 1): values/indices ``(width, out)``; vector lanes run over
  output rows, each lane gathering its own input.

Every compute block carries the ``schedule_rule`` annotation, so MetaSchedule's post-order-apply
space calls :func:`schedule_cpu` / :func:`schedule_cuda` (registered below) to build a design space
whose tile sizes it then searches; without tuning the same functions run with fixed tile sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import s_tir, te

from neurorewrite.kernels.choice import Candidate, SparseLinearTask, register_kernel
from neurorewrite.kernels.ell import ell_from_csr

RULE = "neurorewrite_ell_linear"
ROWS_LAYOUT_MIN = 8


@dataclass(frozen=True)
class EllShape:
    """Everything a kernel is specialised on except the weights: tuning records are keyed by it.
    ``n`` None: a symbolic batch (one function for every batch size; then tuning cannot measure it)."""

    n: int | None
    in_features: int
    out_features: int
    width: int
    index_dtype: str
    layout_name: str | None = None  # "rows" / "cols"; default: by n

    @property
    def layout(self) -> str:
        if self.layout_name is not None:
            return self.layout_name
        return "rows" if self.n is None or self.n >= ROWS_LAYOUT_MIN else "cols"

    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.width) if self.layout == "rows" else (self.width, self.out_features)


def ell_linear_func(shape: EllShape, batch_dtype: str = "int64") -> tvm.tirx.PrimFunc:
    """``YT[o, b] = sum_j V[o, j] * XT[I[o, j], b]`` as a PrimFunc(XT, V, I, YT); a symbolic batch is a
    ``batch_dtype`` variable (int32 on CUDA, whose thread indexing overflows on int64 extents)."""
    n = tvm.tirx.Var("n", batch_dtype) if shape.n is None else shape.n
    xt = te.placeholder((shape.in_features, n), "float32", name="XT")
    values = te.placeholder(shape.weight_shape(), "float32", name="V")
    indices = te.placeholder(shape.weight_shape(), shape.index_dtype, name="I")
    j = te.reduce_axis((0, shape.width), name="j")
    if shape.layout == "rows":
        def body(o, b):
            return te.sum(values[o, j] * xt[indices[o, j].astype("int32"), b], axis=j)
    else:
        def body(o, b):
            return te.sum(values[j, o] * xt[indices[j, o].astype("int32"), b], axis=j)
    yt = te.compute((shape.out_features, n), body, name="YT", attrs={"schedule_rule": RULE, "ell_layout": shape.layout})
    return te.create_prim_func([xt, values, indices, yt]).without_attr("global_symbol")


def _split(sch: s_tir.Schedule, loop: s_tir.schedule.LoopRV, max_inner: int, fixed: int | None, sample: bool) -> list:
    extent = sch.get(loop).extent
    if not isinstance(extent, tvm.tirx.IntImm):  # a symbolic batch: a fixed factor, the tail predicated
        return sch.split(loop, factors=[None, fixed or max_inner])
    extent = int(extent)
    if sample:
        factors = sch.sample_perfect_tile(loop, n=2, max_innermost_factor=max_inner)
    else:
        inner = max(f for f in range(1, min(fixed or max_inner, extent) + 1) if extent % f == 0)
        factors = [None, inner]
    return sch.split(loop, factors=factors)


def schedule_cpu(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, sample: bool = True) -> list[s_tir.Schedule]:
    """Register tile (rows x lanes) kept in a local accumulator, parallel over row tiles, lanes vectorised.

    Row layout, tuning: two design spaces, the batch tile outside the nonzero loop (each index read
    once per lane tile) or inside it (the whole batch per index read, more accumulators).
    """
    rows_layout = str(sch.get(block).annotations.get("ell_layout", "rows")) == "rows"
    if not rows_layout:
        _cols(sch, block, sample)
        return [sch]
    if not sample:
        _rows(sch, block, sample, batch_inside=False)
        return [sch]
    inside = sch.copy()
    _rows(sch, block, sample, batch_inside=False)
    _rows(inside, block, sample, batch_inside=True)
    return [sch, inside]


def _rows(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, sample: bool, batch_inside: bool) -> None:
    o, b, j = sch.get_loops(block)
    oo, oi = _split(sch, o, 8, 4, sample)
    bo, bi = _split(sch, b, 16, 16, sample)
    sch.reorder(*((oo, j, oi, bo, bi) if batch_inside else (oo, bo, j, oi, bi)))
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, oo if batch_inside else bo)
    sch.vectorize(bi)
    sch.unroll(oi)
    if batch_inside:
        sch.unroll(bo)
    sch.parallel(oo)
    sch.decompose_reduction(block, j)


def _cols(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, sample: bool) -> None:
    o, b, j = sch.get_loops(block)
    oo, oi = _split(sch, o, 64, 16, sample)
    sch.reorder(oo, b, j, oi)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, b)
    sch.vectorize(oi)
    sch.parallel(oo)
    sch.decompose_reduction(block, j)


def schedule_cuda(sch: s_tir.Schedule, block: s_tir.schedule.SBlockRV, sample: bool = True) -> list[s_tir.Schedule]:
    """One thread per output element, the reduction over the row's nonzeros serial in a register."""
    o, b, j = sch.get_loops(block)
    fused = sch.fuse(o, b)
    if sample:
        threads = sch.sample_categorical([32, 64, 128, 256, 512], [0.2] * 5)
        bx, tx = sch.split(fused, factors=[None, threads])
    else:
        bx, tx = sch.split(fused, factors=[None, 128])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, tx)
    sch.decompose_reduction(block, j)
    return [sch]


def schedule_default(func: tvm.tirx.PrimFunc, target: tvm.target.Target) -> tvm.tirx.PrimFunc:
    """The untuned schedule: the same structure as the tuning space, with fixed tile sizes."""
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("YT")
    if target.kind.name == "cuda":
        schedule_cuda(sch, block, sample=False)
    else:
        schedule_cpu(sch, block, sample=False)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _register() -> None:
    import tvm_ffi

    for kind, fn in (("cpu", schedule_cpu), ("cuda", schedule_cuda)):
        name = f"s_tir.meta_schedule.{kind}.{RULE}"
        if tvm_ffi.get_global_func(name, allow_missing=True) is None:
            tvm_ffi.register_global_func(name, lambda sch, block, _fn=fn: _fn(sch, block, True))


_register()


@register_kernel("TensorIR ELL")
def ell_candidates(task: SparseLinearTask) -> list[Candidate]:
    """Any layer, any target (CUDA, CPUs without gathers): the TensorIR ELL kernel in both layouts, tuned
    by MetaSchedule (static shapes) or given the default schedule; the bias is added after it."""
    def candidate(layout: str) -> Candidate:
        def pack() -> tuple[tvm.tirx.PrimFunc, list[np.ndarray]]:
            ell = ell_from_csr(task.values, task.indices, task.indptr, task.in_features, where=f"SparseLinear {task.name}")
            shape = EllShape(None, task.in_features, task.out_features, ell.width, str(ell.indices.dtype), layout)
            if layout == "cols":
                ell = ell.transposed()
            return ell_linear_func(shape, "int64" if task.cpu else "int32"), [ell.values, ell.indices]

        def estimate(n: int) -> float:
            width = int(np.diff(np.asarray(task.indptr, dtype=np.int64)).max(initial=1))
            stored = task.out_features * width
            fit = 1.0 if (layout == "rows") == (n >= ROWS_LAYOUT_MIN) else 3.0
            return stored * 1.0 * max(1, n // 4) * fit + 1e6  # last resort on a CPU: always ranked behind

        return Candidate("TensorIR ELL", layout, pack, estimate, bias_inside=False,
                         schedule=lambda func: schedule_default(func, task.target))

    return [candidate("rows"), candidate("cols")]
