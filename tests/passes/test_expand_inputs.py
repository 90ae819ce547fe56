"""What the expand pass hands the numpy core and what it writes back: every bias of a gated block (separate
or fused gate/up), activation-aware prune scales (for a plain block, a gated one, and the later block of
a chain, whose inputs are the earlier block's children), and a down-projection bias other nodes read.

Each case runs the expanded model in onnxruntime and compares it with a float64 numpy forward pass
over the core's own expansion of the ORIGINAL weights (same per-block seed), so a bias dropped, a
scale not passed on, or a prune made without it changes the output and fails.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.fpe import FPEConfig, PruneScales, block_seed, expand_block, expand_gated_block
from neurorewrite.passes.expand_blocks import expand_model
from neurorewrite.rewriter.blocks import find_blocks
from tests.conftest import run_model

D, H, O = 10, 6, 4
RNG = np.random.default_rng(7)


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", O] if o == "y" else [O]) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def gated_weights() -> dict[str, np.ndarray]:
    """Weights in the core's layout (out, in); biases far from zero so that losing one shows."""
    def f(*shape: int) -> np.ndarray:
        return RNG.standard_normal(shape).astype(np.float32)
    return {"wg": f(H, D), "bg": f(H) + 1, "wu": f(H, D), "bu": f(H) - 1, "wd": f(O, H), "bd": f(O) + 2}


def gated_model(w: dict[str, np.ndarray], fused: bool, down_bias_read_elsewhere: bool = False,
                down_beta: float | None = None) -> onnx.ModelProto:
    """``down(silu(gate(x)) * up(x))`` with MatMul + Add biases; ``fused``: one gate/up MatMul cut by Split;
    ``down_beta``: the down projection is a Gemm that scales its bias by ``beta`` (stored as bd / beta)."""
    inits = {"wd": w["wd"].T.copy(), "bd": w["bd"]}
    if fused:
        inits.update({"wgu": np.concatenate([w["wg"], w["wu"]]).T.copy(), "bgu": np.concatenate([w["bg"], w["bu"]]),
                      "sizes": np.array([H, H], np.int64)})
        nodes = [helper.make_node("MatMul", ["x", "wgu"], ["gu0"], name="gate_up"),
                 helper.make_node("Add", ["gu0", "bgu"], ["gu"], name="gate_up_bias"),
                 helper.make_node("Split", ["gu", "sizes"], ["g", "u"], axis=-1, name="cut")]
    else:
        inits.update({"wg": w["wg"].T.copy(), "bg": w["bg"], "wu": w["wu"].T.copy(), "bu": w["bu"]})
        nodes = [helper.make_node("MatMul", ["x", "wg"], ["g0"], name="gate"), helper.make_node("Add", ["g0", "bg"], ["g"]),
                 helper.make_node("MatMul", ["x", "wu"], ["u0"], name="up"), helper.make_node("Add", ["u0", "bu"], ["u"])]
    nodes += [helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["silu"]),
              helper.make_node("Mul", ["silu", "u"], ["h"], name="product"),
              helper.make_node("MatMul", ["h", "wd"], ["y0"], name="down"), helper.make_node("Add", ["y0", "bd"], ["y"], name="down_bias")]
    if down_beta is not None:
        inits["bd"] = (w["bd"] / down_beta).astype(np.float32)
        nodes[-2:] = [helper.make_node("Gemm", ["h", "wd", "bd"], ["y"], beta=down_beta, name="down")]
    outputs = ("y",)
    if down_bias_read_elsewhere:
        nodes.append(helper.make_node("Neg", ["bd"], ["side"], name="side"))
        outputs = ("y", "side")
    return _model(nodes, inits, outputs)


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


def gated_reference(w: dict[str, np.ndarray], cfg: FPEConfig, x: np.ndarray, scales: PruneScales | None = None,
                    input_scale: np.ndarray | None = None) -> np.ndarray:
    f64 = {k: v.astype(np.float64) for k, v in w.items()}
    e = expand_gated_block(w["wg"], w["bg"], w["wu"], w["bu"], w["wd"], w["bd"], replace_seed(cfg, 0), scales, input_scale)
    x = x.astype(np.float64)
    hidden = silu(x @ e.wg.T.astype(np.float64) + e.bg) * (x @ e.wu.T.astype(np.float64) + e.bu)
    assert f64["bd"].shape == e.bd.shape
    return hidden @ e.wd.T.astype(np.float64) + e.bd


