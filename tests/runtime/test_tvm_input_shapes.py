"""The input shapes ``compile`` builds for: a named symbolic dimension one ``--shape`` fixes is fixed in
every input that has it (a transformer's token ids, attention mask and token types share batch and
sequence); two sizes for one dimension, or a shape for no input, are refused with the names."""

from __future__ import annotations

import pytest
from onnx import TensorProto, helper

from neurorewrite.errors import InvalidOptionError

pytest.importorskip("tvm")

from neurorewrite.runtime.tvm_import import input_shapes  # noqa: E402


def three_inputs() -> object:
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    other = helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["batch", 4, "n"])
    out = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    graph = helper.make_graph([helper.make_node("Add", ["input_ids", "attention_mask"], ["y"])], "g", [ids, mask, other], [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_shape_fixes_its_named_dimensions_in_every_input() -> None:
    shapes = input_shapes(three_inputs(), {"input_ids": [2, 16]})
    assert shapes == {"input_ids": [2, 16], "attention_mask": [2, 16], "extra": [2, 4, "n"]}
    assert input_shapes(three_inputs(), None)["attention_mask"] == ["batch", "sequence"]


def test_one_dimension_with_two_sizes_or_an_unknown_input_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="dimension 'batch' size 3 for attention_mask but 2 for input_ids"):
        input_shapes(three_inputs(), {"input_ids": [2, 16], "attention_mask": [3, 16]})
    with pytest.raises(InvalidOptionError, match="--shape names ids, not an input"):
        input_shapes(three_inputs(), {"ids": [2, 16]})
