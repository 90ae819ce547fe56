"""Where and what a SENN adds: one growth proposal from the scores of every layer.

For each linear layer ``L_c`` (the consumer) two kinds of new inputs are considered:

- width: a new neuron in the hidden layer just before ``L_c``, reading that hidden layer's input;
- depth: a new hidden layer inserted just before ``L_c``: identity on ``L_c``'s current input (identity
  activation too) plus one new nonlinear neuron reading that same input.

Either way the new neuron feeds ``L_c`` through a zero weight, so its gain is the candidate lower bound
on ``L_c``'s score. A proposal passes when ``gain / eta_c > tau`` and ``gain / E||dL/dy||^2 >
alpha_abs``; the best passing width proposal is taken unless a depth proposal beats it by
``depth_margin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_layers import rational
from neurorewrite.models.senn_score import Candidate, RecordedBatch, search_candidates

_TINY = 1e-30


@dataclass(frozen=True)
class Proposal:
    """A scored growth step: ``kind`` "width" grows hidden layer ``layer``; "depth" inserts one there."""

    kind: str
    layer: int
    candidate: Candidate
    eta: float
    ratio: float
    absolute: float


def propose(
    recorded: RecordedBatch,
    widths: list[int],
    config: SENNConfig,
    activation_init: tuple[float, float, float],
    generator: torch.Generator,
    allow_depth: bool = True,
) -> Proposal | None:
    """The growth step to take now, or None when nothing passes both thresholds.

    ``allow_depth=False`` restricts this call to width (``config.allow_depth`` must also be set for depth).
    """
    v, c, l = (torch.tensor(value, dtype=torch.float64) for value in activation_init)  # noqa: E741

    def activation(x: Tensor) -> Tensor:
        return rational(x, v, c, l)

    total_eta = sum(layer.eta for layer in recorded.layers)
    best: dict[str, Proposal] = {}
    for consumer, factors in enumerate(recorded.layers):
        reference = total_eta if config.tau_reference == "total" else factors.eta
        for kind, layer, source in _options(consumer, recorded, widths, config, allow_depth):
            found = search_candidates(
                source, factors, activation, config.candidates, config.search_steps, config.search_lr, generator
            )
            ratio = found.gain / max(reference, _TINY)
            absolute = found.gain / max(recorded.output_grad_sq, _TINY)
            if ratio <= config.tau or absolute <= config.alpha_abs:
                continue
            if kind not in best or found.gain > best[kind].candidate.gain:
                best[kind] = Proposal(kind, layer, found, reference, ratio, absolute)
    width, depth = best.get("width"), best.get("depth")
    if depth is not None and (width is None or depth.candidate.gain > config.depth_margin * width.candidate.gain):
        return depth
    return width


def _options(
    consumer: int, recorded: RecordedBatch, widths: list[int], config: SENNConfig, allow_depth: bool
) -> list[tuple[str, int, Tensor]]:
    """(kind, hidden layer index, candidate source) for every growth allowed in front of ``consumer``."""
    options = []
    if config.allow_width and consumer >= 1 and widths[consumer - 1] < config.max_width:
        options.append(("width", consumer - 1, recorded.sources[consumer - 1]))
    source = recorded.sources[consumer]
    if allow_depth and config.allow_depth and len(widths) < config.max_hidden_layers and source.shape[1] + 1 <= config.max_width:
        options.append(("depth", consumer, source))
    return options
