"""Fixed masks under optimizers that the re-mask after each step cannot fix on its own.

``enforce_masks`` promises that training an FPE model with any torch optimizer trains the sparse
model: the kept weights move exactly as they would if the pruned weights did not exist. The reference
here is a copy whose layers multiply their weights by the masks inside the forward pass, so pruned
entries get a zero gradient from autograd itself. Optimizers that mix entries (Adafactor's factored
second moments, LBFGS's dot products and closures) and gradient clipping across parameters would all
follow the pruned entries' gradients if these were masked only after the step.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from neurorewrite.models import MaskedLinear, enforce_masks, finetune, fpe_expand

torch.set_num_threads(1)


def problem(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    x = torch.randn(192, 8)
    y = (x[:, 0] * x[:, 1] > 0).long()
    dense = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model = fpe_expand(dense, alpha=3, seed=1)
    return model, [(x[i : i + 32], y[i : i + 32]) for i in range(0, 192, 32)]


def masked_in_forward(model: nn.Module) -> nn.Module:
    """A copy whose MaskedLinears compute ``linear(x, W * mask, b * mask)``: the sparse model itself."""
    ref = copy.deepcopy(model)

    def forward(self: MaskedLinear, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.bias_mask
        return nn.functional.linear(x, self.weight * self.weight_mask, bias)

    for layer in ref.modules():
        if isinstance(layer, MaskedLinear):
            layer.forward = types.MethodType(forward, layer)
    return ref


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches, epochs: int, clip: float | None = None) -> None:
    """A plain loop (closure form, so LBFGS runs too), optionally clipping the gradients' global norm."""
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                return loss
            optimizer.step(closure)


def assert_trained_like_the_sparse_model(model: nn.Module, ref: nn.Module, start: nn.Module) -> None:
    for (name, got), want, first in zip(model.named_parameters(), ref.parameters(), start.parameters()):
        assert not torch.equal(got, first), f"{name} did not train"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for layer in model.modules():
        if isinstance(layer, MaskedLinear):
            assert torch.count_nonzero(layer.weight[~layer.weight_mask]) == 0, "a pruned weight came back"


OPTIMIZERS = {
    # second moments factored over rows and columns: a pruned entry's gradient moves the kept ones' steps
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=2e-2),
    # one search direction over all parameters, from gradients its closure recomputes inside the step
    "lbfgs": lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=4, history_size=5),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_finetune_trains_the_sparse_model(name) -> None:
    model, batches = problem()
    start, ref = copy.deepcopy(model), masked_in_forward(model)
    finetune(model, batches, epochs=3, optimizer=OPTIMIZERS[name](model.parameters()))
    train(ref, OPTIMIZERS[name](ref.parameters()), batches, epochs=3)
    assert_trained_like_the_sparse_model(model, ref, start)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_enforce_masks_in_a_users_own_loop(name) -> None:
    model, batches = problem(1)
    start, ref = copy.deepcopy(model), masked_in_forward(model)
    optimizer = OPTIMIZERS[name](model.parameters())
    handles = enforce_masks(optimizer, model)
    train(model, optimizer, batches, epochs=2)
    for handle in handles:
        handle.remove()
    train(ref, OPTIMIZERS[name](ref.parameters()), batches, epochs=2)
    assert_trained_like_the_sparse_model(model, ref, start)


def test_gradient_clipping_across_parameters_sees_only_kept_weights() -> None:
    """clip_grad_norm_ between backward and step scales every gradient by one global norm: that norm must
    be the sparse model's, so the pruned entries' gradients are masked as autograd computes them."""
    model, batches = problem(2)
    start, ref = copy.deepcopy(model), masked_in_forward(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    enforce_masks(optimizer, model)
    train(model, optimizer, batches, epochs=2, clip=0.05)
    train(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), batches, epochs=2, clip=0.05)
    assert_trained_like_the_sparse_model(model, ref, start)


def test_removed_handles_stop_the_enforcement() -> None:
    """After the handles are removed the optimizer is an ordinary one again (pruned weights may move)."""
    model, batches = problem(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for handle in enforce_masks(optimizer, model):
        handle.remove()
    train(model, optimizer, batches, epochs=1)
    layer = next(m for m in model.modules() if isinstance(m, MaskedLinear))
    assert torch.count_nonzero(layer.weight[~layer.weight_mask]) > 0
