"""Which kernel runs a sparse linear layer: a registry of planners, tried in order of preference.

A planner looks at a :class:`SparseLinearTask` (rows, the fixed CSR weight, the model's FPE alpha,
the target) and returns a :class:`KernelPlan` when its kernel can run the layer and is the one to
use, else None. :func:`plan_sparse_linear` returns the first plan of the registered planners by
priority; the last one (the TensorIR ELL kernel) runs everything. A new kernel is one module that
calls :func:`register_kernel`; the importer only asks for a plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax


@dataclass(frozen=True)
class SparseLinearTask:
    """``Y (rows, out) = X (rows, in) @ W.T + bias`` with ``W`` fixed, validated CSR arrays."""

    name: str
    rows: int
    in_features: int
    out_features: int
    values: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    bias: np.ndarray | None
    alpha: int  # the model's FPE alpha: rows in runs of alpha may be one parent's children
    target: tvm.target.Target
    scheduled: bool  # apply the untuned schedule to tunable kernels (no tuning database)

    @property
    def cpu(self) -> bool:
        return self.target.kind.name == "llvm"

    @property
    def nonzeros(self) -> int:
        return int(self.values.size)

    def padded_bias(self, rows: int) -> np.ndarray:
        """The bias as float32, zero-padded to ``rows`` entries (kernels that write padding rows)."""
        out = np.zeros(rows, dtype=np.float32)
        if self.bias is not None:
            out[: self.out_features] = np.asarray(self.bias, dtype=np.float32)
        return out


@dataclass(frozen=True)
class KernelPlan:
    """A chosen kernel: its name for the report and how to emit it (2-D input -> 2-D output, bias included)."""

    kernel: str
    emit: Callable[[relax.BlockBuilder, relax.Expr], relax.Expr]


Planner = Callable[[SparseLinearTask], KernelPlan | None]
_PLANNERS: list[tuple[int, str, Planner]] = []


def register_kernel(name: str, priority: int) -> Callable[[Planner], Planner]:
    """Register a planner; lower ``priority`` is asked first."""

    def register(planner: Planner) -> Planner:
        _PLANNERS.append((priority, name, planner))
        _PLANNERS.sort(key=lambda item: item[0])
        return planner

    return register


def kernel_names() -> list[str]:
    """The registered kernels in the order they are asked."""
    return [name for _, name, _ in _PLANNERS]


def plan_sparse_linear(task: SparseLinearTask) -> KernelPlan:
    """The first registered planner's plan for ``task``."""
    for _, _, planner in _PLANNERS:
        plan = planner(task)
        if plan is not None:
            return plan
    raise RuntimeError(f"no kernel can run SparseLinear {task.name}")  # the ELL kernel runs everything


def emit_narrow(bb: relax.BlockBuilder, y: relax.Expr, rows: int, cols: int, written: tuple[int, int]) -> relax.Expr:
    """``y`` (``written`` rows x cols, padding included) sliced to ``rows x cols``."""
    if written == (rows, cols):
        return y
    return bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[rows, cols]))
