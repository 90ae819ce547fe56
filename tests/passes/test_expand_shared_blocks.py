"""Blocks that read the same weights (ALBERT shares one FFN across its layers) are expanded once: every
such block reads the one expanded copy, so the whole model's nonzero count stays the original's and
the blocks keep computing one function. Calibration fits the shared W2' once, on every member's rows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import neurorewrite
from neurorewrite.rewriter.blocks import find_blocks
from tests.conftest import run_model

D, H = 6, 8


def initializer_nonzeros(model: onnx.ModelProto) -> int:
    return sum(int(np.count_nonzero(numpy_helper.to_array(t))) for t in model.graph.initializer)


def twice_applied_ffn(through_identity: bool = True, outside_reader: bool = False) -> onnx.ModelProto:
    """x -> FFN -> Softmax -> FFN -> y with one set of weights (ALBERT's layers, with the Softmax for
    their LayerNorm), the second use reading Identity copies as the TorchScript exporter writes them (or
    the initializers themselves); ``outside_reader`` adds a node outside the blocks that reads the
    first weight too."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (D, H)), ("b1", (H,)), ("w2", (H, D)), ("b2", (D,)))]
    nodes, x = [], "x"
    for k in range(2):
        names = ["w1", "b1", "w2", "b2"]
        if k == 1 and through_identity:
            nodes += [helper.make_node("Identity", [n], [f"{n}.copy"], name=f"copy_{n}") for n in names]
            names = [f"{n}.copy" for n in names]
        nodes += [
            helper.make_node("MatMul", [x, names[0]], [f"mm1_{k}"], name=f"fc1_{k}"),
            helper.make_node("Add", [f"mm1_{k}", names[1]], [f"h_{k}"], name=f"fc1_{k}_add"),
            helper.make_node("Relu", [f"h_{k}"], [f"a_{k}"], name=f"relu_{k}"),
            helper.make_node("MatMul", [f"a_{k}", names[2]], [f"mm2_{k}"], name=f"fc2_{k}"),
            helper.make_node("Add", [f"mm2_{k}", names[3]], [f"y_{k}"], name=f"fc2_{k}_add"),
            helper.make_node("Softmax", [f"y_{k}"], [f"s_{k}"], name=f"norm_{k}"),
        ]
        x = f"s_{k}"
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", D])]
    if outside_reader:
        nodes.append(helper.make_node("ReduceSum", ["w1"], ["w1_total"], name="outside", keepdims=0))
        outputs.append(helper.make_tensor_value_info("w1_total", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ffn(x: np.ndarray, model: onnx.ModelProto, block_index: int) -> np.ndarray:
    """One block's function, computed in numpy from the tensors its nodes read in ``model``."""
    block = find_blocks(model).blocks[block_index]
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def read(name: str) -> np.ndarray:
        node = next((n for n in model.graph.node if name in n.output and n.op_type == "Identity"), None)
        return read(node.input[0]) if node is not None else values[name]

    first, second = block.first, block.second
    h = np.maximum(x @ read(first.weight) + read(first.bias), 0)
    return h @ read(second.weight) + read(second.bias)


def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("through_identity", [True, False])
def test_blocks_reading_one_set_of_weights_share_one_expansion(through_identity: bool) -> None:
    original = twice_applied_ffn(through_identity)
    new, report = neurorewrite.expand(original, alpha=4, seed=3)
    onnx.checker.check_model(new, full_check=True)
    assert initializer_nonzeros(new) == initializer_nonzeros(original), "the whole model keeps its count"
    assert [(b.width_after, b.nnz_after) for b in report.blocks] == [(4 * H, b.nnz_before) for b in report.blocks]
    first, second = find_blocks(new).blocks
    assert [lin.weight for lin in first.linears] == [lin.weight for lin in second.linears], "one expanded copy"
    assert all("reads the same weights as block(s)" in b.notes[-1] for b in report.blocks)
    assert not any("private copy" in n for b in report.blocks for n in b.notes)
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    (y,) = run_model(new, {"x": x})
    np.testing.assert_array_equal(ffn(x, new, 1), ffn(x, new, 0))  # one function
    np.testing.assert_allclose(y, softmax(ffn(softmax(ffn(x, new, 0)), new, 0)), rtol=1e-5, atol=1e-6)
    same, _ = neurorewrite.expand(original, alpha=1)
    np.testing.assert_allclose(run_model(same, {"x": x})[0], run_model(original, {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_a_reader_outside_the_blocks_keeps_the_original_weight() -> None:
    original = twice_applied_ffn(outside_reader=True)
    new, _ = neurorewrite.expand(original, alpha=4, seed=3)
    x = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    assert run_model(new, {"x": x})[1] == pytest.approx(run_model(original, {"x": x})[1])
    # the blocks share one expanded copy; the original w1 stays for the outside reader
    assert initializer_nonzeros(new) == initializer_nonzeros(original) + D * H


def test_calibration_fits_the_shared_weights_once_on_every_members_rows() -> None:
    original = twice_applied_ffn()
    n = 200
    x = np.random.default_rng(2).standard_normal((n, D)).astype(np.float32)
    bare, _ = neurorewrite.expand(original, alpha=4, seed=3, split="tiered")
    new, report = neurorewrite.expand(original, alpha=4, seed=3, calibrate={"x": x})
    assert initializer_nonzeros(new) == initializer_nonzeros(original)
    first, second = find_blocks(new).blocks
    assert [lin.weight for lin in first.linears] == [lin.weight for lin in second.linears], "still one set"
    (note,) = report.calibration  # one fit for the group, at its last member
    assert note["block"] == second.name and note["shared_with"] == [first.name]
    assert note["rows"] + note["holdout_rows"] == 2 * n, "both members' rows"
    assert note["rmse_after"] < note["rmse_before"] and note["holdout_rmse_after"] < note["holdout_rmse_before"]
    test = {"x": np.random.default_rng(3).standard_normal((64, D)).astype(np.float32)}
    want = run_model(original, test)[0]
    error = lambda m: float(np.sqrt(((run_model(m, test)[0] - want) ** 2).mean()))  # noqa: E731
    assert error(new) < error(bare)


def test_calibration_leaves_the_original_weight_to_a_reader_outside_the_blocks() -> None:
    original = twice_applied_ffn(outside_reader=True)
    x = {"x": np.random.default_rng(2).standard_normal((100, D)).astype(np.float32)}
    new, report = neurorewrite.expand(original, alpha=4, seed=3, calibrate=x)
    assert len(report.calibration) == 1
    assert run_model(new, x)[1] == pytest.approx(run_model(original, x)[1])


def test_calibration_refuses_shared_weights_that_another_node_reads() -> None:
    """expand gives a group tensors of its own; a graph where another node reads them too (made by hand
    here) cannot have them refit for the blocks alone."""
    from neurorewrite.errors import UnsupportedModelError
    from neurorewrite.passes.calibrate import calibrate_model

    original = twice_applied_ffn()
    expanded, report = neurorewrite.expand(original, alpha=4, seed=3)
    weight = find_blocks(expanded).blocks[0].first.weight
    expanded.graph.node.append(helper.make_node("ReduceSum", [weight], ["w_total"], name="outside", keepdims=0))
    expanded.graph.output.append(helper.make_tensor_value_info("w_total", TensorProto.FLOAT, []))
    x = {"x": np.random.default_rng(2).standard_normal((100, D)).astype(np.float32)}
    with pytest.raises(UnsupportedModelError, match="read one set of weights that other nodes read too"):
        calibrate_model(original, expanded, report, x)


def test_the_lifter_makes_tied_layers_one_layer_and_distillation_steps_it_once() -> None:
    """Every use of the shared weights is one torch layer, so training sums their gradients; the
    distillation's optimizer holds its parameters once (twice would step them twice)."""
    import warnings

    from neurorewrite.models.onnx_module import OnnxGraph
    from neurorewrite.passes.distill_onnx import DistillOptions, distill_model

    original = twice_applied_ffn()
    student, _ = neurorewrite.expand(original, alpha=4, seed=3)
    first, second = find_blocks(student).blocks
    lifted = OnnxGraph(student, train={lin.name for b in (first, second) for lin in b.linears})
    for a, b in zip(first.linears, second.linears):
        assert lifted.layers[lifted.key_of(a.name)] is lifted.layers[lifted.key_of(b.name)]
    x = {"x": np.random.default_rng(4).standard_normal((64, D)).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about a parameter group holding a parameter twice
        tuned, report = distill_model(student, original, x, DistillOptions(epochs=3, optimizer="sgd", lr=1e-2))
    assert initializer_nonzeros(tuned) == initializer_nonzeros(original)
    first, second = find_blocks(tuned).blocks
    assert [lin.weight for lin in first.linears] == [lin.weight for lin in second.linears], "still one set"
    assert report.held_out_after < report.held_out_before
