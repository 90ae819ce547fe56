"""The lifter's Pad (MobileBERT's export pads its trigram embeddings) against onnxruntime on one-node
graphs: every mode, negative pads (crops), a fill value, the ``axes`` input and the older attribute form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.models.onnx_ops_tensor import TENSOR_OPS
from tests.conftest import run_model

DATA = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)


def onnxruntime_pad(pads: list[int], mode: str, value: float | None, axes: list[int] | None, opset: int) -> np.ndarray:
    inputs = {"pads": np.array(pads, dtype=np.int64)}
    if value is not None:
        inputs["value"] = np.array(value, dtype=np.float32)
    if axes is not None:
        inputs["axes"] = np.array(axes, dtype=np.int64)
    names = ["data", "pads", "value" if value is not None else "", "axes" if axes is not None else ""]
    while names[-1] == "":
        names.pop()
    node = helper.make_node("Pad", names, ["out"], mode=mode)
    constants = [numpy_helper.from_array(array, name) for name, array in inputs.items()]
    graph = helper.make_graph([node], "pad", [helper.make_tensor_value_info("data", TensorProto.FLOAT, DATA.shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return run_model(model, {"data": DATA})[0]


def lifted_pad(pads: list[int], mode: str, value: float | None, axes: list[int] | None) -> np.ndarray:
    xs = [torch.from_numpy(DATA), torch.tensor(pads), None if value is None else torch.tensor(value),
          None if axes is None else torch.tensor(axes)]
    return TENSOR_OPS["Pad"](xs, {"mode": mode.encode()}).numpy()


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "wrap"])
@pytest.mark.parametrize(("pads", "axes"), [
    ([0, 1, 2, 0, 2, 1], None),  # begin counts of every axis, then end counts
    ([0, -1, 1, 0, 1, -2], None),  # negative: a crop on that side
    ([2, 1], [-1]),  # only the last axis, named by the axes input
    ([1, 0, 0, 2], [2, 1]),  # two axes in another order
])
def test_pad_matches_onnxruntime(mode: str, pads: list[int], axes: list[int] | None) -> None:
    value = 2.5 if mode == "constant" else None
    want = onnxruntime_pad(pads, mode, value, axes, opset=19)
    got = lifted_pad(pads, mode, value, axes)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_pad_reads_the_attributes_of_opset_2() -> None:
    node = helper.make_node("Pad", ["data"], ["out"], pads=[0, 1, 0, 0, 2, 1], value=-1.0)
    graph = helper.make_graph([node], "pad", [helper.make_tensor_value_info("data", TensorProto.FLOAT, DATA.shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    want = run_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)]), {"data": DATA})[0]
    got = TENSOR_OPS["Pad"]([torch.from_numpy(DATA)], {"pads": [0, 1, 0, 0, 2, 1], "value": -1.0}).numpy()
    np.testing.assert_array_equal(got, want)
