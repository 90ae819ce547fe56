"""Block detection on real exports and on hand-built graphs, including the reasons for skipping."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.rewriter.blocks import find_blocks, select_blocks
from neurorewrite.rewriter.io import load_model
from tests.builders import LINEAR_VARIANTS, mlp_model

EXPECTED_ACTIVATIONS = {
    "torchscript_gemm": ["Relu"],
    "dynamo_gemm": ["Relu"],
    "gelu_silu_chain": ["Gelu", "SiLU"],
    "gelu_erf": ["Gelu(erf)"],
    "gelu_tanh": ["Gelu(tanh)"],
    "leaky": ["LeakyRelu"],
    "sigmoid": ["Sigmoid"],
    "tanh": ["Tanh"],
    "elu": ["Elu"],
    "softplus": ["Softplus"],
    "transformer": ["Relu"],
    "sklearn_mlp": ["Relu"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_ACTIVATIONS))
def test_finds_blocks_in_real_exports(exports, name):
    search = find_blocks(load_model(exports[name]))
    assert [b.activation for b in search.blocks] == EXPECTED_ACTIVATIONS[name]
    for block in search.blocks:
        assert block.first.out_features == block.second.in_features


def test_transformer_ffn_is_a_matmul_add_block(exports):
    (block,) = find_blocks(load_model(exports["transformer"])).blocks
    assert block.first.op == block.second.op == "MatMul+Add"
    assert (block.in_features, block.width, block.out_features) == (16, 32, 16)


@pytest.mark.parametrize(
    "kwargs", [{}, *LINEAR_VARIANTS, {"act": None}],
)
def test_linear_variants_are_found(kwargs):
    model = mlp_model(**kwargs)
    (block,) = find_blocks(model).blocks
    assert (block.in_features, block.width, block.out_features) == (6, 8, 3)
    expected = "Identity" if kwargs.get("act", "Relu") is None else "Relu"
    assert block.activation == expected


def _add_node(model: onnx.ModelProto, node: onnx.NodeProto, output: str | None = None) -> onnx.ModelProto:
    new = onnx.ModelProto()
    new.CopyFrom(model)
    new.graph.node.append(node)
    if output:
        new.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
    return new


def test_hidden_tensor_used_elsewhere_is_skipped_with_reason():
    model = _add_node(mlp_model(), helper.make_node("Softmax", ["act"], ["side"], name="side"), "side")
    search = find_blocks(model)
    assert not search.blocks
    assert "consumed by Softmax node side" in search.skipped[0].reason


def test_hidden_tensor_as_graph_output_is_skipped():
    model = mlp_model()
    model.graph.output.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, None))
    search = find_blocks(model)
    assert not search.blocks and "graph output" in search.skipped[0].reason


def test_shared_weight_is_rewritten_on_a_private_copy_and_said_so():
    model = _add_node(mlp_model(), helper.make_node("Identity", ["fc1.w"], ["w_copy"], name="reuse"), "w_copy")
    (block,) = find_blocks(model).blocks
    assert any("weight fc1.w of fc1 is shared with 1 other" in n and "private copy" in n for n in block.notes)


def test_weights_given_as_graph_inputs_are_skipped_with_reason():
    model = mlp_model()
    w = next(t for t in model.graph.initializer if t.name == "fc2.w")
    model.graph.input.append(helper.make_tensor_value_info("fc2.w", TensorProto.FLOAT, list(w.dims)))
    search = find_blocks(model)
    assert not search.blocks and "graph input" in search.skipped[0].reason


def test_non_scalar_operand_in_activation_is_skipped():
    model = mlp_model(act=None)
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    new = onnx.ModelProto()
    new.CopyFrom(model)
    new.graph.initializer.append(scale)
    nodes = list(new.graph.node)
    del new.graph.node[:]
    for n in nodes:
        if n.op_type == "Gemm" and n.name == "fc2":
            new.graph.node.append(helper.make_node("Mul", ["fc1.out", "scale"], ["scaled"], name="scale_mul"))
            n.input[0] = "scaled"
        new.graph.node.append(n)
    search = find_blocks(new)
    assert not search.blocks
    assert "scale_mul mixes in tensor scale" in search.skipped[0].reason


def test_layers_selects_by_name_and_regex(exports):
    search = find_blocks(load_model(exports["gelu_silu_chain"]))
    names = [b.name for b in search.blocks]
    chosen, skipped = select_blocks(search, [names[1]])
    assert [b.name for b in chosen] == [names[1]]
    assert any(s.reason == "not selected by --layers" for s in skipped)
    chosen, _ = select_blocks(search, [r"/\d/Gemm"])
    assert [b.name for b in chosen] == names
