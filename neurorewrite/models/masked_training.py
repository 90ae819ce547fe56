"""Training with fixed FPE masks: ``finetune(model, loader, epochs)``.

The loop is an ordinary supervised loop with one addition: the optimizer goes through
:func:`neurorewrite.models.fpe.enforce_masks`, so pruned weights of every :class:`MaskedLinear` stay
exactly zero whatever the optimizer does (momentum, weight decay, Adam moments). A model without
masked layers just trains densely, which is how the benchmarks train their dense baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from neurorewrite.checks import integer_at_least
from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.models.fpe import enforce_masks

Progress = Callable[[int, int, str], None]
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

    ``optimizer`` defaults to Adam(lr); any torch optimizer works (each step is given a closure that
    recomputes the loss, so LBFGS runs too), the masks are enforced around its steps. ``loss`` defaults
    to :func:`default_loss` of the first batch's targets. The model is left in eval mode.
    """
    epochs = integer_at_least("--epochs", epochs, 0)
    if optimizer is None:
        optimizer = make_optimizer(model, "adam", lr)
    handles = enforce_masks(optimizer, model)
    result = FinetuneResult(loss_name="custom" if loss is not None else "")
    try:
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for x, y in loader:
                if loss is None:
                    result.loss_name, loss = default_loss(y)
                losses: list[torch.Tensor] = []
                optimizer.step(_closure(model, optimizer, loss, x, y, losses))
                total += float(losses[0].detach()) * len(x)  # the loss before the step (LBFGS evaluates several)
                count += len(x)
            if count == 0:
                raise DataError("the training data is empty: the loader gave no batches")
            result.epoch_losses.append(total / count)
            if progress is not None:
                progress(epoch + 1, epochs, f"loss {total / count:.4g}")
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    return result


def _closure(model: nn.Module, optimizer: torch.optim.Optimizer, loss: LossFn, x: torch.Tensor, y: torch.Tensor,
             losses: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """The step's closure: zero the gradients, compute the loss on ``(x, y)``, backpropagate, return it
    (and append it to ``losses``)."""
    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = loss(model(x), y)
        value.backward()
        losses.append(value)
        return value
    return closure
