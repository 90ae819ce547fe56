"""Torch-side distillation: an fpe_expand-ed module learns its dense original's outputs with masks fixed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neurorewrite.models import fpe_expand
from neurorewrite.models.distill import distill, distillation_loss, relative_distance
from neurorewrite.models.fpe import masked_layers

torch.set_num_threads(1)


class Net(nn.Module):
    """Keyword inputs, as a Hugging Face model takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def batches(n: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(size, 8, generator=g)} for _ in range(n)]


@pytest.fixture()
def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = Net().eval()
    return teacher, fpe_expand(teacher, alpha=4, seed=0)


def test_distillation_closes_the_gap_and_keeps_the_masks(pair):
    teacher, student = pair
    masks = [layer.weight_mask.clone() for layer in masked_layers(student)]
    counts = [layer.nonzeros() for layer in masked_layers(student)]
    result = distill(student, teacher, batches(20, 32, 0), batches(4, 64, 1), epochs=6, lr=3e-3)
    assert result.held_out_after < 0.5 * result.held_out_before and result.steps == 120
    assert result.held_out_after == min(result.history)
    for layer, mask, count in zip(masked_layers(student), masks, counts):
        assert torch.equal(layer.weight != 0, mask) and layer.nonzeros() == count
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher is frozen


def test_early_stop_restores_the_best_epoch(pair):
    teacher, student = pair
    start = copy.deepcopy(student.state_dict())
    result = distill(student, teacher, batches(5, 32, 0), batches(2, 64, 1), epochs=5, lr=10.0, patience=1)
    assert result.stopped_early and result.best_epoch == 0 and result.held_out_after == result.held_out_before
    for key, value in start.items():
        torch.testing.assert_close(student.state_dict()[key], value)


def test_relative_distance_skips_padding_and_is_scale_free():
    t = torch.randn(2, 5, 3)
    s = t.clone()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s[0, 3:] += 100.0  # padding: does not count
    assert float(relative_distance(s, t, mask)) == 0.0
    assert float(relative_distance(2 * s, 2 * t, mask)) == 0.0
    assert float(relative_distance(s * 1.1, t)) > 0.0


def test_the_loss_is_a_batch_loss(pair):
    teacher, student = pair
    loss = distillation_loss(teacher)
    value = loss(student, {"x": torch.randn(4, 8)})
    assert value.requires_grad and value.dim() == 0
