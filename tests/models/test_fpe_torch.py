"""fpe_expand on torch modules: same weights and masks as the ONNX pass, counts, export, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from neurorewrite.api import expand
from neurorewrite.errors import InvalidOptionError, NoBlocksError
from neurorewrite.models import MaskedLinear, export_onnx, fpe_expand
from neurorewrite.rewriter.record import read_record
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears, read_weights
from neurorewrite.runtime.ort import ort_session

torch.set_num_threads(1)


def mlp(*widths: int, act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def onnx_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray | None]]:
    index = GraphIndex.build(model.graph)
    return [read_weights(index, lin) for lin in find_linears(index).values()]


CASES = [
    ((10, 8, 3), nn.ReLU, dict(alpha=2, split="random", seed=0)),
    ((12, 9, 7, 4), nn.GELU, dict(alpha=3, split="random", seed=5)),  # a chain: two overlapping blocks
    ((12, 6, 4), nn.Tanh, dict(alpha=4, split="shared", seed=1, bias="copy", prune="layer")),
    ((12, 6, 4), nn.SiLU, dict(alpha=2, split="feature", seed=2)),
    ((6, 5, 2), nn.ReLU, dict(alpha=2, split="groups", groups=[[0, 1], [2, 3, 4], [5]], seed=3)),
]


@pytest.mark.parametrize("widths,act,options", CASES)
def test_torch_expansion_equals_onnx_pass(tmp_path, widths, act, options):
    model = mlp(*widths, act=act)
    example = torch.randn(3, widths[0])
    export_onnx(model, tmp_path / "dense.onnx", example)
    torch_side = export_onnx(fpe_expand(model, **options), tmp_path / "torch.fpe.onnx", example)
    onnx_side, _ = expand(tmp_path / "dense.onnx", **options)
    pairs = list(zip(onnx_weights(torch_side), onnx_weights(onnx_side), strict=True))
    assert len(pairs) == len(widths) - 1
    for (wt, bt), (wo, bo) in pairs:
        assert wt.shape == wo.shape
        np.testing.assert_allclose(wt, wo, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(wt != 0, wo != 0)
        np.testing.assert_allclose(bt, bo, atol=1e-6, rtol=0)


def test_returns_new_module_and_keeps_counts():
    model = mlp(10, 8, 6, 3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_nnz = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    new = fpe_expand(model, alpha=4, seed=1)
    assert new is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"fpe_expand changed the input module's {k}"
    assert all(isinstance(new[i], MaskedLinear) for i in (0, 2, 4))
    assert [new[i].out_features for i in (0, 2)] == [32, 24]
    assert sum(int(torch.count_nonzero(p)) for p in new.parameters()) == dense_nnz
    for layer in (new[0], new[2], new[4]):
        assert int(layer.weight_mask.sum()) == int(torch.count_nonzero(layer.weight))
    record = new.fpe_record
    assert [(b.first, b.second) for b in record.blocks] == [("0", "2"), ("2", "4")]
    assert all(b.nnz_before == b.nnz_after for b in record.blocks)


def test_export_runs_in_onnxruntime_with_metadata(tmp_path):
    new = fpe_expand(mlp(10, 8, 3, act=nn.GELU), alpha=2, seed=4)
    x = torch.randn(16, 10)
    proto = export_onnx(new, tmp_path / "m.onnx", x[:2])
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    out = ort_session(tmp_path / "m.onnx").run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, new(x).numpy(), rtol=1e-5, atol=1e-5)
    meta = read_record(proto)
    assert meta.alpha == 2 and meta.config.seed == 4 and meta.config.split == "random"
    assert meta.blocks[0].first == "/0/Gemm" and meta.blocks[0].width_after == 16
    assert new.training, "export_onnx must restore the module's training flag"


def test_nested_sequentials_are_found_on_the_data_flow(tmp_path):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp(6, 5, 4)
            self.head = nn.Sequential(nn.Linear(4, 7), nn.Sigmoid(), nn.Dropout(0.1), nn.Linear(7, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    model = Net()
    new = fpe_expand(model, alpha=2)
    # body.2 -> head.0 meet across the two containers with no op between them: an identity block,
    # which the ONNX pass finds too (same blocks, same order, same seeds)
    assert [(b.first, b.second, b.activation) for b in new.fpe_record.blocks] == [
        ("body.0", "body.2", "ReLU"), ("body.2", "head.0", "Identity"), ("head.0", "head.3", "Sigmoid"),
    ]
    assert new(torch.randn(3, 6)).shape == (3, 2)
    x = torch.randn(3, 6)
    export_onnx(model, tmp_path / "dense.onnx", x)
    torch_side = export_onnx(new, tmp_path / "torch.onnx", x)
    onnx_side, report = expand(tmp_path / "dense.onnx", alpha=2)
    assert len(report.blocks) == 3
    for (wt, _), (wo, _) in zip(onnx_weights(torch_side), onnx_weights(onnx_side), strict=True):
        np.testing.assert_array_equal(wt != 0, wo != 0)


@pytest.mark.parametrize("alpha", [1, 0, -2, 2.5, "2"])
def test_alpha_below_two_is_rejected(alpha):
    with pytest.raises(InvalidOptionError, match="alpha"):
        fpe_expand(mlp(4, 3, 2), alpha=alpha)


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.Linear(4, 3)), nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)), nn.Conv1d(2, 2, 1)],
    ids=["one-linear", "norm-between", "no-linear"],
)
def test_no_pair_is_rejected(model):
    with pytest.raises(NoBlocksError, match="no Linear -> activation -> Linear pair"):
        fpe_expand(model, alpha=2)


def test_bad_option_names_the_option():
    with pytest.raises(InvalidOptionError, match="--split"):
        fpe_expand(mlp(4, 3, 2), alpha=2, split="clever")
