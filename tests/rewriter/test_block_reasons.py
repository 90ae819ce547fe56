"""Block detection on hand-built graphs for the forms exporters write rarely, and the reasons it gives
when a linear followed by an activation is not rewritten (reason codes are part of the contract)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import neurorewrite
from neurorewrite.rewriter.blocks import find_blocks
from tests.conftest import run_model

D, H, O = 6, 8, 3
RNG = np.random.default_rng(0)


def model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], x_shape: list, outputs: tuple[str, ...] = ("y",),
          opset: int = 17) -> onnx.ModelProto:
    rank = {"y": 4 if len(x_shape) == 4 else 2, "width": 1, "side": 2}
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [f"{o}{k}" for k in range(rank[o])]) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def weights(*names_shapes: tuple[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    return {n: RNG.standard_normal(s).astype(np.float32) for n, s in names_shapes}


def ints(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def conv1d_mlp(target: np.ndarray, back: np.ndarray) -> onnx.ModelProto:
    """GPT-2's Conv1D form: Reshape -> Gemm -> Reshape(target) -> act -> Reshape(back) -> Gemm."""
    inits = weights(("w1", (D, H)), ("b1", (H,)), ("w2", (H, O)), ("b2", (O,)))
    inits.update({"flat": ints(-1, D), "target": target, "back": back})
    nodes = [
        helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("Gemm", ["x2", "w1", "b1"], ["a"], name="fc"),
        helper.make_node("Reshape", ["a", "target"], ["a3"], name="unflatten"), helper.make_node("Tanh", ["a3"], ["t"]),
        helper.make_node("Reshape", ["t", "back"], ["t2"], name="flatten"), helper.make_node("Gemm", ["t2", "w2", "b2"], ["y"], name="proj"),
    ]
    return model(nodes, inits, [2, 5, D])


def test_reshapes_that_hold_the_width_are_rewritten_with_it() -> None:
    m = conv1d_mlp(ints(2, 5, H), ints(-1, H))
    (block,) = find_blocks(m).blocks
    assert [e.kind for e in block.widen] == ["reshape-target", "reshape-target"]
    x = {"x": RNG.standard_normal((2, 5, D)).astype(np.float32)}
    new, report = neurorewrite.expand(m, alpha=3)
    assert report.blocks[0].width_after == 3 * H and report.blocks[0].nnz_after == report.blocks[0].nnz_before
    assert run_model(new, x)[0].shape == (10, O)
    same, _ = neurorewrite.expand(m, alpha=1)
    np.testing.assert_allclose(run_model(same, x)[0], run_model(m, x)[0], rtol=1e-6)


@pytest.mark.parametrize("target", [ints(10, 2, H // 2), ints(2, H, 5)])
def test_reshapes_that_move_the_width_are_refused(target: np.ndarray) -> None:
    search = find_blocks(conv1d_mlp(target, ints(-1, H)))
    assert not search.blocks
    assert search.skipped[0].code == "shape"
    assert "Reshape node unflatten: its target's last dimension is not the hidden width 8" in search.skipped[0].reason


def test_a_shape_value_that_carries_the_width_elsewhere_is_refused() -> None:
    inits = weights(("w1", (H, D)), ("w2", (O, H)))
    inits["last"] = ints(-1)
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["a"], transB=1, name="fc"), helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, name="proj"),
        helper.make_node("Shape", ["r"], ["s"], name="shape"), helper.make_node("Gather", ["s", "last"], ["n"]),
        helper.make_node("Cast", ["n"], ["width"], to=TensorProto.FLOAT, name="leak"),
    ]
    search = find_blocks(model(nodes, inits, ["N", D], outputs=("y", "width")))
    assert not search.blocks
    assert search.skipped[0].code == "shape" and "Shape node shape reads the hidden width" in search.skipped[0].reason


def gated(up_input: str = "x", extra_use: bool = False, split: np.ndarray | None = None, slices: bool = False) -> onnx.ModelProto:
    """``down(silu(gate(x)) * up(up_input))``, or with ``split`` one fused gate/up linear cut by Split sizes
    (``slices``: by two Slices with constant bounds)."""
    if split is not None:
        inits = weights(("wgu", (D, 2 * H)), ("wd", (H, O)))
        inits.update({"sizes": split, "zero": ints(0), "mid": ints(H), "end": ints(2 * H), "axis": ints(-1)})
        nodes = [helper.make_node("MatMul", ["x", "wgu"], ["gu"], name="gate_up")]
        if slices:
            nodes += [helper.make_node("Slice", ["gu", "zero", "mid", "axis"], ["g"], name="cut_gate"),
                      helper.make_node("Slice", ["gu", "mid", "end", "axis"], ["u"], name="cut_up")]
        else:
            nodes.append(helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=-1, name="cut"))
    else:
        inits = weights(("wg", (D, H)), ("wu", (D, H)), ("wd", (H, O)))
        nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"], name="gate"),
                 helper.make_node("MatMul", [up_input, "wu"], ["u"], name="up")]
        if up_input != "x":
            nodes.insert(0, helper.make_node("Neg", ["x"], [up_input]))
    nodes += [helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["silu"]),
              helper.make_node("Mul", ["silu", "u"], ["h"], name="product"), helper.make_node("MatMul", ["h", "wd"], ["y"], name="down")]
    outputs = ("y",)
    if extra_use:
        nodes.append(helper.make_node("Relu", ["u"], ["side"]))
        outputs = ("y", "side")
    return model(nodes, inits, ["N", D], outputs)


