"""The small promises of the torch FPE module (models/fpe.py) that whole-model tests pass over:
MaskedLinear's construction, linear_arrays' copies, the bias hooks of enforce_masks, and what
fpe_expand attaches to its result."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from neurorewrite.models.fpe import MaskedLinear, enforce_masks, fpe_expand, linear_arrays


def test_a_masked_linear_is_built_like_an_nn_linear() -> None:
    plain = MaskedLinear(3, 2)
    assert plain.bias is not None and plain.bias_mask is not None and plain.bias_mask.all()
    assert plain.weight_mask.shape == (2, 3) and plain.weight_mask.all()
    wide = MaskedLinear(3, 2, dtype=torch.float64)
    assert wide.weight.dtype == wide.bias.dtype == torch.float64
    meta = MaskedLinear(3, 2, device="meta")  # every tensor where it was asked to be
    assert {t.device.type for t in (meta.weight, meta.bias, meta.weight_mask, meta.bias_mask)} == {"meta"}
    assert MaskedLinear(3, 2, bias=False).bias_mask is None


def test_from_arrays_holds_the_arrays_and_masks_their_zeros() -> None:
    w = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])  # float64, with a 1.0 where a mask must be True
    b = np.array([1.0, 0.0])
    layer = MaskedLinear.from_arrays(w, b)
    assert layer.weight.dtype == layer.bias.dtype == torch.float64
    np.testing.assert_array_equal(layer.weight.detach().numpy(), w)
    np.testing.assert_array_equal(layer.weight_mask.numpy(), w != 0)
    np.testing.assert_array_equal(layer.bias_mask.numpy(), b != 0)
    assert MaskedLinear.from_arrays(w.astype(np.float32), None).bias is None


def test_linear_arrays_are_copies_in_the_layer_dtype_and_bfloat16_as_float32() -> None:
    lin = nn.Linear(3, 2).double()
    w, b = linear_arrays(lin)
    assert w.dtype == b.dtype == np.float64  # not narrowed to float32
    w[0, 0] = 123.0
    assert lin.weight[0, 0].item() != 123.0  # a copy
    half = nn.Linear(3, 2).to(torch.bfloat16)
    w, b = linear_arrays(half)
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, half.weight.float().detach().numpy())
    w, b = linear_arrays(nn.Linear(3, 2, bias=False))
    assert b is None


def test_pruned_bias_entries_get_no_gradient_and_stay_zero() -> None:
    layer = MaskedLinear.from_arrays(np.ones((2, 3), np.float32), np.array([0.0, 1.0], np.float32))
    module = nn.Sequential(layer)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    handles = enforce_masks(opt, module)
    grads = []
    layer.bias.register_hook(lambda g: grads.append(g.clone()))  # runs after the mask hook
    module(torch.ones(4, 3)).sum().backward()
    assert grads and grads[0][0].item() == 0.0 and grads[0][1].item() != 0.0
    opt.step()
    assert layer.bias[0].item() == 0.0
    for h in handles:
        h.remove()
    # a frozen bias is skipped, and the layer still trains its weight
    frozen = MaskedLinear.from_arrays(np.ones((2, 3), np.float32), np.array([0.0, 1.0], np.float32))
    frozen.bias.requires_grad_(False)
    handles = enforce_masks(torch.optim.SGD([frozen.weight], lr=0.1), nn.Sequential(frozen))
    assert len(handles) == 1 + 2  # the weight hook, the two step hooks


def test_mask_grad_masks_a_bias_gradient_written_by_hand() -> None:
    layer = MaskedLinear.from_arrays(np.ones((2, 3), np.float32), np.array([0.0, 1.0], np.float32))
    layer.weight.grad = torch.ones(2, 3)
    layer.bias.grad = torch.ones(2)
    layer.mask_grad()
    assert layer.bias.grad.tolist() == [0.0, 1.0]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_fpe_expand_defaults_and_what_it_attaches() -> None:
    new = fpe_expand(mlp())
    assert new.fpe_record.alpha == 4 and new.fpe_record.source == "torch"
    report = new.fpe_report
    assert report.blocks == list(new.fpe_record.blocks) and report.blocks[0].width_after == 32
    assert report.blocks[0].width_before == 8 and report.blocks[0].in_features == 6
    assert report.blocks[0].out_features == 3
    assert sorted((w.module, w.side, w.before, w.after) for w in report.widened) == [
        ("0", "outputs", 8, 32), ("2", "inputs", 8, 32)]
    with pytest.raises(Exception, match="alpha"):
        fpe_expand(mlp(), alpha=1)
    assert fpe_expand(mlp(), alpha=2).fpe_record.alpha == 2


def test_fpe_expand_keeps_the_layers_dtype() -> None:
    new = fpe_expand(mlp().to(torch.bfloat16), alpha=2)
    assert {p.dtype for p in new.parameters()} == {torch.bfloat16}


def test_counts_repr_and_apply_masks() -> None:
    w = np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]], np.float32)
    layer = MaskedLinear.from_arrays(w, np.array([0.0, 4.0], np.float32))
    assert layer.nonzeros() == 4 + 1
    assert MaskedLinear.from_arrays(w, None).nonzeros() == 4
    assert "kept=4/6" in repr(layer)
    with torch.no_grad():
        layer.weight.fill_(7.0)
        layer.bias.fill_(7.0)
    from neurorewrite.models.fpe import apply_masks

    apply_masks(nn.Sequential(nn.ReLU(), layer))
    np.testing.assert_array_equal(layer.weight.detach().numpy(), np.where(w != 0, 7.0, 0.0))
    assert layer.bias.tolist() == [0.0, 7.0]


def test_a_frozen_layer_does_not_stop_the_hooks_of_the_layers_after_it() -> None:
    frozen = MaskedLinear.from_arrays(np.ones((3, 3), np.float32), np.ones(3, np.float32)).requires_grad_(False)
    trained = MaskedLinear.from_arrays(np.eye(3, dtype=np.float32), np.array([0.0, 1.0, 1.0], np.float32))
    module = nn.Sequential(frozen, trained)
    handles = enforce_masks(torch.optim.SGD(trained.parameters(), lr=0.1), module)
    assert len(handles) == 2 + 2  # the trained layer's weight and bias hooks, the two step hooks
    module(torch.ones(2, 3)).sum().backward()
    assert trained.weight.grad[0, 1].item() == 0.0 and trained.bias.grad[0].item() == 0.0


class SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x):  # noqa: ANN001, ANN202
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def test_a_gated_block_is_reported_with_its_widths_and_names() -> None:
    torch.manual_seed(0)
    new = fpe_expand(SwiGLU(), alpha=2)
    (row,) = new.fpe_report.blocks
    assert (row.name, row.first, row.up, row.second) == ("gate", "gate", "up", "down")
    assert (row.in_features, row.width_before, row.width_after, row.out_features) == (6, 8, 16, 6)
    assert row.nnz_before == row.nnz_after
