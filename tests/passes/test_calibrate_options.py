"""The calibration pass's options judged against independent references: the W2' a per-child and a
per-parent refit write is the masked least-squares solution numpy computes from the hidden activations;
``--target output`` fits the block's own output even where a residual Add follows it; ``--refit block``
trains W1' too with the pattern kept; which Add counts as the residual stream; the report's CPU split."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.api import expand
from neurorewrite.passes.calibrate import CalibrateOptions, _residual_operand
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import read_weights
from tests.builders import mlp_model
from tests.conftest import run_model

D, H, O = 6, 8, 3


def block_weights(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    (block,) = find_blocks(model).blocks
    index = GraphIndex.build(model.graph)
    (w1, b1), (w2, b2) = read_weights(index, block.first), read_weights(index, block.second)
    return w1, b1, w2, b2


def masked_lstsq(h: np.ndarray, t: np.ndarray, w0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output row, least squares with an intercept over the columns where ``w0`` is nonzero only, with a
    tiny ridge towards ``w0`` (float64): a column the sample never activates keeps its weight."""
    w = np.zeros(w0.shape)
    b = np.zeros(len(w0))
    lam = 1e-6 * len(h)
    for o in range(len(w0)):
        cols = np.flatnonzero(w0[o])
        a = np.vstack([np.column_stack([h[:, cols], np.ones(len(h))]),
                       np.column_stack([np.sqrt(lam) * np.eye(len(cols)), np.zeros(len(cols))])])
        sol = np.linalg.lstsq(a, np.concatenate([t[:, o], np.sqrt(lam) * w0[o, cols]]), rcond=None)[0]
        w[o, cols], b[o] = sol[:-1], sol[-1]
    return w, b


# at alpha 4 one parent's first copy is pruned while another copy is kept: the kept copy must stay nonzero
@pytest.mark.parametrize("alpha, per, support", [(2, "child", "kept"), (2, "child", "hessian"), (2, "parent", "hessian"),
                                                  (3, "child", "kept"), (3, "child", "hessian"), (4, "parent", "kept")])
def test_the_refit_is_the_masked_least_squares_solution(alpha: int, per: str, support: str) -> None:
    """On the prune's support, or per child on the one chosen again (per parent there is no choosing):
    the least-squares solution on that support, with every row's count kept."""
    model = mlp_model(d=D, h=H, o=O, seed=3)
    x = np.random.default_rng(0).standard_normal((600, D)).astype(np.float32)
    target = run_model(model, {"x": x})[0].astype(np.float64)
    kw = {"alpha": alpha, "seed": 1, "prune_by": "magnitude", "split": "random"}  # the bare expansion's prune and split, so W1' is the same
    bare, _ = expand(model, **kw)
    options = CalibrateOptions(holdout=0.0, solver="exact", ridge=1e-9, refit_per=per, support=support, first="keep")
    calibrated, report = expand(model, calibrate={"x": x}, calibrate_options=options, **kw)
    w1, b1, w2_bare, _ = block_weights(bare)
    w1_cal, _, w2, b2 = block_weights(calibrated)
    np.testing.assert_array_equal(w1_cal, w1)  # only W2' (and b2) is refit
    np.testing.assert_array_equal(np.count_nonzero(w2, axis=1), np.count_nonzero(w2_bare, axis=1))
    chosen = per == "child" and support == "hessian"
    assert report.calibration[0]["support"] == ("hessian" if chosen else "kept")
    assert chosen != np.array_equal(w2 != 0, w2_bare != 0)
    hidden = np.maximum(x.astype(np.float64) @ w1.T.astype(np.float64) + b1, 0)
    if per == "child":  # the ridge pulls towards w0: the prune's weights, or on a chosen support the dense fit's,
        # which is 0 for a unit the sample never activates (the only weights the ridge decides)
        w0 = np.where(w2 != 0, np.finfo(np.float64).tiny, 0.0) if chosen else w2_bare.astype(np.float64)
        want_w, want_b = masked_lstsq(hidden, target, w0)
    else:  # one weight per parent (the value its kept copies share): fit on each parent's summed children,
        # copied to every kept child
        parents = hidden.reshape(len(hidden), H, alpha).sum(axis=-1)
        copies = w2_bare.reshape(O, H, alpha).astype(np.float64)
        shared = copies.sum(axis=-1) / np.maximum((copies != 0).sum(axis=-1), 1)
        per_parent, want_b = masked_lstsq(parents, target, shared)
        want_w = np.where(w2_bare != 0, np.repeat(per_parent, alpha, axis=1), 0)
    # float32 activations and the pass's own (relative) ridge against a float64 reference: a wrong support,
    # grouping or target moves weights by tenths (a chosen support may hold near-collinear siblings, whose
    # large weights float32 moves by half a percent)
    np.testing.assert_allclose(w2, want_w, rtol=1e-2 if chosen else 5e-3, atol=5e-3)
    np.testing.assert_allclose(b2, want_b, rtol=5e-3, atol=5e-3)
    assert np.count_nonzero(w2) == np.count_nonzero(w2_bare)
    (note,) = report.calibration
    assert set(note["cpu_seconds"]) == {"gram", "support", "solve", "block"}
    assert note["width"] == (H if per == "parent" else alpha * H) and note["rows"] == len(x)
    assert note["block_mse"] is None and note["refit"] == "w2"
    # the model's output is the block's: the error the pass measured after the fit is the written model's
    real = float(np.sqrt(np.mean((run_model(calibrated, {"x": x})[0] - target) ** 2)))
    assert note["rmse_after"] == pytest.approx(real, rel=1e-3)


