"""The layers a SENN grows: the learnable rational activation and function-preserving resizes of Linear.

``RationalActivation`` is METHODS section 3's ``(2v x/(1+x^2) + c/(1+x^2) + l x) / sqrt(v^2+c^2+l^2)``
with one (v, c, l) per neuron, the identity when ``v = c = 0, l = 1``. The ``*_linear`` helpers build
new ``nn.Linear`` modules (never edit a module's weights in place) so that growth keeps the network's
function: new output rows are fresh neurons, new input columns are zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def rational(x: Tensor, v: Tensor, c: Tensor, l: Tensor) -> Tensor:  # noqa: E741 (the paper's name)
    """The rational activation, elementwise, with broadcastable parameters (plain ONNX ops only)."""
    inv = 1.0 / (1.0 + x * x)
    norm = torch.sqrt(v * v + c * c + l * l)
    return (2.0 * v * x * inv + c * inv + l * x) / norm


class RationalActivation(nn.Module):
    """Per-neuron learnable rational activation; ``grow`` appends neurons without changing old ones."""

    def __init__(self, width: int, init: Sequence[float]) -> None:
        super().__init__()
        v, c, l = (torch.full((width,), float(value)) for value in init)  # noqa: E741
        self.v, self.c, self.l = nn.Parameter(v), nn.Parameter(c), nn.Parameter(l)

    @property
    def width(self) -> int:
        return int(self.v.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        return rational(x, self.v, self.c, self.l)

    def grow(self, count: int, init: Sequence[float]) -> None:
        """Append ``count`` neurons starting at ``init``; replaces the parameters (rebuild optimizers)."""
        for name, value in zip(("v", "c", "l"), init):
            old = getattr(self, name).detach()
            new = torch.cat([old, torch.full((count,), float(value), dtype=old.dtype)])
            setattr(self, name, nn.Parameter(new))

    @classmethod
    def concatenated(cls, parts: Sequence[tuple[int, Sequence[float]]]) -> RationalActivation:
        """An activation whose neurons are the given (count, init) groups, in order."""
        first_count, first_init = parts[0]
        act = cls(first_count, first_init)
        for count, init in parts[1:]:
            act.grow(count, init)
        return act


def _linear_from(weight: Tensor, bias: Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def add_output_rows(layer: nn.Linear, weight_rows: Tensor, bias_rows: Tensor) -> nn.Linear:
    """A copy of ``layer`` with extra output neurons (rows) appended."""
    dtype = layer.weight.dtype
    weight = torch.cat([layer.weight.detach(), weight_rows.to(dtype)], dim=0)
    bias = torch.cat([layer.bias.detach(), bias_rows.to(dtype)], dim=0)
    return _linear_from(weight, bias)


def add_zero_input_columns(layer: nn.Linear, count: int) -> nn.Linear:
    """A copy of ``layer`` reading ``count`` extra inputs through zero weights (same function)."""
    old = layer.weight.detach()
    weight = torch.cat([old, old.new_zeros(old.shape[0], count)], dim=1)
    return _linear_from(weight, layer.bias.detach())


def identity_plus_rows(width: int, weight_rows: Tensor, bias_rows: Tensor) -> nn.Linear:
    """A ``width -> width + k`` layer: identity on the first ``width`` outputs, then the given rows."""
    eye = torch.eye(width, dtype=weight_rows.dtype)
    weight = torch.cat([eye, weight_rows], dim=0)
    bias = torch.cat([weight_rows.new_zeros(width), bias_rows], dim=0)
    return _linear_from(weight, bias)
