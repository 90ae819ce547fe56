"""Label-free distillation with fixed FPE masks: the student learns to give the teacher's outputs.

:func:`distill` trains ``student`` (a module whose expanded layers are
:class:`~neurorewrite.models.fpe.MaskedLinear`, e.g. from ``fpe_expand``, or an ONNX graph lifted by
:class:`~neurorewrite.models.onnx_module.OnnxGraph`) so that its outputs match a frozen ``teacher``'s
(the model before expansion) on unlabelled batches. Pruned weights stay exactly 0.0 (the optimizer goes
through :func:`~neurorewrite.models.fpe.enforce_masks`), so the nonzero count is unchanged. After every
epoch the distance on held-out batches is measured; training stops when it has not improved for
``patience`` epochs, and the best weights are kept (without held-out batches: every epoch runs and
the last weights are kept).

A batch is a mapping of keyword arguments (``student(**batch)``, as a Hugging Face model takes
``input_ids`` and ``attention_mask``). Outputs may be a tensor, a tuple/list, or a mapping
(``ModelOutput``) of tensors; every floating tensor is matched. With an ``attention_mask`` in the batch,
positions it masks out do not count in outputs shaped ``(batch, positions, ...)``.

The loss is a :data:`BatchLoss` ``(model, batch) -> scalar``, the interface of the DDP-aware masked
training loop (``masked_train``), so the same :func:`distillation_loss` trains under
DistributedDataParallel there.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neurorewrite.checks import integer_at_least
from neurorewrite.errors import DataError
from neurorewrite.models.fpe import enforce_masks, masked_layers

Batch = Mapping[str, Tensor]
BatchLoss = Callable[[nn.Module, Batch], Tensor]
Progress = Callable[[int, int, str], None]
MASK_KEY = "attention_mask"


def output_tensors(out: Any) -> list[Tensor]:
    """The floating tensors of a model's output (a tensor, a sequence or a mapping of them), in order."""
    if isinstance(out, Tensor):
        return [out] if out.dtype.is_floating_point else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in output_tensors(item)]
    return []


def _rows(value: Tensor, mask: Tensor | None) -> Tensor:
    """``value`` as rows of its last axis, positions the mask marks as padding left out."""
    if mask is not None and value.dim() >= 3 and tuple(value.shape[:2]) == tuple(mask.shape):
        return value[mask.bool()]
    return value.reshape(len(value), -1) if value.dim() <= 2 else value.reshape(-1, value.shape[-1])


def relative_distance(student: Any, teacher: Any, mask: Tensor | None = None) -> Tensor:
    """Mean over matched tensors of ``||s - t||^2 / ||t||^2`` over real rows: scale-free, 0 when equal."""
    s_out, t_out = output_tensors(student), output_tensors(teacher)
    if len(s_out) != len(t_out) or not s_out:
        raise DataError(f"the student gives {len(s_out)} floating output(s), the teacher {len(t_out)}; they must match")
    terms = []
    for s, t in zip(s_out, t_out):
        if s.shape != t.shape:
            raise DataError(f"a student output has shape {list(s.shape)} where the teacher's has {list(t.shape)}")
        sr, tr = _rows(s, mask), _rows(t, mask).detach()
        terms.append((sr - tr).pow(2).sum() / tr.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distillation_loss(teacher: nn.Module, distance: Callable[..., Tensor] = relative_distance) -> BatchLoss:
    """``(model, batch) -> distance(model(**batch), teacher(**batch))`` with the teacher frozen (eval mode,
    no gradients); the batch's ``attention_mask`` marks the rows that count."""
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)

    def batch_loss(model: nn.Module, batch: Batch) -> Tensor:
        with torch.no_grad():
            target = teacher(**batch)
        return distance(model(**batch), target, batch.get(MASK_KEY))

    return batch_loss


@dataclass
class DistillResult:
    held_out_before: float
    held_out_after: float
    history: list[float] = field(default_factory=list)  # held-out distance after each epoch
    epoch_losses: list[float] = field(default_factory=list)
    best_epoch: int = 0  # 0: the weights before training were the best
    stopped_early: bool = False
    steps: int = 0


def evaluate(model: nn.Module, batches: Iterable[Batch], loss: BatchLoss) -> float:
    """The loss averaged over ``batches`` (weighted by batch size), without gradients."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            n = len(next(iter(batch.values())))
            total += float(loss(model, batch)) * n
            count += n
    return total / count if count else float("nan")


def _trained_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "mask" not in k}


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Sequence[Batch] | Callable[[int], Iterable[Batch]],
    held_out: Sequence[Batch],
    *,
    epochs: int = 10,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-4,
    patience: int = 2,
    loss: BatchLoss | None = None,
    progress: Progress | None = None,
) -> DistillResult:
    """Train ``student`` in place to match ``teacher`` on ``batches``; see the module docstring.

    ``batches`` is a sequence (shuffle it yourself) or a function ``epoch -> batches``. ``loss`` defaults
    to :func:`distillation_loss` of ``teacher``. ``optimizer`` defaults to Adam(lr) over the parameters
    that require gradients. The student is left in eval mode with the best held-out weights.
    """
    epochs = integer_at_least("--epochs", epochs, 0)
    if loss is None:
        if teacher is None:
            raise DataError("distill needs a teacher or a loss")
        loss = distillation_loss(teacher)
    if optimizer is None:
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    epoch_batches = batches if callable(batches) else (lambda _: batches)
    result = DistillResult(evaluate(student, held_out, loss) if held_out else float("inf"), 0.0)
    best, best_state, since_best = result.held_out_before, _trained_state(student), 0
    handles = enforce_masks(optimizer, student)
    try:
        for epoch in range(1, epochs + 1):
            student.train()
            total, count = 0.0, 0
            current = list(epoch_batches(epoch - 1))
            per_epoch = len(current)
            for i, batch in enumerate(current):
                optimizer.zero_grad(set_to_none=True)
                value = loss(student, batch)
                value.backward()
                optimizer.step()
                n = len(next(iter(batch.values())))
                total, count, result.steps = total + float(value.detach()) * n, count + n, result.steps + 1
                if progress is not None:
                    progress((epoch - 1) * per_epoch + i + 1, epochs * per_epoch, f"epoch {epoch} loss {total / count:.4g}")
            if count == 0:
                raise DataError("the training data is empty: no batches")
            result.epoch_losses.append(total / count)
            held = evaluate(student, held_out, loss) if held_out else result.epoch_losses[-1]
            result.history.append(held)
            if held < best or not held_out:  # without held-out batches: no early stop, the last weights
                best, best_state, since_best, result.best_epoch = held, _trained_state(student), 0, epoch
            else:
                since_best += 1
                if since_best >= patience:
                    result.stopped_early = epoch < epochs
                    break
    finally:
        for handle in handles:
            handle.remove()
    student.load_state_dict(best_state, strict=False)
    for layer in masked_layers(student):
        layer.apply_mask()
    student.eval()
    result.held_out_after = best
    return result