def residual_mlp() -> onnx.ModelProto:
    """``y = x + fc2(relu(fc1(x)))``, the transformer FFN's residual form."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((H, D)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(H).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal(D).astype(np.float32), "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], transB=1, name="fc1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["f"], transB=1, name="fc2"),
             helper.make_node("Add", ["x", "f"], ["y"], name="residual")]  # the block's output is the Add's SECOND input
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("target", ["output", "residual"])
def test_the_target_option_is_followed_where_a_residual_add_follows(target: str) -> None:
    """Before any other block there is no drift in the residual stream, so both targets fit the block's
    output here; what must hold is that ``output`` is not overridden by the Add that is present."""
    x = np.random.default_rng(5).standard_normal((400, D)).astype(np.float32)
    _, report = expand(residual_mlp(), alpha=2, calibrate={"x": x}, calibrate_options=CalibrateOptions(target=target))
    (note,) = report.calibration
    assert note["target"] == target


def test_which_add_is_the_residual_stream() -> None:
    def index_of(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray] | None = None, outputs=("z",)) -> GraphIndex:
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "r")],
                                  [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2]) for o in outputs],
                                  [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
        return GraphIndex.build(graph)

    add = helper.make_node
    assert _residual_operand(index_of([add("Add", ["a", "r"], ["z"])]), "a") == "r"
    assert _residual_operand(index_of([add("Add", ["r", "a"], ["z"])]), "a") == "r"  # either operand order
    assert _residual_operand(index_of([add("Add", ["a", "r"], ["z"], domain="ai.onnx")]), "a") == "r"
    assert _residual_operand(index_of([add("Add", ["a", "a"], ["z"])]), "a") is None  # doubling, no other stream
    assert _residual_operand(index_of([add("Mul", ["a", "r"], ["z"])]), "a") is None
    assert _residual_operand(index_of([add("Add", ["a", "r"], ["z"], domain="com.example")]), "a") is None
    assert _residual_operand(index_of([add("Add", ["a", "c"], ["z"])], {"c": np.ones(2, np.float32)}), "a") is None
    constant = add("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32)))
    assert _residual_operand(index_of([constant, add("Add", ["a", "c"], ["z"])]), "a") is None
    two_readers = [add("Add", ["a", "r"], ["z"]), add("Relu", ["a"], ["q"])]
    assert _residual_operand(index_of(two_readers, outputs=("z", "q")), "a") is None
    assert _residual_operand(index_of([add("Add", ["a", "r"], ["z"])], outputs=("z", "a")), "a") is None  # a graph output


def test_block_refit_trains_the_first_layer_with_the_pattern_kept() -> None:
    model = mlp_model(d=D, h=H, o=O, seed=3)
    x = np.random.default_rng(6).standard_normal((500, D)).astype(np.float32)
    kw = {"alpha": 2, "seed": 1, "prune_by": "magnitude", "split": "random"}  # W1' as the bare expansion's
    w2_only, _ = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(holdout=0.0), **kw)
    block, report = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(
        holdout=0.0, refit="block", block_steps=60, block_lr=1e-3, block_rows=300), **kw)
    (note,) = report.calibration
    assert note["refit"] == "block" and note["block_mse"] is not None
    assert note["block_mse"][-1] < note["block_mse"][0]  # the reconstruction trained
    w1_a, _, w2_a, _ = block_weights(w2_only)
    w1_b, _, w2_b, _ = block_weights(block)
    np.testing.assert_array_equal(w1_b != 0, w1_a != 0)  # same pattern, first and second layer
    np.testing.assert_array_equal(w2_b != 0, w2_a != 0)
    assert not np.array_equal(w1_b, w1_a)  # the first layer was trained too
    target = run_model(model, {"x": x})[0]
    rmse = float(np.sqrt(np.mean((run_model(block, {"x": x})[0] - target) ** 2)))
    assert rmse == pytest.approx(note["rmse_after"], rel=1e-2)  # the report states the written model's error


def conv_residual_mlp(blocks: int = 2, c: int = 6) -> onnx.ModelProto:
    """``x = x + conv2(relu(conv1(x)))`` ``blocks`` times on NCHW tensors: 1x1 convolutions read their
    features on axis 1, and the second block's residual stream carries the first block's drift."""
    rng = np.random.default_rng(9)
    nodes, inits, stream = [], [], "x"
    for i in range(blocks):
        for name, shape in ((f"w{i}a", (2 * c, c, 1, 1)), (f"w{i}b", (c, 2 * c, 1, 1))):
            inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32), name))
        inits += [numpy_helper.from_array(rng.standard_normal(2 * c).astype(np.float32), f"b{i}a"),
                  numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), f"b{i}b")]
        nodes += [helper.make_node("Conv", [stream, f"w{i}a", f"b{i}a"], [f"a{i}"], name=f"conv{i}a"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
                  helper.make_node("Conv", [f"r{i}", f"w{i}b", f"b{i}b"], [f"f{i}"], name=f"conv{i}b"),
                  helper.make_node("Add", [stream, f"f{i}"], [f"s{i}"], name=f"residual{i}")]
        stream = f"s{i}"
    nodes.append(helper.make_node("Identity", [stream], ["y"]))
    spatial = ["N", c, 5, 3]  # width 3 != channels: a tensor read along the wrong axis comes out scrambled
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, spatial)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, spatial)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_blocks_are_fit_along_their_channel_axis_with_the_residual_drift() -> None:
    model = conv_residual_mlp()
    x = np.random.default_rng(10).standard_normal((60, 6, 5, 3)).astype(np.float32)
    target = run_model(model, {"x": x})[0]
    kw = {"alpha": 2, "seed": 0, "prune_by": "magnitude", "split": "random"}  # W1' as the bare expansion's
    bare, _ = expand(model, **kw)
    calibrated, report = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(holdout=0.0), **kw)
    assert [n["target"] for n in report.calibration] == ["residual", "residual"]

    def rmse(m: onnx.ModelProto) -> float:
        return float(np.sqrt(np.mean((run_model(m, {"x": x})[0] - target) ** 2)))

    # the last block's fit target is the model's output (its residual Add), so the report is the model's error
    assert rmse(calibrated) == pytest.approx(report.calibration[-1]["rmse_after"], rel=1e-2)
    assert rmse(calibrated) < 0.5 * rmse(bare)


def test_a_residual_operand_not_yet_computed_falls_back_to_the_output_target() -> None:
    """The Add's other operand is computed between the block's first and second linear (node order), so
    the expanded model's run, stopped before the block, does not have it: the block fits its own output."""
    model = residual_mlp()
    nodes = list(model.graph.node)
    side = helper.make_node("Neg", ["x"], ["side"], name="side")
    nodes.insert(1, side)  # fc1, side, relu, fc2, add
    nodes[-1] = helper.make_node("Add", ["f", "side"], ["y"], name="residual")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(5).standard_normal((300, D)).astype(np.float32)
    _, report = expand(model, alpha=2, calibrate={"x": x})
    (note,) = report.calibration
    assert note["target"] == "output"


