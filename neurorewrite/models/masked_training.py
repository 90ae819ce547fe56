"""Training a module with fixed FPE masks by any loss, in one process or under DistributedDataParallel.

:func:`masked_train` is the loop that :func:`neurorewrite.models.finetune` (labels) and distillation
(a teacher's outputs, :func:`teacher_loss`) share. The loss is a function of ``(model, batch)``, so
anything that maps a batch to a scalar trains through it. Invariants, with or without
``torch.distributed``:

- every :class:`~neurorewrite.models.fpe.MaskedLinear` keeps its pruned weights at exactly 0.0: the
  optimizer goes through :func:`~neurorewrite.models.fpe.enforce_masks` (gradients masked before each
  step, weights after it);
- under ``DistributedDataParallel`` (pass the wrapped model) the gradients are averaged over ranks
  before the masked step, so every rank takes the same step and the ranks' weights stay identical;
  with the loss a mean over each rank's samples and the same number of samples on every rank, the
  averaged gradient is that of the global batch, so the run equals one process on the global
  batches (to floating-point rounding of the sum);
- the reported epoch loss is the sample-weighted mean over all ranks.

A distillation of an expanded ONNX model plugs in the same way: lift it into torch (its trainable
linears as MaskedLinear, e.g. :class:`~neurorewrite.models.onnx_module.OnnxMLP`), wrap it in DDP, and
call ``masked_train(ddp, RankShards((x,), global_batch), teacher_loss(teacher), ...)`` with the dense
model (lifted, or any module giving its outputs) as the teacher; or, with the teacher's outputs
computed beforehand, ``supervised_loss(mse_loss)`` over ``RankShards((x, teacher_outputs), ...)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sized
from typing import Any

import torch
from torch import Tensor, nn

from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.models.distributed import all_ranks_sum, check_equal_counts
from neurorewrite.models.fpe import enforce_masks

__all__ = ["BatchLoss", "masked_train", "supervised_loss", "teacher_loss"]

Progress = Callable[[int, int, str], None]
BatchLoss = Callable[[nn.Module, Any], Tensor]


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the length of the tensor, or of the first tensor of a tuple/list/dict."""
    if isinstance(batch, Tensor):
        return len(batch)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return len(batch[0])
    raise DataError(f"a batch must be a tensor or a tuple/list/dict of tensors, got {type(batch).__name__}")


def supervised_loss(loss: Callable[[Tensor, Tensor], Tensor]) -> BatchLoss:
    """``(model, (x, y)) -> loss(model(x), y)``."""

    def batch_loss(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return loss(model(x), y)

    return batch_loss


def teacher_loss(teacher: nn.Module, loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss) -> BatchLoss:
    """Label-free distillation: ``loss(model(x), teacher(x))`` with the teacher frozen and in eval mode.

    A batch is ``x`` or a tuple whose first item is ``x`` (labels, if any, are ignored)."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def batch_loss(model: nn.Module, batch: Any) -> Tensor:
        x = batch if isinstance(batch, Tensor) else batch[0]
        with torch.no_grad():
            target = teacher(x)
        return loss(model(x), target)

    return batch_loss


def masked_train(
    model: nn.Module,
    batches: Iterable[Any],
    loss: BatchLoss,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    progress: Progress | None = None,
) -> list[float]:
    """Train ``model`` (or its DDP wrapper) in place for ``epochs`` passes over ``batches``; return the
    mean loss per epoch (over all ranks). See the module docstring for what holds. The model is left
    in eval mode. Under DDP, give every rank the same number of batches and samples per batch."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise InvalidOptionError(f"--epochs must be an integer >= 0, got {epochs!r}")
    if isinstance(batches, Sized):
        check_equal_counts(len(batches), "batches per epoch")
    handles = enforce_masks(optimizer, model)
    losses: list[float] = []
    try:
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                value = loss(model, batch)
                value.backward()
                optimizer.step()
                samples = batch_samples(batch)
                total += float(value.detach()) * samples
                count += samples
            total, count_all = all_ranks_sum([total, float(count)])
            if count_all == 0:
                raise DataError("the training data is empty: the loader gave no batches")
            losses.append(total / count_all)
            if progress is not None:
                progress(epoch + 1, epochs, f"loss {losses[-1]:.4g}")
    finally:
        for handle in handles:
            handle.remove()
        model.eval()
    return losses
