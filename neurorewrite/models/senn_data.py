"""Checking a SENN's training data against the model, and the losses SENN scores and trains with.

The per-sample losses are fixed here so that growth scores and training agree: ``"mse"`` is
``0.5 * ||y - t||^2`` (output Fisher = identity), ``"cross_entropy"`` is ``-log softmax(y)[t]``
(output Fisher = ``diag(p) - p p^T``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional

from neurorewrite.errors import DataError


def check_data(x: object, y: object, in_features: int, out_features: int, loss: str) -> tuple[Tensor, Tensor]:
    """Return ``(x, y)`` shaped for the model (``y`` of shape (n, out) for mse), or raise DataError."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise DataError(f"SENN data must be torch tensors, got x: {type(x).__name__}, y: {type(y).__name__}")
    if x.dim() != 2 or x.shape[1] != in_features:
        raise DataError(f"SENN inputs x must have shape (n, {in_features}) (in_features), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"SENN inputs x must be floating point, got {x.dtype}")
    if x.shape[0] == 0 or y.shape[0] != x.shape[0]:
        raise DataError(f"SENN x and y must hold the same nonzero number of samples, got {x.shape[0]} and {y.shape[0]}")
    if not torch.isfinite(x).all():
        raise DataError("SENN inputs x contain NaN or infinite values")
    if loss == "cross_entropy":
        return x, _check_labels(y, out_features)
    if y.dim() == 1 and out_features == 1:
        y = y[:, None]
    if y.dim() != 2 or y.shape[1] != out_features or not y.is_floating_point():
        raise DataError(
            f"SENN mse targets y must be floating point of shape (n, {out_features}) (out_features), "
            f"got {tuple(y.shape)} {y.dtype}"
        )
    if not torch.isfinite(y).all():
        raise DataError("SENN targets y contain NaN or infinite values")
    return x, y


def _check_labels(y: Tensor, out_features: int) -> Tensor:
    if y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise DataError(f"SENN cross_entropy targets y must be integer class labels of shape (n,), got {tuple(y.shape)} {y.dtype}")
    if int(y.min()) < 0 or int(y.max()) >= out_features:
        raise DataError(
            f"SENN class labels must lie in [0, {out_features}) (out_features), got range [{int(y.min())}, {int(y.max())}]"
        )
    return y.long()


def loss_sum(output: Tensor, target: Tensor, loss: str) -> Tensor:
    """Sum over samples of the per-sample loss, so that d(sum)/d(output_i) is sample i's own gradient."""
    if loss == "cross_entropy":
        return functional.cross_entropy(output, target, reduction="sum")
    return 0.5 * ((output - target) ** 2).sum()


def output_fisher_vectors(output: Tensor, target: Tensor, loss: str, fisher: str) -> Tensor:
    """Per-sample vectors ``M`` (n, O, K) with ``M M^T`` the Fisher of the loss in output space.

    ``gauss_newton``: identity for mse, ``diag(sqrt p) - p sqrt(p)^T`` for cross entropy (whose product
    with its transpose is ``diag(p) - p p^T`` because ``sum(p) = 1``). ``empirical``: the observed output
    gradient itself (K = 1).
    """
    output = output.detach()
    if fisher == "empirical":
        with torch.enable_grad():
            out = output.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_sum(out, target, loss), out)
        return grad[:, :, None]
    n, width = output.shape
    if loss == "mse":
        return torch.eye(width, dtype=output.dtype).expand(n, width, width)
    p = torch.softmax(output, dim=1)
    sqrt_p = p.sqrt()
    return torch.diag_embed(sqrt_p) - p[:, :, None] * sqrt_p[:, None, :]
