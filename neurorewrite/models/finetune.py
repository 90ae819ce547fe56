"""Training with fixed FPE masks: ``finetune(model, loader, epochs)``.

The loop is :func:`neurorewrite.models.masked_training.masked_train` with a supervised loss: the
optimizer goes through :func:`neurorewrite.models.fpe.enforce_masks`, so pruned weights of every
:class:`MaskedLinear` stay exactly zero whatever the optimizer does (momentum, weight decay, Adam
moments), in one process or under DistributedDataParallel. A model without masked layers just trains
densely, which is how the benchmarks train their dense baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.models.masked_training import Progress, masked_train

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FinetuneResult:
    """Mean training loss per epoch and the loss that was used."""

    loss_name: str
    epoch_losses: list[float] = field(default_factory=list)


def default_loss(target: torch.Tensor) -> tuple[str, LossFn]:
    """Cross-entropy for integer class labels, mean squared error for float targets."""
    if target.dtype.is_floating_point:
        return "mse", nn.functional.mse_loss
    if target.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return "cross_entropy", lambda out, y: nn.functional.cross_entropy(out, y.long())
    raise DataError(f"targets of dtype {target.dtype} are neither integer labels nor float targets")


def make_optimizer(
    model: nn.Module, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """One of the optimizers the CLI offers: ``adam``, ``adamw`` or ``sgd``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise InvalidOptionError(f"--optimizer must be one of adam, adamw, sgd, got {name!r}")


def finetune(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 25,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    loss: LossFn | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``model`` in place for ``epochs`` passes over ``loader`` (batches of ``(x, y)``).

    ``optimizer`` defaults to Adam(lr); any torch optimizer works, the masks are enforced around its
    steps. ``loss`` defaults to :func:`default_loss` of the first batch's targets. The model is left in
    eval mode. ``model`` may be a ``DistributedDataParallel`` wrapper: see
    :func:`neurorewrite.models.masked_training.masked_train`, which this is.
    """
    if optimizer is None:
        optimizer = make_optimizer(model, "adam", lr)
    result = FinetuneResult(loss_name="custom" if loss is not None else "")
    chosen: list[LossFn] = [] if loss is None else [loss]

    def batch_loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        if not chosen:
            result.loss_name, picked = default_loss(y)
            chosen.append(picked)
        return chosen[0](module(x), y)

    result.epoch_losses = masked_train(model, loader, batch_loss, epochs=epochs, optimizer=optimizer, progress=progress)
    return result