def test_held_out_errors_are_the_models_own_on_the_held_out_samples() -> None:
    """Several held-out chunks (every fifth sample, 40 rows per chunk): the errors before and after are the
    bare and the calibrated model's real RMSE on exactly those samples, and the CPU parts lie within the
    call's own CPU time."""
    import time

    from neurorewrite.passes.sample_chunks import holdout_indices

    model = mlp_model(d=D, h=H, o=O, seed=3)
    x = np.random.default_rng(11).standard_normal((500, D)).astype(np.float32)
    kw = {"alpha": 2, "seed": 1, "prune_by": "magnitude", "split": "random"}  # W1' as the bare expansion's
    bare, _ = expand(model, **kw)
    tick, wall_tick = time.process_time(), time.perf_counter()
    calibrated, report = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(chunk_rows=40), **kw)
    spent, wall = time.process_time() - tick, time.perf_counter() - wall_tick
    (note,) = report.calibration
    held = sorted(holdout_indices(len(x), 0.2))
    assert note["holdout_rows"] == len(held) == 100 and note["rows"] == 400
    target = run_model(model, {"x": x[held]})[0]

    def rmse(m: onnx.ModelProto) -> float:
        return float(np.sqrt(np.mean((run_model(m, {"x": x[held]})[0] - target) ** 2)))

    assert note["holdout_rmse_before"] == pytest.approx(rmse(bare), rel=1e-3)
    assert note["holdout_rmse_after"] == pytest.approx(rmse(calibrated), rel=1e-2)
    assert all(isinstance(v, float) and v == round(v, 2) and 0 <= v <= spent + 0.01 for v in note["cpu_seconds"].values())
    assert set(note) == {"block", "layer", "rows", "holdout_rows", "width", "target", "refit", "support", "rmse_before", "rmse_after",
                         "holdout_rmse_before", "holdout_rmse_after", "solver", "iterations", "residual", "block_mse",
                         "seconds", "cpu_seconds", "first", "first_layer", "constant_inputs", "shared_with"}
    assert note["shared_with"] == []
    assert (note["block"], note["layer"], note["solver"]) == ("fc1", "fc2", "cg")
    assert (note["first"], note["first_layer"]) == ("lead", "fc1")
    assert 0 < note["iterations"] <= CalibrateOptions().iterations and 0 <= note["residual"] < 1
    assert 0 <= note["seconds"] <= wall


