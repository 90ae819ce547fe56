"""insert_memel / remove_memel on real models: tree restored, eval and ONNX export untouched, bad input."""

from __future__ import annotations

import copy
import io

import onnx
import pytest
import torch
from torch import nn

from neurorewrite.errors import InvalidOptionError
from neurorewrite.models.memel import MEmeL, find_memel, insert_memel, remove_memel


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.act(self.dense(x))
        return hidden, hidden.mean()  # a tuple output, like Hugging Face layers


class Encoder(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Block(width) for _ in range(3)])
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layer:
            x = block(x)[0]
        return self.head(x)


def _train(model: nn.Module, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(32, 16, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _tree(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules()]


def _hook_count(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_insert_acts_in_train_mode_and_remove_restores_the_original_tree() -> None:
    torch.manual_seed(0)
    model = Encoder()
    plain = copy.deepcopy(model)
    tree, keys = _tree(model), list(model.state_dict())
    insert_memel(model, after=["layer.1", "head.1"], top_t=2, n_forget=3)
    assert _tree(model) == tree and list(model.state_dict()) == keys
    assert set(find_memel(model)) == {"layer.1", "head.1"}
    x = torch.randn(32, 16)
    for _ in range(3):  # warm-up batches only feed the statistics
        torch.testing.assert_close(model(x), plain.train()(x))
    assert not torch.allclose(model(x), plain(x))
    assert find_memel(model)["layer.1"].batches_seen == 4
    model.eval(), plain.eval()
    torch.testing.assert_close(model(x), plain(x))

    remove_memel(model)
    assert _tree(model) == tree and list(model.state_dict()) == keys
    assert find_memel(model) == {} and _hook_count(model) == 0
    model.train(), plain.train()
    torch.testing.assert_close(model(x), plain(x))


def test_training_with_memel_changes_the_weights_and_keeps_parameter_names() -> None:
    torch.manual_seed(0)
    model, plain = Encoder(), Encoder()
    plain.load_state_dict(model.state_dict())
    insert_memel(model, after=["layer.0", "layer.2"])
    _train(model, 15)
    _train(plain, 15)
    remove_memel(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert not torch.allclose(model.layer[0].dense.weight, plain.layer[0].dense.weight)


def _export(model: nn.Module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(4, 16),), buffer, dynamo=False, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter warns that it is legacy
def test_onnx_export_holds_no_trace_of_memel() -> None:
    torch.manual_seed(0)
    model = Encoder()
    insert_memel(model, after=["layer.0", "layer.1", "head.1"], n_forget=2)
    _train(model, 5)
    plain = copy.deepcopy(model)
    remove_memel(plain)
    model.train()  # export switches to eval by itself; MEmeL must not show up either way
    exported, reference = _export(model), _export(plain)
    assert [(n.op_type, n.name) for n in exported.graph.node] == [(n.op_type, n.name) for n in reference.graph.node]
    assert sorted(i.name for i in exported.graph.initializer) == sorted(i.name for i in reference.graph.initializer)
    text = str(exported).lower()
    assert "memel" not in text and "scatter" not in text and "topk" not in text and "argmax" not in text
    assert model.training and len(find_memel(model)) == 3


def test_wrong_layer_names_list_the_missing_names_and_valid_ones_and_change_nothing() -> None:
    model = Encoder()
    with pytest.raises(InvalidOptionError) as error:
        insert_memel(model, after=["layer.1", "layer.7", "encoder.layer.4"])
    message = str(error.value)
    assert "'layer.7'" in message and "'encoder.layer.4'" in message and "'layer.1'" in message.split("include")[1]
    assert "'layer.1'" not in message.split("include")[0]
    assert _hook_count(model) == 0


@pytest.mark.parametrize(
    "options, match",
    [({"after": []}, "empty"), ({"after": ["layer.0"], "top_t": 0}, "top_t"),
     ({"after": ["layer.0"], "n_forget": -3}, "n_forget"), ({"after": ["layer.0", "layer.0"]}, "twice")],
)
def test_bad_options_raise_before_anything_is_inserted(options: dict[str, object], match: str) -> None:
    model = Encoder()
    with pytest.raises(InvalidOptionError, match=match):
        insert_memel(model, **options)  # type: ignore[arg-type]
    assert _hook_count(model) == 0


def test_inserting_twice_after_the_same_layer_is_refused() -> None:
    model = insert_memel(Encoder(), after="head.1")
    with pytest.raises(InvalidOptionError, match="remove_memel"):
        insert_memel(model, after=["head.1"])
    assert isinstance(find_memel(model)["head.1"], MEmeL)


def test_a_submodule_without_a_tensor_output_gets_a_clear_error() -> None:
    class Scalar(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"x": x}

    model = nn.Sequential(nn.Linear(4, 4), Scalar())
    insert_memel(model, after=["1"])
    with pytest.raises(InvalidOptionError, match="'1'.*dict"):
        model(torch.randn(2, 4))


def test_deepcopy_gets_independent_statistics() -> None:
    model = insert_memel(Encoder(), after=["head.1"], n_forget=1)
    twin = copy.deepcopy(model)
    model(torch.randn(8, 16))
    assert find_memel(twin)["head.1"].batches_seen == 0
    remove_memel(twin)
    assert len(find_memel(model)) == 1
