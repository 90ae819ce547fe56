"""A cache-tiled 2-D transpose on CPU, to and from the feature-major layout the sparse kernels work in.

Relax's ``permute_dims`` compiles unscheduled on a CPU: one thread walking the output in order and
reading the input a row apart each time, a cache miss per element. Copying 16 x 16 tiles, tiles in
parallel, reads and writes whole cache lines: 0.76 ms instead of 10.6 ms for 4096 x 512 floats on one
thread (``benchmarks/kernels.py``). Either dimension may be symbolic (a batch of any size).
"""

from __future__ import annotations

import tvm
from tvm import relax, s_tir, te

TILE = 16  # 16 floats = one 64-byte cache line per tile row

Dim = int | tvm.tirx.Expr


def transpose_func(rows: Dim | None, cols: Dim | None, cpu: bool = True) -> tvm.tirx.PrimFunc:
    """PrimFunc(X (rows, cols), Y (cols, rows)) with ``Y = X.T``, scheduled (``None``: a symbolic dim)."""
    rows = tvm.tirx.Var("rows", "int64") if rows is None else rows
    cols = tvm.tirx.Var("cols", "int64") if cols is None else cols
    x = te.placeholder((rows, cols), "float32", name="X")
    y = te.compute((cols, rows), lambda i, j: x[j, i], name="Y")
    func = te.create_prim_func([x, y]).without_attr("global_symbol")
    if not cpu:
        return func  # left to the target's default legalization (one thread per element on CUDA)
    sch = s_tir.Schedule(func)
    i, j = sch.get_loops(sch.get_sblock("Y"))
    io, ii = sch.split(i, [None, TILE])
    jo, ji = sch.split(j, [None, TILE])
    # one 16 x 16 tile at a time. Inner loop along the output rows, except for an input one tile wide:
    # read a whole row (one cache line) at a time (both orders timed on 4096 x 16 and 4096 x 512; each
    # wins on one shape by 1.5x to 5x)
    if isinstance(cols, int) and cols <= TILE:
        sch.reorder(jo, io, ji, ii)
    else:
        sch.reorder(jo, io, ii, ji)
    sch.parallel(jo)
    # opaque: Relax must not fuse the scheduled loop nest into its neighbours (it would drop the schedule)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


def emit_transpose(bb: relax.BlockBuilder, x: relax.Expr, rows: Dim, cols: Dim, cpu: bool = True) -> relax.Expr:
    """``x.T`` of a ``(rows, cols)`` float32 tensor; a reshape when one side is 1 (the same bytes)."""
    if isinstance(rows, int) and rows == 1 or isinstance(cols, int) and cols == 1:
        return bb.emit(relax.op.reshape(x, (cols, rows)))
    if not cpu:
        return bb.emit(relax.op.permute_dims(x))
    static = [d if isinstance(d, int) else None for d in (rows, cols)]
    gv = bb.add_func(transpose_func(*static), "tiled_transpose")
    return bb.emit(relax.call_tir(gv, [x], relax.TensorType((cols, rows), "float32")))
