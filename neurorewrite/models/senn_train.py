"""A plain minibatch training loop for SelfExpandingMLP that calls its growth hook every epoch.

``fit`` is the reference use of :meth:`SelfExpandingMLP.maybe_grow`: grow (if due) at the start of each
epoch on the full training set, rebuild the Adam optimizer whenever the parameters changed, then one
shuffled pass of minibatch steps on the mean per-sample loss. ``grow=False`` trains a fixed network
with the identical loop (the fair baseline). ``on_epoch`` hands over a :class:`FitState` after every
epoch and ``resume`` continues from one; under ``torch.distributed`` the same call trains one shard
per rank (see :func:`fit`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neurorewrite.models.distributed import all_ranks_sum, check_equal_counts, distributed_active
from neurorewrite.models.senn import GrowthEvent, SelfExpandingMLP
from neurorewrite.models.senn_config import check_nonnegative_float, check_positive_int
from neurorewrite.models.senn_data import check_data, loss_sum


@dataclass
class FitResult:
    """Mean training loss per epoch (over all ranks) and every growth event, in order."""

    losses: list[float] = field(default_factory=list)
    events: list[GrowthEvent] = field(default_factory=list)


@dataclass
class FitState:
    """Where ``fit`` stands after an epoch: with the network's own ``state_dict``, enough to resume it
    exactly. ``optimizer`` is Adam's ``state_dict`` and ``generator`` the batch-order generator's
    state; both hold live tensors, so save them when ``on_epoch`` hands them over (``torch.save`` copies)."""

    epoch: int  # epochs completed
    optimizer: dict[str, Any]
    generator: Tensor

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``torch.save`` (``torch.load``'s default ``weights_only`` refuses classes)."""
        return {"epoch": self.epoch, "optimizer": self.optimizer, "generator": self.generator}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FitState:
        return cls(int(data["epoch"]), data["optimizer"], data["generator"])


def mean_loss(net: SelfExpandingMLP, x: Tensor, y: Tensor) -> float:
    """The mean per-sample loss of ``net`` on ``(x, y)`` (the quantity ``fit`` minimises)."""
    x, y = check_data(x, y, net.in_features, net.out_features, net.loss)
    with torch.no_grad():
        return float(loss_sum(net(x), y, net.loss)) / x.shape[0]


def _data_parallel(net: SelfExpandingMLP) -> nn.Module:
    """``net`` for the minibatch steps: wrapped in DistributedDataParallel under torch.distributed
    (rebuilt after every growth, which replaces parameters; construction broadcasts rank 0's weights)."""
    return nn.parallel.DistributedDataParallel(net) if net.config.sync_ranks and distributed_active() else net


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
    resume: FitState | None = None,
    on_epoch: Callable[[FitState], None] | None = None,
) -> FitResult:
    """Train ``net`` in place with Adam for ``epochs`` epochs, growing it when ``grow`` is set.

    ``resume`` (a :class:`FitState` saved by ``on_epoch``, with ``net`` loaded from the same
    checkpoint) continues from its epoch as if never stopped. Under ``torch.distributed`` each rank
    passes its own shard ``(x, y)`` (the same number of samples on every rank): growth is scored on
    the union of the shards and decided identically everywhere (:mod:`neurorewrite.models.senn_distributed`),
    and the steps run under DistributedDataParallel, so the ranks' networks stay identical.
    """
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    check_nonnegative_float("lr", lr, strictly_positive=True)
    x, y = check_data(x, y, net.in_features, net.out_features, net.loss)
    if net.config.sync_ranks:
        check_equal_counts(x.shape[0], "training samples")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    start = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        generator.set_state(resume.generator)
        start = resume.epoch
    trainer = _data_parallel(net)
    result = FitResult()
    for epoch in range(start, epochs):
        if grow:
            events = net.maybe_grow(x, y, epoch)
            if events:
                # Growth replaced parameter tensors: the old optimizer would update orphans.
                optimizer = torch.optim.Adam(net.parameters(), lr=lr)
                trainer = _data_parallel(net)
                result.events.extend(events)
        total = 0.0
        for batch in torch.randperm(x.shape[0], generator=generator).split(batch_size):
            optimizer.zero_grad()
            batch_loss = loss_sum(trainer(x[batch]), y[batch], net.loss)
            (batch_loss / batch.shape[0]).backward()
            optimizer.step()
            total += float(batch_loss.detach())
        count = float(x.shape[0])
        if net.config.sync_ranks:
            total, count = all_ranks_sum([total, count])
        result.losses.append(total / count)
        if on_epoch is not None:
            on_epoch(FitState(epoch + 1, optimizer.state_dict(), generator.get_state()))
    return result