def replace_seed(cfg: FPEConfig, position: int) -> FPEConfig:
    from dataclasses import replace
    return replace(cfg, seed=block_seed(cfg.seed, position))


def the_block_name(model: onnx.ModelProto, position: int = 0) -> str:
    return find_blocks(model).blocks[position].name


@pytest.mark.parametrize("down_beta", [None, 0.5])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("alpha", [2, 3])
def test_gated_biases_reach_the_core_and_the_graph(fused: bool, alpha: int, down_beta: float | None) -> None:
    w = gated_weights()
    # with every intermediate shape recorded: the widened ones (the cut's outputs too) must not keep the old width
    model = onnx.shape_inference.infer_shapes(gated_model(w, fused, down_beta=down_beta), strict_mode=True)
    assert {"g", "u", "h"} <= {v.name for v in model.graph.value_info}
    cfg = FPEConfig(alpha=alpha, seed=11, bias="split")  # split biases: every child's share differs from the parent's
    new, report = expand_model(model, cfg)
    onnx.checker.check_model(new, full_check=True)
    every = sum(int(np.count_nonzero(v)) for v in w.values())  # weights and biases of gate, up and down
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before == every
    assert report.blocks[0].up == (None if fused else "up")  # the record names a separate up projection
    x = RNG.standard_normal((5, D)).astype(np.float32)
    np.testing.assert_allclose(run_model(new, {"x": x})[0], gated_reference(w, cfg, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_gated_blocks_prune_by_the_given_scales(fused: bool) -> None:
    w = gated_weights()
    model = gated_model(w, fused)
    cfg = FPEConfig(alpha=2, seed=3)
    # scales that reorder the prune: wide input columns and gate rows by random factors over decades
    scales = PruneScales(in_columns=10 ** RNG.uniform(-2, 2, D), in_rows=(10 ** RNG.uniform(-2, 2, H), None),
                         out_columns=10 ** RNG.uniform(-2, 2, H))
    x = RNG.standard_normal((5, D)).astype(np.float32)
    aware, _ = expand_model(model, cfg, scales={the_block_name(model): scales})
    plain = gated_reference(w, cfg, x)
    want = gated_reference(w, cfg, x, scales)
    assert np.abs(want - plain).max() > 1e-2  # the scales change the prune, so this case can tell
    np.testing.assert_allclose(run_model(aware, {"x": x})[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
def test_gated_blocks_split_by_the_given_input_scales(fused: bool) -> None:
    """The tiered split of a gated block ranks its inputs by the rms expand_model is given for it."""
    w = gated_weights()
    model = gated_model(w, fused)
    cfg = FPEConfig(alpha=2, seed=3, split="tiered", prune="layer")
    rms = 10 ** RNG.uniform(-2, 2, D)  # decades apart: they reorder every neuron's ranking
    x = RNG.standard_normal((5, D)).astype(np.float32)
    aware, _ = expand_model(model, cfg, input_scales={the_block_name(model): rms})
    plain, want = gated_reference(w, cfg, x), gated_reference(w, cfg, x, input_scale=rms)
    assert np.abs(want - plain).max() > 1e-2  # the scales change the split, so this case can tell
    np.testing.assert_allclose(run_model(aware, {"x": x})[0], want, rtol=1e-4, atol=1e-4)


def chain_model(ws: list[tuple[np.ndarray, np.ndarray]]) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm -> Relu -> Gemm -> y (weights in the core's layout, Gemm transB=1)."""
    nodes, inits, inp = [], {}, "x"
    for i, (w, b) in enumerate(ws):
        inits[f"w{i}"], inits[f"b{i}"] = w, b
        nodes.append(helper.make_node("Gemm", [inp, f"w{i}", f"b{i}"], [f"z{i}"], transB=1, name=f"fc{i}"))
        inp = f"z{i}"
        if i < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [inp], [f"r{i}"], name=f"act{i}"))
            inp = f"r{i}"
    nodes.append(helper.make_node("Identity", [inp], ["y"]))
    return _model(nodes, inits)


def test_plain_and_chained_blocks_prune_by_the_given_scales() -> None:
    """The later block of a chain reads the earlier block's children: its input scales are given per
    parent (the original width) and each child takes its parent's."""
    ws = [(RNG.standard_normal((H, D)).astype(np.float32), RNG.standard_normal(H).astype(np.float32)),
          (RNG.standard_normal((H, H)).astype(np.float32), RNG.standard_normal(H).astype(np.float32)),
          (RNG.standard_normal((O, H)).astype(np.float32), RNG.standard_normal(O).astype(np.float32))]
    # every intermediate shape recorded: both blocks' widened tensors must be refreshed, not only the last one's
    model = onnx.shape_inference.infer_shapes(chain_model(ws), strict_mode=True)
    names = [the_block_name(model, 0), the_block_name(model, 1)]
    scales = [PruneScales(in_columns=10 ** RNG.uniform(-2, 2, D), out_columns=10 ** RNG.uniform(-2, 2, H)),
              PruneScales(in_columns=10 ** RNG.uniform(-2, 2, H), out_columns=10 ** RNG.uniform(-2, 2, H))]
    alpha = 2
    cfg = FPEConfig(alpha=alpha, seed=5)
    new, _ = expand_model(model, cfg, scales=dict(zip(names, scales)))
    onnx.checker.check_model(new, full_check=True)

    def reference(use_scales: bool) -> np.ndarray:
        first = expand_block(*ws[0], *ws[1], replace_seed(cfg, 0), scales[0] if use_scales else None)
        later = PruneScales(in_columns=np.repeat(scales[1].in_columns, alpha), out_columns=scales[1].out_columns)
        second = expand_block(first.w2, first.b2, *ws[2], replace_seed(cfg, 1), later if use_scales else None)
        x = RNG_X.astype(np.float64)
        h1 = np.maximum(x @ first.w1.T.astype(np.float64) + first.b1, 0)
        h2 = np.maximum(h1 @ second.w1.T.astype(np.float64) + second.b1, 0)
        return h2 @ second.w2.T.astype(np.float64) + second.b2

    want, plain = reference(True), reference(False)
    # scales without input columns (only the hidden side measured) pass through the chain unchanged
    only_out = [PruneScales(out_columns=s.out_columns) for s in scales]
    partly, _ = expand_model(model, cfg, scales=dict(zip(names, only_out)))
    first = expand_block(*ws[0], *ws[1], replace_seed(cfg, 0), only_out[0])
    (w1,) = [numpy_helper.to_array(t) for t in partly.graph.initializer if t.name.startswith("w0")]
    np.testing.assert_array_equal(w1, first.w1)
    assert np.abs(want - plain).max() > 1e-2
    np.testing.assert_allclose(run_model(new, {"x": RNG_X})[0], want, rtol=1e-4, atol=1e-4)


RNG_X = np.random.default_rng(8).standard_normal((5, D)).astype(np.float32)


def test_a_down_bias_other_nodes_read_stays_shared_and_unchanged() -> None:
    """FPE copies the down projection's bias unchanged: it is left in place, so a reader outside the block
    keeps reading the same tensor (no private copy is made)."""
    w = gated_weights()
    model = gated_model(w, fused=False, down_bias_read_elsewhere=True)
    new, report = expand_model(model, FPEConfig(alpha=2, seed=1))
    notes = find_blocks(model).blocks[0].notes
    assert notes and report.blocks[0].notes == notes and any("bd" in n for n in notes)  # the sharing is reported
    readers = {n.name: list(n.input) for n in new.graph.node if n.name in ("down_bias", "side")}
    assert readers["down_bias"][1] == "bd" and readers["side"] == ["bd"]
    assert [t.name for t in new.graph.initializer].count("bd") == 1
    (bd,) = [numpy_helper.to_array(t) for t in new.graph.initializer if t.name == "bd"]
    np.testing.assert_array_equal(bd, w["bd"])
