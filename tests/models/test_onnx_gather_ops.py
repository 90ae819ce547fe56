"""The lifter's GatherElements and GatherND (BERT's and GPT-2's exports index with them) against onnxruntime
on one-node graphs: negative indices, every axis, and GatherND's batch dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from neurorewrite.models.onnx_ops_tensor import TENSOR_OPS
from tests.conftest import run_model

RNG = np.random.default_rng(0)


def onnxruntime_value(op: str, data: np.ndarray, indices: np.ndarray, **attrs: int) -> np.ndarray:
    node = helper.make_node(op, ["data", "indices"], ["out"], **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info("data", TensorProto.FLOAT, data.shape),
                     helper.make_tensor_value_info("indices", TensorProto.INT64, indices.shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return run_model(model, {"data": data, "indices": indices})[0]


def lifted_value(op: str, data: np.ndarray, indices: np.ndarray, **attrs: int) -> np.ndarray:
    return TENSOR_OPS[op]([torch.from_numpy(data), torch.from_numpy(indices)], attrs).numpy()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_matches_onnxruntime(axis: int) -> None:
    data = RNG.standard_normal((3, 4, 5)).astype(np.float32)
    size = data.shape[axis]
    shape = list(data.shape)
    shape[axis] = 2  # fewer entries than the data along the axis
    indices = RNG.integers(-size, size, shape).astype(np.int64)
    want = onnxruntime_value("GatherElements", data, indices, axis=axis)
    np.testing.assert_array_equal(lifted_value("GatherElements", data, indices, axis=axis), want)


@pytest.mark.parametrize(("batch_dims", "data_shape", "indices_shape"), [
    (0, (4, 5, 6), (3, 2)),  # pairs into the first two axes: rows of 6
    (0, (4, 5, 6), (2, 3, 3)),  # full index tuples: scalars
    (1, (2, 5, 6), (2, 3, 1)),  # per batch entry, 3 rows each
    (2, (2, 3, 5, 6), (2, 3, 4, 1)),
])
def test_gather_nd_matches_onnxruntime(batch_dims: int, data_shape: tuple, indices_shape: tuple) -> None:
    data = RNG.standard_normal(data_shape).astype(np.float32)
    depth = indices_shape[-1]
    bounds = np.array(data_shape[batch_dims:batch_dims + depth])
    indices = (RNG.integers(-1000, 1000, indices_shape) % (2 * bounds) - bounds).astype(np.int64)  # negative too
    assert (indices < 0).any()
    want = onnxruntime_value("GatherND", data, indices, batch_dims=batch_dims)
    got = lifted_value("GatherND", data, indices, batch_dims=batch_dims)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
