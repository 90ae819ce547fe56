"""fpe_expand on gated blocks ``down(act(gate(x)) * up(x))``: the numpy core's weights in MaskedLinears
for every split, one partition shared by gate and up, exact counts, the structured (tied) variant, and
fine-tuning with fixed masks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurorewrite.fpe import FPEConfig, block_seed, expand_gated_block
from neurorewrite.models import MaskedLinear, finetune, fpe_expand
from neurorewrite.models.fpe_structured import TiedLinear

torch.set_num_threads(1)
D, H = 10, 14


class Gated(nn.Module):
    def __init__(self, bias: bool = True, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.gate, self.up, self.down = nn.Linear(D, H, bias=bias), nn.Linear(D, H, bias=bias), nn.Linear(H, D, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def arrays(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray | None]:
    return layer.weight.detach().numpy(), None if layer.bias is None else layer.bias.detach().numpy()


def nonzeros(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


SPLITS = [
    {"split": "random"},
    {"split": "feature"},
    {"split": "groups", "groups": [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]},
    {"split": "shared"},
    {"split": "blocks", "prune": "layer", "bias": "copy"},
    {"split": "tiered"},
]


@pytest.mark.parametrize("options", SPLITS, ids=[o["split"] for o in SPLITS])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_expansion_is_the_numpy_core_with_exact_counts(options, bias):
    model = Gated(bias=bias)
    new = fpe_expand(model, alpha=3, seed=7, **options)
    cfg = FPEConfig(alpha=3, seed=7, **{k: tuple(map(tuple, v)) if k == "groups" else v for k, v in options.items()})
    want = expand_gated_block(*arrays(model.gate), *arrays(model.up), *arrays(model.down), replace(cfg, seed=block_seed(7, 0)))
    for layer, (w, b) in ((new.gate, (want.wg, want.bg)), (new.up, (want.wu, want.bu)), (new.down, (want.wd, want.bd))):
        assert isinstance(layer, MaskedLinear)
        np.testing.assert_array_equal(layer.weight.detach().numpy(), w)
        np.testing.assert_array_equal(layer.weight_mask.numpy(), w != 0)
        if b is not None:
            np.testing.assert_array_equal(layer.bias.detach().numpy(), b)
    assert (new.gate.out_features, new.up.out_features, new.down.in_features) == (3 * H, 3 * H, 3 * H)
    assert nonzeros(new) == nonzeros(model)
    row = new.fpe_record.blocks[0]
    assert (row.first, row.second, row.activation) == ("gate", "down", "SiLU")
    assert (row.up, row.form) == ("up", "gated")
    assert row.nnz_before == row.nnz_after == nonzeros(model)


def test_gate_and_up_children_share_one_partition():
    model = Gated(bias=False)
    new = fpe_expand(model, alpha=4, seed=3)  # random split: a partition per parent
    reads = (new.gate.weight != 0) | (new.up.weight != 0)  # (4H, D): what each child reads
    per_parent = reads.reshape(H, 4, D).int()
    assert int(per_parent.sum(dim=1).max()) == 1, "two children of a parent read the same input"
    with torch.no_grad():  # and the children read what their parent read: gate and up rows together
        covered = per_parent.sum(dim=1).bool()
        original = (model.gate.weight != 0) | (model.up.weight != 0)
        assert bool((covered <= original).all())
    x = torch.randn(5, D)
    with torch.no_grad():  # the forward is the wired gated block: down(silu(gate') * up')
        want = new.down(F.silu(x @ new.gate.weight.T) * (x @ new.up.weight.T))
        torch.testing.assert_close(new(x), want)


def test_structured_gated_ties_the_down_projection():
    model = Gated()
    new = fpe_expand(model, alpha=4, seed=2, structured=True)
    assert isinstance(new.down, TiedLinear) and isinstance(new.down.linear, MaskedLinear)
    assert torch.equal(new.down.linear.weight, model.down.weight), "the tie keeps the original Wd"
    assert nonzeros(new) == nonzeros(model)
    # blocks split: child k of every parent reads the k-th slice of the inputs, in gate and up alike
    reads = ((new.gate.weight != 0) | (new.up.weight != 0)).reshape(H, 4, D).any(dim=0)
    assert int(reads.sum(dim=0).max()) == 1
    x = torch.randn(6, D)
    with torch.no_grad():
        children = F.silu(new.gate(x)) * new.up(x)  # (6, 4H), children of parent i contiguous
        want = model.down(children.reshape(6, H, 4).sum(-1))
        torch.testing.assert_close(new(x), want)
    config = new.fpe_record.config
    assert (config.split, config.prune, new.fpe_record.structured) == ("blocks", "layer", True)


@pytest.mark.parametrize("structured", [False, True])
def test_finetune_keeps_gate_up_and_down_masks(structured):
    model = Gated()
    new = fpe_expand(model, alpha=3, seed=0, structured=structured)
    layers = [m for m in new.modules() if isinstance(m, MaskedLinear)]
    assert len(layers) == 3
    before = [(m.weight_mask.clone(), m.weight.detach().clone()) for m in layers]
    count = nonzeros(new)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, D, generator=gen)
    with torch.no_grad():
        y = model(x) + 0.1 * torch.randn(64, D, generator=gen)  # a float target: mse
    opt = torch.optim.AdamW(new.parameters(), lr=0.02, weight_decay=0.1)
    result = finetune(new, [(x[:32], y[:32]), (x[32:], y[32:])], epochs=6, optimizer=opt)
    assert result.loss_name == "mse" and result.epoch_losses[-1] < result.epoch_losses[0]
    for layer, (mask, w0) in zip(layers, before):
        assert torch.equal(layer.weight_mask, mask)
        assert torch.count_nonzero(layer.weight.detach()[~mask]) == 0, "a pruned weight came back"
        assert not torch.equal(layer.weight.detach(), w0), "the kept weights did not train"
    assert nonzeros(new) == count


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_keep_their_dtype_and_count(dtype):
    model = Gated().to(dtype)
    new = fpe_expand(model, alpha=2, seed=0)
    assert {p.dtype for p in new.parameters()} == {dtype}
    assert nonzeros(new) == nonzeros(model)
    for layer in (new.gate, new.up, new.down):
        assert int(layer.weight_mask.sum()) == int(torch.count_nonzero(layer.weight))
    assert new(torch.randn(3, D, dtype=dtype)).dtype == dtype


def test_an_expanded_gated_onnx_model_finetunes_with_fixed_masks(tmp_path):
    """The ONNX side of ``finetune``: a gated block's graph (Sigmoid, Mul, three linears) lifts into
    torch, trains with gate, up and down masked, and keeps every layer's nonzero count."""
    from neurorewrite.api import expand
    from neurorewrite.models import export_onnx
    from neurorewrite.passes.finetune_onnx import FinetuneOptions, finetune_model
    from neurorewrite.runtime.ort import ort_session

    model = Gated().eval()
    x = torch.randn(128, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).numpy()
    export_onnx(model, tmp_path / "dense.onnx", x[:2])
    expanded, _ = expand(tmp_path / "dense.onnx", alpha=2, seed=0)
    tuned, report = finetune_model(expanded, x.numpy(), y, FinetuneOptions(epochs=5, lr=3e-3))
    assert len(report.layers) == 3 and all(row.nnz_before == row.nnz_after for row in report.layers)
    assert report.loss_after < report.loss_before
    before = ort_session(expanded).run(None, {"x": x.numpy()})[0]
    after = ort_session(tuned).run(None, {"x": x.numpy()})[0]
    assert float(((after - y) ** 2).mean()) < float(((before - y) ** 2).mean())
