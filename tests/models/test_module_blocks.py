"""Block discovery on the data flow of any torch module: custom forwards, functional activations,
gated triples, the torch.export fallback, and a reason for every near miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neurorewrite.api import expand
from neurorewrite.errors import InvalidOptionError, NoBlocksError, UnsupportedModelError
from neurorewrite.models import MaskedLinear, export_onnx, fpe_expand
from neurorewrite.models.fpe import find_blocks_in_module
from neurorewrite.models.module_blocks import ModuleBlock
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears, read_weights

torch.set_num_threads(1)


class Custom(nn.Module):
    """A hand-written forward, no nn.Sequential: a residual MLP with a functional activation."""

    def __init__(self, act: str = "gelu_tanh") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(12)
        self.fc1, self.fc2, self.act = nn.Linear(12, 20), nn.Linear(20, 12), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(self.norm(x))
        if self.act == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.act == "swish":  # x * sigmoid(x), written out
            h = h * torch.sigmoid(h)
        elif self.act == "gelu_new":  # GPT-2's composition
            h = 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0))))
        elif self.act == "relu_method":
            h = h.relu()
        return x + self.fc2(F.dropout(h, 0.1, self.training))


class Gated(nn.Module):
    """A Llama-style gated MLP written by hand; ``up_first`` computes up before gate."""

    def __init__(self, d: int = 10, h: int = 14, bias: bool = True, up_first: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.gate, self.up, self.down = nn.Linear(d, h, bias=bias), nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)
        self.up_first = up_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up_first:
            u = self.up(x)
            return self.down(u * F.silu(self.gate(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


def onnx_weights(model) -> list[tuple[np.ndarray, np.ndarray | None]]:
    index = GraphIndex.build(model.graph)
    return [read_weights(index, lin) for lin in find_linears(index).values()]


@pytest.mark.parametrize("act,label", [
    ("gelu_tanh", "GELU(tanh)"), ("swish", "SiLU"), ("gelu_new", "GELU(tanh)"), ("relu_method", "ReLU"),
])
def test_custom_forward_found_by_fx_and_equal_to_the_onnx_pass(tmp_path, act, label):
    model = Custom(act).eval()
    search = find_blocks_in_module(model)
    assert search.tracer == "torch.fx"
    assert search.blocks == [ModuleBlock("fc1", "fc2", label)]
    x = torch.randn(3, 12)
    export_onnx(model, tmp_path / "dense.onnx", x)
    new = fpe_expand(model, alpha=3, seed=4)
    assert isinstance(new.fc1, MaskedLinear) and new.fc1.out_features == 60
    torch_side = export_onnx(new, tmp_path / "torch.onnx", x)
    onnx_side, _ = expand(tmp_path / "dense.onnx", alpha=3, seed=4)
    for (wt, bt), (wo, bo) in zip(onnx_weights(torch_side), onnx_weights(onnx_side), strict=True):
        np.testing.assert_allclose(wt, wo, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(wt != 0, wo != 0)


@pytest.mark.parametrize("up_first", [False, True])
def test_gated_triple_is_found_whichever_branch_runs_first(up_first):
    search = find_blocks_in_module(Gated(up_first=up_first))
    assert search.blocks == [ModuleBlock("gate", "down", "SiLU", up="up")]
    assert search.skipped == []  # the up branch's own walk is not a near miss once the triple matched


def test_export_fallback_when_fx_cannot_trace():
    class ShapeBranch(Custom):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] > 1:  # Python control flow on a shape: fx cannot trace it, torch.export can
                return super().forward(x)
            return x

    model = ShapeBranch("gelu_tanh").eval()
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        fpe_expand(model, alpha=2)
    new = fpe_expand(model, alpha=2, example_inputs=torch.randn(3, 12))
    assert new.fpe_report.tracer == "torch.export"
    assert [(b.first, b.second) for b in new.fpe_record.blocks] == [("fc1", "fc2")]
    assert new(torch.randn(3, 12)).shape == (3, 12)


class Twice(nn.Module):
    """fc1 is called twice, the second time without the ReLU: widening it for the block would change that call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + self.fc2(self.fc1(x))


class RunTwice(Twice):
    """The whole block runs twice (ALBERT's shared layer): every call of fc1 and fc2 is in it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))))


class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)
        self.other = nn.Linear(6, 8)
        self.other.weight = self.fc1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + self.other(x).sum(-1, keepdim=True)


class NormInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))


class HiddenReturned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h


class ScaledHidden(nn.Module):
    """A learnt per-unit scale inside the block: widening would need new scales."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 6)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * self.scale)


class BothActivated(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * torch.tanh(self.up(x)))


class OtherInput(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(2 * x))


