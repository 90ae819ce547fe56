"""finetune: real torch training with fixed masks under several optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.models import MaskedLinear, enforce_masks, finetune, fpe_expand

torch.set_num_threads(1)


def toy_problem(seed: int = 0, classes: bool = True) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    y = (x[:, 0] * x[:, 1] > 0).long() if classes else x[:, :2].sin()
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    return model, batches


def snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.weight_mask.clone(), m.weight.detach().clone()) for m in model.modules() if isinstance(m, MaskedLinear)]


OPTIMIZERS = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_pruned_weights_stay_exactly_zero(name):
    dense, batches = toy_problem()
    model = fpe_expand(dense, alpha=3, seed=2)
    before = snapshot(model)
    result = finetune(model, batches, epochs=8, optimizer=OPTIMIZERS[name](model.parameters()))
    assert result.loss_name == "cross_entropy"
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    for (mask, w0), (mask_after, w1) in zip(before, snapshot(model)):
        assert torch.equal(mask, mask_after)
        assert torch.count_nonzero(w1[~mask]) == 0, "a pruned weight came back"
        assert torch.count_nonzero(w1[mask]) == int(mask.sum()), "a kept weight became zero"
        assert not torch.equal(w0, w1), "the kept weights did not train"


def test_float_targets_use_mse_and_dense_models_train():
    dense, batches = toy_problem(classes=False)
    result = finetune(dense, batches, epochs=5, lr=1e-2)
    assert result.loss_name == "mse"
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert not dense.training


def test_enforce_masks_in_a_users_own_loop():
    dense, batches = toy_problem(1)
    model = fpe_expand(dense, alpha=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    handles = enforce_masks(optimizer, model)
    for x, y in batches * 3:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for h in handles:
        h.remove()
    for mask, w in snapshot(model):
        assert torch.count_nonzero(w[~mask]) == 0


def test_bad_epochs_and_empty_data():
    dense, batches = toy_problem()
    with pytest.raises(InvalidOptionError, match="--epochs"):
        finetune(dense, batches, epochs=-1)
    with pytest.raises(DataError, match="empty"):
        finetune(dense, [], epochs=1)
