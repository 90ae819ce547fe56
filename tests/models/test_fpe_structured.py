"""fpe_expand(structured=True): the same function as ``expand(..., structured=True)`` in onnxruntime,
the exact nonzero count, masks and ties kept by fine-tuning, export, bad options."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from neurorewrite.api import expand
from neurorewrite.errors import InvalidOptionError
from neurorewrite.models import MaskedLinear, export_onnx, finetune, fpe_expand
from neurorewrite.models.fpe_structured import TiedLinear
from neurorewrite.rewriter.record import read_record
from neurorewrite.runtime.ort import ort_session

torch.set_num_threads(1)


def mlp(*widths: int, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def nonzeros(model: nn.Module) -> int:
    """Stored nonzeros: a tied W2 is one parameter, so every parameter is counted once."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def run(proto: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    session = ort_session(proto, providers=["CPUExecutionProvider"], threads=1)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


CASES = [
    ((10, 8, 3), nn.ReLU, {"alpha": 4, "seed": 3}),
    ((16, 6, 5), nn.GELU, {"alpha": 2, "seed": 7, "bias": "copy"}),
    ((12, 9, 7, 4), nn.Tanh, {"alpha": 3, "seed": 5}),  # a chain: only its last linear is tied
    ((12, 6, 4), nn.SiLU, {"alpha": 2, "seed": 2, "split": "feature"}),
]


@pytest.mark.parametrize("widths,act,options", CASES)
def test_torch_structured_equals_onnx_preset(tmp_path, widths, act, options):
    model = mlp(*widths, act=act)
    x = torch.randn(32, widths[0])
    export_onnx(model, tmp_path / "dense.onnx", x[:2])
    want = run(expand(tmp_path / "dense.onnx", structured=True, **options)[0], x)
    structured = fpe_expand(model, structured=True, **options)
    with torch.no_grad():
        got = structured(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    unstructured = fpe_expand(model, **options)
    with torch.no_grad():
        assert not np.allclose(unstructured(x).numpy(), want, atol=1e-4)  # the tie matters: the test has teeth
    # the torch export is the preset's graph: grouped format, same outputs
    exported = export_onnx(structured, tmp_path / "torch.onnx", x[:2])
    onnx.checker.check_model(str(tmp_path / "torch.onnx"), full_check=True)
    meta = read_record(exported)
    assert meta.structured and meta.format == "grouped" and meta.config.prune == "layer"
    np.testing.assert_allclose(run(exported, x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("widths", [(10, 8, 3), (12, 9, 7, 4)])
def test_structured_layout_and_exact_count(widths):
    model = mlp(*widths)
    new = fpe_expand(model, alpha=4, seed=1, structured=True)
    last = new[len(new) - 1]
    assert isinstance(last, TiedLinear) and isinstance(last.linear, MaskedLinear)
    assert torch.equal(last.linear.weight, model[len(model) - 1].weight), "the tie keeps the original W2"
    first = new[0]
    assert isinstance(first, MaskedLinear) and first.out_features == 4 * widths[1]
    # blocks split: every parent's child k reads the same inputs
    children = first.weight_mask.reshape(widths[1], 4, widths[0]).any(dim=0)
    assert int(children.sum(dim=0).max()) == 1
    assert nonzeros(new) == nonzeros(model)  # nnz(W1') + nnz(b1') + nnz(W2) + nnz(b2), chains included
    assert new.fpe_record.config.split == "blocks" and new.fpe_record.structured


def test_finetune_keeps_masks_ties_and_count():
    model = mlp(10, 8, 3)
    new = fpe_expand(model, alpha=4, seed=0, structured=True)
    with torch.no_grad():
        new[2].linear.weight[0, 0] = 0.0  # a zero of W2 must stay zero too: its mask is its support
    new[2].linear.weight_mask[0, 0] = False
    before = nonzeros(new)
    w1_before = new[0].weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    finetune(new, [(x[:32], y[:32]), (x[32:], y[32:])], epochs=5, optimizer=torch.optim.Adam(new.parameters(), lr=0.05))
    assert not torch.equal(new[0].weight, w1_before), "fine-tuning must train W1'"
    assert not bool(new[0].weight[~new[0].weight_mask].any())
    assert float(new[2].linear.weight.detach()[0, 0]) == 0.0
    assert new[2].linear.weight.shape == (3, 8), "the tied W2 stays one column per parent"
    assert nonzeros(new) == before


@pytest.mark.parametrize("options", [{"split": "groups", "groups": [[0, 1], [2, 3]]}, {"split": "random", "prune": "global"}])
def test_options_of_the_preset(options):
    model = mlp(4, 3, 2)
    if options["split"] == "groups":
        with pytest.raises(InvalidOptionError, match="structured=True.*split"):
            fpe_expand(model, alpha=2, structured=True, **options)
    else:  # like `neurorewrite expand --structured`: random is the default and becomes blocks, prune layer
        config = fpe_expand(model, alpha=2, structured=True, **options).fpe_record.config
        assert (config.split, config.prune) == ("blocks", "layer")