def test_a_second_layer_without_bias_is_refit() -> None:
    model = mlp_model(d=D, h=H, o=O, seed=3, matmul=True, bias=False)
    x = np.random.default_rng(12).standard_normal((400, D)).astype(np.float32)
    _, report = expand(model, alpha=2, calibrate={"x": x}, prune_by="magnitude")
    (note,) = report.calibration
    assert note["holdout_rmse_after"] < note["holdout_rmse_before"] and note["first"] == "lead"


def test_a_conv_blocks_held_out_error_before_is_the_bare_models() -> None:
    from neurorewrite.passes.sample_chunks import holdout_indices

    model = conv_residual_mlp(blocks=1)
    x = np.random.default_rng(13).standard_normal((50, 6, 5, 3)).astype(np.float32)
    kw = {"alpha": 2, "seed": 0, "prune_by": "magnitude", "split": "random"}  # W1' as the bare expansion's
    bare, _ = expand(model, **kw)
    _, report = expand(model, calibrate={"x": x}, **kw)
    held = sorted(holdout_indices(len(x), 0.2))
    error = run_model(bare, {"x": x[held]})[0] - run_model(model, {"x": x[held]})[0]
    assert report.calibration[0]["holdout_rmse_before"] == pytest.approx(float(np.sqrt(np.mean(error ** 2))), rel=1e-3)


