"""Reversed Deactivation (METHODS.md section 2): ``z' = -D*z + (mu + D*z).detach()`` on selected elements.

One autograd function: the forward value of a selected element is exactly the running mean ``mu``,
its gradient ``-D`` times the upstream gradient; every other element passes through. Used by MEmeL's
eager path and, for ``top_t > 1``, by its fused CPU path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["reversed_deactivation"]


class _ReversedDeactivation(torch.autograd.Function):
    """Selected elements: forward value ``mu``, gradient ``-delta`` times the upstream gradient."""

    @staticmethod
    def forward(ctx: Any, z2d: Tensor, selected: Tensor, replacement: Tensor, delta: float) -> Tensor:
        ctx.save_for_backward(selected)
        ctx.delta = delta
        return z2d.scatter(1, selected, replacement)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        (selected,) = ctx.saved_tensors
        reversed_grad = grad_out.gather(1, selected) * (-ctx.delta)
        return grad_out.scatter(1, selected, reversed_grad), None, None, None


def reversed_deactivation(z2d: Tensor, selected: Tensor, replacement: Tensor, delta: float) -> Tensor:
    """Reversed Deactivation ``z' = -D*z + (mu + D*z).detach()`` on the ``selected`` (batch x t) elements.

    ``replacement`` holds ``mu`` at the selected positions (batch x t). Equal in value and gradient to
    the formula (tests check it against the literal form), but the forward value is exactly ``mu``
    and only one full-size copy is made each way: the cost of any element-wise op.
    """
    return _ReversedDeactivation.apply(z2d, selected, replacement, float(delta))
