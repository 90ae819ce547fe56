"""MEmeL's training step on the fused CPU kernel (:mod:`neurorewrite.models.memel_native`).

Same semantics as the eager code in :class:`neurorewrite.models.memel.MEmeL` (the tests run both on
the same stream and compare): statistics from the pre-inhibition values merged after the selection,
selection against the statistics of the previous batches, the selected elements' forward value the
running mean before the merge, their gradient ``-delta`` times the upstream one. What differs is
rounding: the kernel sums in float over blocks of 32 rows and then in double, merges in double, and
multiplies by a reciprocal where the eager code divides, so the statistics agree to float32 rounding
and the selections agree except between elements whose scores tie to within it.

Per step: one C pass for ``top_t = 1`` (statistics, score, selection and the output copy), one C
pass plus ``topk`` for larger ``top_t``, and one C call for the merge; the backward of ``top_t = 1``
is one C copy. The output and the gradient come from per-module pools
(:mod:`neurorewrite.models.memel_pool`), so a large activation's memory is not faulted in again every
step. A large activation's pass is split by columns over torch's intra-op thread count
(:func:`threads_for`); the result does not depend on the split. With ``torch.distributed`` the
packed sums ``[count, sum1, sum2]`` (float64) go through one ``all_reduce`` between the pass and the
merge, as in the eager code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from neurorewrite.models.memel_native import NativeKernel, native_kernel, usable_for
from neurorewrite.models.memel_pool import BufferPool
from neurorewrite.models.memel_rd import reversed_deactivation
from neurorewrite.models.memel_stats import distributed_active

__all__ = ["FusedState", "eager_only", "fused_kernel_for", "fused_step", "threads_for"]


class FusedState(Protocol):
    """What :func:`fused_step` reads and updates on a MEmeL module."""

    mean: Tensor
    m2: Tensor
    count: int
    top_t: int
    delta: float
    n_forget: int
    sync_ranks: bool

    def _scratch_like(self, shape: torch.Size) -> Tensor: ...


ELEMENTS_PER_THREAD = 1 << 17  # below this a thread's start costs more than its share of the pass
_EAGER_ONLY = [False]  # set by eager_only(): benchmarks and tests compare the two paths in one process


def fused_kernel_for(z2d: Tensor, statistics: Tensor) -> NativeKernel | None:
    """The kernel when it applies to this activation (CPU float32, contiguous), else None."""
    if _EAGER_ONLY[0] or not usable_for(z2d, statistics):
        return None
    return native_kernel()


def threads_for(elements: int) -> int:
    """Threads for the kernel's pass: torch's intra-op thread count, one per ELEMENTS_PER_THREAD elements."""
    return max(1, min(torch.get_num_threads(), elements // ELEMENTS_PER_THREAD))


@contextlib.contextmanager
def eager_only() -> Iterator[None]:
    """Within this block every MEmeL runs its eager torch code (not thread-safe; for comparisons)."""
    previous, _EAGER_ONLY[0] = _EAGER_ONLY[0], True
    try:
        yield
    finally:
        _EAGER_ONLY[0] = previous


class _FusedTopOne(torch.autograd.Function):
    """Top-1 Reversed Deactivation whose forward also fills the batch sums (one kernel pass)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, z2d: Tensor, kernel: NativeKernel, memel: FusedState, packed: Tensor, best: Tensor
    ) -> Tensor:
        outputs, gradients = _pools(memel)
        out = outputs.empty(z2d.shape)  # reused memory once the previous step's output is gone
        index = torch.empty(z2d.shape[0], dtype=torch.int64)
        threads = threads_for(z2d.numel())
        kernel.step(z2d, memel.mean, memel.m2, memel.count, packed, out=out, index=index, best=best, threads=threads)
        ctx.save_for_backward(index)
        ctx.kernel, ctx.scale, ctx.gradients = kernel, -memel.delta, gradients
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (index,) = ctx.saved_tensors
        if grad_out.dtype != torch.float32 or grad_out.device.type != "cpu":  # e.g. under autocast
            column = index[:, None].to(grad_out.device)
            return grad_out.scatter(1, column, grad_out.gather(1, column) * ctx.scale), None, None, None, None
        grad_out = grad_out.contiguous()
        grad_in = ctx.gradients.empty(grad_out.shape)
        ctx.kernel.backward(grad_out, index, ctx.scale, grad_in)
        return grad_in, None, None, None, None


def _pools(memel: FusedState) -> tuple[BufferPool, BufferPool]:
    """The module's pools for forward outputs and backward gradients (memel_pool.py), made on first use."""
    pools: tuple[BufferPool, BufferPool] | None = getattr(memel, "_pools", None)
    if pools is None:
        pools = (BufferPool(), BufferPool())
        memel._pools = pools  # type: ignore[attr-defined]
    return pools


def _buffers(memel: FusedState, rows: int, features: int) -> tuple[Tensor, Tensor]:
    """The packed sums ``[count, sum1 (features), sum2 (features)]`` and a rows-long workspace, kept
    between steps on the module (not state: each step overwrites them before reading)."""
    packed: Tensor | None = getattr(memel, "_packed_sums", None)
    if packed is None or packed.numel() != 1 + 2 * features:
        packed = torch.zeros(1 + 2 * features, dtype=torch.float64)
        memel._packed_sums = packed  # type: ignore[attr-defined]
    best: Tensor | None = getattr(memel, "_row_best", None)
    if best is None or best.numel() < rows:
        best = torch.empty(max(rows, 1), dtype=torch.float32)
        memel._row_best = best  # type: ignore[attr-defined]
    return packed, best


def fused_step(memel: FusedState, kernel: NativeKernel, z2d: Tensor, inhibit: bool) -> tuple[Tensor, float]:
    """One training step on ``z2d`` (batch x features): the output and the global batch size.

    Updates ``memel.mean``, ``memel.m2`` and ``memel.count`` in place (the caller counts batches).
    """
    rows, features = z2d.shape
    packed, best = _buffers(memel, rows, features)
    mean, m2 = memel.mean, memel.m2  # buffers: one nn.Module.__getattr__ each, not one per use
    if inhibit and memel.top_t == 1:
        out = _FusedTopOne.apply(z2d, kernel, memel, packed, best)
    else:
        with torch.no_grad():
            phi = memel._scratch_like(z2d.shape) if inhibit else None
            kernel.step(z2d.detach(), mean, m2, memel.count, packed, phi=phi, threads=threads_for(z2d.numel()))
            if phi is not None:
                selected = phi.topk(memel.top_t, dim=1, sorted=False).indices
                replacement = torch.take(mean, selected)  # the running mean before the merge
        out = reversed_deactivation(z2d, selected, replacement, memel.delta) if inhibit else z2d
    batch_count = float(rows)
    if memel.sync_ranks and distributed_active():
        packed[0] = batch_count
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        batch_count = float(packed[0])
    count = round(kernel.merge(memel.count, batch_count, memel.n_forget, packed, mean, m2))
    object.__setattr__(memel, "count", count)  # an int: nn.Module.__setattr__'s checks would find nothing
    return out, batch_count
