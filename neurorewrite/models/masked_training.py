"""Training a module with fixed FPE masks by any loss, in one process or under DistributedDataParallel.

:func:`masked_train` is the loop that :func:`finetune` (labels) and distillation (a teacher's outputs,
:func:`teacher_loss`) share. The loss is a function of ``(model, batch)``, so
anything that maps a batch to a scalar trains through it. Invariants, with or without
``torch.distributed``:

- every :class:`~neurorewrite.models.fpe.MaskedLinear` keeps its pruned weights at exactly 0.0: the
  optimizer goes through :func:`~neurorewrite.models.fpe.enforce_masks` (gradients masked as autograd
  computes them and before each step, weights after it), and each step is given a closure that
  recomputes the loss, so LBFGS trains too;
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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neurorewrite.checks import integer_at_least
from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.models.distributed import all_ranks_sum, check_equal_counts
from neurorewrite.models.fpe import enforce_masks

__all__ = ["BatchLoss", "FinetuneResult", "finetune", "masked_train", "supervised_loss", "teacher_loss"]

Progress = Callable[[int, int, str], None]
BatchLoss = Callable[[nn.Module, Any], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor | dict[str, Tensor], Tensor]


@dataclass
class FinetuneResult:
    """Mean training loss per epoch and the loss that was used."""

    loss_name: str
    epoch_losses: list[float] = field(default_factory=list)


def default_loss(target: Tensor) -> tuple[str, LossFn]:
    """Cross-entropy for integer class labels, mean squared error for float targets."""
    if target.dtype.is_floating_point:
        return "mse", nn.functional.mse_loss
    if target.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        return "cross_entropy", lambda out, y: nn.functional.cross_entropy(out, y.long())
    raise DataError(f"targets of dtype {target.dtype} are neither integer labels nor float targets")


def first_output(out: object) -> Tensor:
    """The tensor a loss compares: ``out`` itself, or the first tensor of a tuple or a Hugging Face
    ``ModelOutput`` (``last_hidden_state``, ``logits``)."""
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for value in values:
        if isinstance(value, Tensor):
            return value
    raise DataError(f"the model returned {type(out).__name__}, which holds no tensor to compute a loss on")


def call_model(model: nn.Module, x: Tensor | dict[str, Tensor]) -> Tensor:
    """``first_output(model(x))``, or ``model(**x)`` for a dict of keyword inputs."""
    return first_output(model(**x) if isinstance(x, dict) else model(x))


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


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the length of the tensor, or of the first tensor of a tuple/list/dict
    (a tuple's first item may itself be a dict of keyword inputs)."""
    if isinstance(batch, Tensor):
        return len(batch)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (Tensor, dict)):
        return batch_samples(batch[0])
    raise DataError(f"a batch must be a tensor or a tuple/list/dict of tensors, got {type(batch).__name__}")


def supervised_loss(loss: LossFn) -> BatchLoss:
    """``(model, (x, y)) -> loss(model(x), y)`` (``x`` may be a dict of keyword inputs)."""

    def batch_loss(model: nn.Module, batch: Any) -> Tensor:
        x, y = batch
        return loss(call_model(model, x), y)

    return batch_loss


def teacher_loss(teacher: nn.Module, loss: LossFn = nn.functional.mse_loss) -> BatchLoss:
    """Label-free distillation: ``loss(model(x), teacher(x))`` with the teacher frozen and in eval mode.

    A batch is ``x`` or a tuple whose first item is ``x`` (labels, if any, are ignored). For token
    batches with padding, :func:`neurorewrite.models.distill.distillation_loss` leaves padding out."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def batch_loss(model: nn.Module, batch: Any) -> Tensor:
        x = batch if isinstance(batch, (Tensor, dict)) else batch[0]
        with torch.no_grad():
            target = call_model(teacher, x)
        return loss(call_model(model, x), target)

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
    epochs = integer_at_least("--epochs", epochs, 0)
    if isinstance(batches, Sized):
        check_equal_counts(len(batches), "batches per epoch")
    handles = enforce_masks(optimizer, model)
    losses: list[float] = []
    try:
        for epoch in range(epochs):
            model.train()
            total, count = 0.0, 0
            for batch in batches:
                values: list[Tensor] = []
                optimizer.step(_closure(model, optimizer, loss, batch, values))
                samples = batch_samples(batch)
                total += float(values[0].detach()) * samples  # the loss before the step (LBFGS evaluates several)
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


def _closure(model: nn.Module, optimizer: torch.optim.Optimizer, loss: BatchLoss, batch: Any,
             values: list[Tensor]) -> Callable[[], Tensor]:
    """The step's closure: zero the gradients, compute the loss on ``batch``, backpropagate, return it
    (and append it to ``values``)."""
    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        value = loss(model, batch)
        value.backward()
        values.append(value)
        return value
    return closure


def finetune(
    model: nn.Module,
    loader: Iterable[Batch],
    epochs: int = 25,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    loss: LossFn | None = None,
    progress: Progress | None = None,
) -> FinetuneResult:
    """Train ``model`` in place for ``epochs`` passes over ``loader`` (batches of ``(x, y)``).

    ``x`` is a tensor, or a dict of keyword inputs (``model(**x)``, e.g. ``input_ids`` and
    ``attention_mask``); the loss compares :func:`first_output` of what the model returns with ``y``.

    ``optimizer`` defaults to Adam(lr); any torch optimizer works (LBFGS too), the masks are enforced
    around its steps. ``loss`` defaults to :func:`default_loss` of the first batch's targets. The model
    is left in eval mode. ``model`` may be a ``DistributedDataParallel`` wrapper: this is
    :func:`masked_train` with a supervised loss.
    """
    if optimizer is None:
        optimizer = make_optimizer(model, "adam", lr)
    result = FinetuneResult(loss_name="custom" if loss is not None else "")
    chosen: list[LossFn] = [] if loss is None else [loss]

    def batch_loss(module: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        if not chosen:
            result.loss_name, picked = default_loss(y)
            chosen.append(picked)
        return chosen[0](call_model(module, x), y)

    result.epoch_losses = masked_train(model, loader, batch_loss, epochs=epochs, optimizer=optimizer, progress=progress)
    return result
