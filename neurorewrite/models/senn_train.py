"""A plain minibatch training loop for SelfExpandingMLP that calls its growth hook every epoch.

``fit`` is the reference use of :meth:`SelfExpandingMLP.maybe_grow`: grow (if due) at the start of each
epoch on the full training set, rebuild the Adam optimizer whenever the parameters changed, then one
shuffled pass of minibatch steps on the mean per-sample loss. ``grow=False`` trains a fixed network
with the identical loop (the fair baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from neurorewrite.models.senn import GrowthEvent, SelfExpandingMLP
from neurorewrite.models.senn_config import check_nonnegative_float, check_positive_int
from neurorewrite.models.senn_data import check_data, loss_sum


@dataclass
class FitResult:
    """Mean training loss per epoch and every growth event, in order."""

    losses: list[float] = field(default_factory=list)
    events: list[GrowthEvent] = field(default_factory=list)


def mean_loss(net: SelfExpandingMLP, x: Tensor, y: Tensor) -> float:
    """The mean per-sample loss of ``net`` on ``(x, y)`` (the quantity ``fit`` minimises)."""
    x, y = check_data(x, y, net.in_features, net.out_features, net.loss)
    with torch.no_grad():
        return float(loss_sum(net(x), y, net.loss)) / x.shape[0]


def fit(
    net: SelfExpandingMLP,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-2,
    grow: bool = True,
    seed: int = 0,
) -> FitResult:
    """Train ``net`` in place with Adam for ``epochs`` epochs, growing it when ``grow`` is set."""
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_nonnegative_float("lr", lr, strictly_positive=True)
    x, y = check_data(x, y, net.in_features, net.out_features, net.loss)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    result = FitResult()
    for epoch in range(epochs):
        if grow:
            events = net.maybe_grow(x, y, epoch)
            if events:
                # Growth replaced parameter tensors: the old optimizer would update orphans.
                optimizer = torch.optim.Adam(net.parameters(), lr=lr)
                result.events.extend(events)
        total = 0.0
        for batch in torch.randperm(x.shape[0], generator=generator).split(batch_size):
            optimizer.zero_grad()
            batch_loss = loss_sum(net(x[batch]), y[batch], net.loss)
            (batch_loss / batch.shape[0]).backward()
            optimizer.step()
            total += float(batch_loss.detach())
        result.losses.append(total / x.shape[0])
    return result