class UpReused(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.up(x)
        return self.down(F.silu(self.gate(x)) * u) + u.mean(-1, keepdim=True)


class Fused(nn.Module):
    """Phi-3's form: gate and up in one linear whose output ``chunk(2)`` cuts; ``gate_second`` swaps the halves."""

    def __init__(self, gate_second: bool = False, cut: str = "chunk") -> None:
        super().__init__()
        torch.manual_seed(2)
        self.gate_up, self.down = nn.Linear(10, 28), nn.Linear(14, 10)
        self.gate_second, self.cut = gate_second, cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = self.gate_up(x)
        a, b = both.chunk(2, dim=-1) if self.cut == "chunk" else torch.split(both, 14, dim=-1)
        gate, up = (b, a) if self.gate_second else (a, b)
        return self.down(up * F.silu(gate))


@pytest.mark.parametrize("gate_second", [False, True])
def test_fused_gate_up_is_expanded_half_by_half(gate_second):
    model = Fused(gate_second)
    search = find_blocks_in_module(model)
    assert search.blocks == [ModuleBlock("gate_up", "down", "SiLU", gate_half=1 if gate_second else 0)]
    new = fpe_expand(model, alpha=3, seed=1)
    assert new.gate_up.out_features == 84 and new.down.in_features == 42
    assert new.fpe_record.blocks[0].form == "gated (fused gate/up)"
    assert sum(int(torch.count_nonzero(p)) for p in new.parameters()) == sum(
        int(torch.count_nonzero(p)) for p in model.parameters())
    gate_rows = slice(42, 84) if gate_second else slice(0, 42)
    up_rows = slice(0, 42) if gate_second else slice(42, 84)
    x = torch.randn(4, 10)
    with torch.no_grad():  # chunk(2) of the widened output still gives the gate and up children
        gate = x @ new.gate_up.weight[gate_rows].T + new.gate_up.bias[gate_rows]
        up = x @ new.gate_up.weight[up_rows].T + new.gate_up.bias[up_rows]
        torch.testing.assert_close(new(x), new.down(up * F.silu(gate)))
    reads = (new.gate_up.weight[gate_rows] != 0) | (new.gate_up.weight[up_rows] != 0)
    assert int(reads.reshape(14, 3, 10).int().sum(dim=1).max()) == 1, "gate and up children share one partition"


class FusedSplit(Fused):
    """Cut by a fixed size: torch.split(h, 14) would cut a widened output into many pieces."""

    def __init__(self) -> None:
        super().__init__(cut="split")


class ActAfterProduct(Gated):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(F.silu(self.gate(x)) * self.up(x)))


NEAR_MISSES = [
    (Twice, "fc1", "called 2 times"),
    (SharedWeight, "fc1", "shared with other"),
    (NormInside, "fc1", "LayerNorm module norm, which is not elementwise"),
    (HiddenReturned, "fc1", "output of the forward"),
    (ScaledHidden, "fc1", "not a scalar constant"),
    (BothActivated, "gate", "not a scalar constant"),
    (OtherInput, "gate", "reads another input"),
    (UpReused, "gate", "used by more than the gate product"),
    (ActAfterProduct, "gate", "not the gated form"),
    (FusedSplit, "gate_up", "only when its forward cuts it with chunk"),
]


@pytest.mark.parametrize("cls,name,reason", NEAR_MISSES, ids=[c.__name__ for c, _, _ in NEAR_MISSES])
def test_near_misses_are_reported_with_their_reason(cls, name, reason):
    model = cls()
    search = find_blocks_in_module(model)
    assert search.blocks == []
    assert any(s.name == name and reason in s.reason for s in search.skipped), search.skipped
    with pytest.raises(NoBlocksError, match=reason):
        fpe_expand(model, alpha=2)


def test_a_block_run_twice_is_one_block_whose_widened_modules_every_call_reads():
    model = RunTwice()
    search = find_blocks_in_module(model)
    assert [(b.first, b.second, b.activation) for b in search.blocks] == [("fc1", "fc2", "ReLU")]
    new = fpe_expand(model, alpha=2, seed=1)
    assert new.fc1.out_features == 16 and new.fc2.in_features == 16
    nnz = lambda m: sum(int(torch.count_nonzero(p)) for p in m.parameters())  # noqa: E731
    assert nnz(new) == nnz(model)
    x = torch.randn(4, 6)
    with torch.no_grad():
        once = new.fc2(torch.relu(new.fc1(x)))
        torch.testing.assert_close(new(x), new.fc2(torch.relu(new.fc1(torch.tanh(once)))))


def test_skipped_blocks_stay_in_the_report_next_to_expanded_ones():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.good, self.bad = Custom("relu_method"), NormInside()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bad(self.good(x)[..., :6])

    new = fpe_expand(Mixed(), alpha=2)
    assert [b.first for b in new.fpe_record.blocks] == ["good.fc1"]
    assert [(s.name, "LayerNorm module bad.norm" in s.reason) for s in new.fpe_report.skipped] == [("bad.fc1", True)]
    assert [(w.module, w.side, w.before, w.after) for w in new.fpe_report.widened] == [
        ("good.fc1", "outputs", 20, 40), ("good.fc2", "inputs", 20, 40),
    ]


def test_the_no_blocks_message_lists_the_first_five_near_misses():
    class SixMisses(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleList([NormInside() for _ in range(6)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return sum(p(x) for p in self.parts)

    model = SixMisses()
    skipped = find_blocks_in_module(model).skipped
    assert len(skipped) == 6
    head = ("SixMisses: no Linear -> activation -> Linear pair to expand (fpe_expand follows the forward's data flow, "
            "traced with torch.fx, for linear layers joined by elementwise activations, or gated act(gate(x)) * up(x) -> down")
    with pytest.raises(NoBlocksError) as info:
        fpe_expand(model, alpha=2)
    assert str(info.value) == head + "; near misses: " + "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5]) + ")"
    with pytest.raises(NoBlocksError) as info:
        fpe_expand(nn.Sequential(nn.Linear(4, 3)), alpha=2)
    assert str(info.value) == head.replace("SixMisses", "Sequential") + ")"


def test_a_config_is_checked_like_the_alpha_option():
    from neurorewrite.fpe import FPEConfig

    with pytest.raises(InvalidOptionError, match="alpha"):
        fpe_expand(NormInside(), config=FPEConfig(alpha=1))
    assert fpe_expand(Custom("relu_method"), config=FPEConfig(alpha=2)).fpe_record.alpha == 2