def test_gated_blocks_and_their_near_misses() -> None:
    (block,) = find_blocks(gated()).blocks
    assert (block.form, block.activation, block.up.name) == ("gated", "SiLU (gated)", "up")
    (fused,) = find_blocks(gated(split=ints(H, H))).blocks
    assert fused.form == "gated (fused gate/up)" and [e.kind for e in fused.widen] == ["scale"]
    other_input = find_blocks(gated(up_input="neg_x"))
    assert not other_input.blocks and other_input.skipped[0].code == "gated"
    assert "reads neg_x, not the gate's input x" in other_input.skipped[0].reason
    shared = find_blocks(gated(extra_use=True))
    assert not shared.blocks and "used outside the gated product" in shared.skipped[0].reason


@pytest.mark.parametrize("slices", [False, True])
def test_fused_gate_up_cut_constants_are_rewritten(slices: bool) -> None:
    m = gated(split=ints(H, H), slices=slices)
    (block,) = find_blocks(m).blocks
    assert [e.kind for e in block.widen] == (["scale", "scale", "scale"] if slices else ["scale"])
    x = {"x": RNG.standard_normal((4, D)).astype(np.float32)}
    new, report = neurorewrite.expand(m, alpha=4)
    assert report.blocks[0].width_after == 4 * H and report.blocks[0].nnz_after == report.blocks[0].nnz_before
    values = {t.name: numpy_helper.to_array(t).tolist() for t in new.graph.initializer if t.data_type == TensorProto.INT64}
    if slices:
        assert values["mid.fpe"] == [4 * H] and values["end.fpe"] == [8 * H] and values["zero"] == [0]
    else:
        assert values["sizes.fpe"] == [4 * H, 4 * H]
    (wide,) = find_blocks(new).blocks
    assert wide.width == 4 * H and np.isfinite(run_model(new, x)[0]).all()
    same, _ = neurorewrite.expand(m, alpha=1)
    np.testing.assert_allclose(run_model(same, x)[0], run_model(m, x)[0], rtol=1e-6)


def test_a_computed_weight_followed_by_an_activation_is_listed() -> None:
    inits = weights(("w1", (H, D)), ("w2", (O, H)))
    nodes = [helper.make_node("Transpose", ["w1"], ["w1t"]), helper.make_node("MatMul", ["x", "w1t"], ["a"], name="fc"),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1, name="proj")]
    search = find_blocks(model(nodes, inits, ["N", D]))
    assert not search.blocks
    (skip,) = search.skipped
    assert (skip.name, skip.code) == ("fc", "weight-not-constant") and "computed by Transpose" in skip.reason


@pytest.mark.parametrize("attrs,found", [({}, True), ({"group": 2}, False), ({"strides": [2, 2]}, False)])
def test_only_pointwise_convolutions_are_linears(attrs: dict, found: bool) -> None:
    group = attrs.get("group", 1)
    inits = weights(("w1", (H, D // group, 1, 1)), ("b1", (H,)), ("w2", (O, H, 1, 1)))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], kernel_shape=[1, 1], name="pw1", **attrs),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1], name="pw2")]
    m = model(nodes, inits, ["N", D, 4, 4])
    blocks = find_blocks(m).blocks
    assert bool(blocks) == found
    if found:
        assert blocks[0].first.feature_axis == 1
        x = {"x": RNG.standard_normal((2, D, 4, 4)).astype(np.float32)}
        for fmt in ("dense", "sparse"):
            from neurorewrite.runtime.ort import ort_session

            new, report = neurorewrite.expand(m, alpha=3, format=fmt)
            assert report.blocks[0].nnz_after == report.blocks[0].nnz_before
            assert ort_session(new).run(None, x)[0].shape == (2, O, 4, 4)


def test_a_bias_merged_across_blocks_is_copied_per_block() -> None:
    """The dynamo exporter merges equal tensors (an untrained model's zero biases) into one initializer
    that several blocks, and other nodes, read."""
    inits = weights(("w1", (D, H)), ("w2", (H, D)), ("w3", (D, H)), ("w4", (H, O)))
    inits["b"] = RNG.standard_normal(H).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), helper.make_node("Add", ["m1", "b"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["h"], name="fc2"),
        helper.make_node("MatMul", ["h", "w3"], ["m3"], name="fc3"), helper.make_node("Add", ["b", "m3"], ["a3"]),
        helper.make_node("Relu", ["a3"], ["r3"]), helper.make_node("MatMul", ["r3", "w4"], ["z"], name="fc4"),
        helper.make_node("ReduceSum", ["b"], ["s"], keepdims=1, name="other_user"), helper.make_node("Add", ["z", "s"], ["y"]),
    ]
    m = model(nodes, inits, ["N", D])
    search = find_blocks(m)
    assert [b.name for b in search.blocks] == ["fc1", "fc2", "fc3"]  # fc2 -> fc3: an identity block of the chain
    for block in (search.blocks[0], search.blocks[2]):
        assert any("bias b of" in n and "shared with 2 other" in n and "private copy" in n for n in block.notes)
    x = {"x": RNG.standard_normal((4, D)).astype(np.float32)}
    new, report = neurorewrite.expand(m, alpha=3)
    assert all(b.nnz_after == b.nnz_before for b in report.blocks)
    readers = {n.name: list(n.input) for n in new.graph.node}
    assert readers["other_user"] == ["b"]
    kept = next(t for t in new.graph.initializer if t.name == "b")
    np.testing.assert_array_equal(numpy_helper.to_array(kept), inits["b"])
    copies = {i for n in new.graph.node if n.op_type == "Add" for i in n.input if i.startswith("b.fpe")}
    assert len(copies) == 2
    same, _ = neurorewrite.expand(m, alpha=1)
    np.testing.assert_allclose(run_model(same, x)[0], run_model(m, x)[0], rtol=1e-6)
