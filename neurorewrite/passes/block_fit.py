"""Block-wise reconstruction: train one expanded block's layers, masks fixed, to reproduce a target.

The second stage of ``calibrate --refit block`` (``docs/methods.md`` 1.7): after the closed-form refit
of ``W2'``, Adam on ``||block(x) - t||^2`` over ``W1', b1', W2', b2`` with every pruned weight held at
exactly zero (:func:`neurorewrite.models.fpe.enforce_masks`), on rows ``(x, t)`` of the sample: the
block's inputs in the expanded model and its targets. The first layer is where FPE changed the
function (``act(a + b) != act(a) + act(b)``); only a gradient method reaches it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from neurorewrite.models.fpe import enforce_masks
from neurorewrite.models.onnx_module import OnnxGraph, Step


def fit_block(
    graph: OnnxGraph, steps: Sequence[Step], keys: Sequence[str], x_name: str, y_name: str,
    x: torch.Tensor, t: torch.Tensor, iterations: int, lr: float, batch: int, seed: int = 0,
) -> tuple[float, float]:
    """Train the layers ``keys`` of ``graph`` so that running its ``steps`` (one block: the first linear,
    the activation, the second linear) on rows ``x`` (fed as ``x_name``) gives ``t`` at ``y_name``.

    Returns the mean squared error on the rows before and after. The layers keep their nonzero pattern.
    """
    layers = nn.ModuleList(graph.layers[k] for k in keys)
    params = [p for layer in layers for p in layer.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    handles = enforce_masks(optimizer, layers)
    generator = torch.Generator().manual_seed(seed)

    def run(rows: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, graph.run_steps({x_name: rows}, steps)[y_name])

    def error() -> float:
        with torch.no_grad():
            total = sum(float((run(x[s : s + 4096]) - t[s : s + 4096]).pow(2).sum()) for s in range(0, len(x), 4096))
        return total / max(1, t.numel())

    before = error()
    try:
        for _ in range(iterations):
            idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            loss = (run(x[idx]) - t[idx]).pow(2).mean()
            loss.backward()
            optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    for layer in layers:
        layer.apply_mask()
        layer.restore_support()
    return before, error()