def test_two_fit_rows_are_enough_and_one_is_refused() -> None:
    from neurorewrite.errors import DataError

    model = mlp_model(d=D, h=H, o=O, seed=3)
    x = np.random.default_rng(14).standard_normal((3, D)).astype(np.float32)
    with pytest.warns(Warning, match=r"fc2 was fit on 2 rows for \d+ inputs"):
        _, report = expand(model, alpha=2, calibrate={"x": x}, calibrate_options=CalibrateOptions(holdout=0.34))
    assert (report.calibration[0]["rows"], report.calibration[0]["holdout_rows"]) == (2, 1)
    with pytest.raises(DataError) as caught:  # two samples, one held out: one row left to fit
        expand(model, alpha=2, calibrate={"x": x[:2]}, calibrate_options=CalibrateOptions(holdout=0.5))
    assert str(caught.value) == "the sample gives 1 row(s) to fit fc2; it needs at least 2"


def test_block_refit_of_a_conv_block_reads_its_inputs_by_channel_and_follows_the_seed() -> None:
    """The block-wise reconstruction trains on (input row, target row) pairs of a 1x1-conv block: read
    along the channel axis, they lower the real error below the W2-only refit's. Its shuffling follows
    ``seed``: the same seed gives the same model, another seed another one."""
    model = conv_residual_mlp(blocks=1)
    x = np.random.default_rng(10).standard_normal((60, 6, 5, 3)).astype(np.float32)
    target = run_model(model, {"x": x})[0]
    kw = {"alpha": 2, "seed": 0, "prune_by": "magnitude", "split": "random"}  # W1' as the bare expansion's

    def rmse(m: onnx.ModelProto) -> float:
        return float(np.sqrt(np.mean((run_model(m, {"x": x})[0] - target) ** 2)))

    def block(seed: int) -> onnx.ModelProto:
        options = CalibrateOptions(holdout=0.0, refit="block", block_steps=60, block_lr=1e-3, seed=seed)
        return expand(model, calibrate={"x": x}, calibrate_options=options, **kw)[0]

    w2_only, _ = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(holdout=0.0), **kw)
    first, again, other = block(5), block(5), block(0)
    assert rmse(first) < 0.98 * rmse(w2_only)
    for a, b in zip(block_weights(first), block_weights(again)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(block_weights(first)[0], block_weights(other)[0])


@pytest.mark.parametrize(("per", "max_iters", "expected"), [("child", None, 10), ("parent", None, 20), ("child", 3, 3)])
def test_cg_stops_after_the_iterations_its_refit_takes_by_default(per: str, max_iters: int | None, expected: int) -> None:
    """Unconverged (tol 0), the W2 refit runs exactly the default iterations of its mode, or the option's, and the
    report's summary says how many it took."""
    model = mlp_model(d=D, h=H, o=O, seed=5, matmul=True)
    x = np.random.default_rng(13).standard_normal((600, D)).astype(np.float32)
    options = CalibrateOptions(refit_per=per, max_iters=max_iters, tol=0.0, holdout=0.0)
    _, report = expand(model, alpha=2, calibrate={"x": x}, calibrate_options=options, prune_by="magnitude")
    assert [n["iterations"] for n in report.calibration] == [expected]
    assert report.calibration_summary["max_iters"] == expected and options.iterations == expected


def test_cg_iterations_below_one_are_refused() -> None:
    from neurorewrite.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="at least 1, got 0"):
        CalibrateOptions(max_iters=0)
