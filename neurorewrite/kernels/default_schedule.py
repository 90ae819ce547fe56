"""A default CPU schedule for the small operators between kernels: parallel over the output, inlined producers.

After legalization a CPU build leaves every operator that nobody schedules (an activation, the sum of
an FPE parent's children, a bias add, a gather) as one serial loop nest: on two cores the second sits
idle while it walks a 1.5 MB tensor, and with a batch of 32 such loops cost as much as a kernel.
MetaSchedule only tunes the reductions worth a search (:mod:`.tuning`). This pass gives every
PrimFunc that is still unscheduled a plain schedule: element-wise producers inlined into their
consumer, the output's spatial loops fused and split into parallel chunks, the innermost spatial
loop of an element-wise function vectorised. A function it cannot schedule is left as it was.
"""

from __future__ import annotations

import tvm
from tvm import s_tir

PARALLEL_CHUNKS = 64  # enough tasks to balance any thread count we run with
MIN_PARALLEL = 4096  # outputs below this run serially (a fork-join costs more than the loop)


def schedule_leftovers(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with a default CPU schedule on every PrimFunc not yet scheduled (see the module docstring)."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and func.attrs.get("tirx.is_scheduled")):
            continue
        scheduled = _schedule(func)
        if scheduled is not None:
            updates[gv] = scheduled
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def _schedule(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root") if _has_root(sch) else None
        blocks = sch.get_child_blocks(root) if root is not None else []
        if not blocks:
            return None
        for block in blocks[:-1]:  # element-wise producers into their consumer
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 (not inlinable: the function keeps it as its own loop nest)
                return None
        out = sch.get_child_blocks(root)[-1]
        loops = sch.get_loops(out)
        kinds = [iv.iter_type for iv in sch.get(out).iter_vars]
        spatial = [loop for loop, kind in zip(loops, kinds) if kind == tvm.tirx.IterVar.DataPar]
        if len(spatial) != len(loops) - (len(kinds) - len(spatial)) or not spatial:
            return None
        if any(kind != tvm.tirx.IterVar.DataPar for kind in kinds[: len(spatial)]):
            return None  # a reduction loop outside a spatial one: leave it
        size = 1
        for loop in spatial:
            extent = sch.get(loop).extent
            size = size * (int(extent) if isinstance(extent, tvm.tirx.IntImm) else MIN_PARALLEL)
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if size >= MIN_PARALLEL:
            outer, _ = sch.split(fused, [PARALLEL_CHUNKS, None])
            sch.parallel(outer)
        # opaque: the build's own fusion must not merge it with a neighbour (dropping this schedule)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
    except Exception:  # noqa: BLE001 (a shape the rule does not cover: unscheduled, as before)
        return None


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False
