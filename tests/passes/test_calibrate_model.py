"""calibrate_model called as the Python API calls it: its defaults (untied, the ``--calibrate`` label in
messages), progress in block order then "writing", the record and summary it writes, the too-few-rows
warning at its exact threshold, the padding mask option, and the option checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.errors import DataError, InvalidOptionError
from neurorewrite.fpe import FPEConfig
from neurorewrite.passes.calibrate import CalibrateOptions, calibrate_model
from neurorewrite.passes.expand_blocks import expand_model
from neurorewrite.rewriter.record import read_record
from tests.builders import mlp_model
from tests.passes.test_calibrate_options import block_weights

D, H, O = 6, 8, 3


def test_defaults_progress_record_and_summary() -> None:
    model = mlp_model(d=D, h=H, o=O, seed=3)
    expanded, report = expand_model(model, FPEConfig(alpha=2, seed=1))
    x = np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)
    calls: list[tuple[int, int, str]] = []
    calibrated, out = calibrate_model(model, expanded, report, {"x": x}, progress=lambda *c: calls.append(c))
    assert calls == [(0, 1, "fc1"), (1, 1, "writing")]
    # untied by default: the per-child fit keeps every row's count exactly, on a support it chose again
    assert out.calibration[0]["support"] == "hessian"
    np.testing.assert_array_equal((block_weights(calibrated)[2] != 0).sum(axis=1), (block_weights(expanded)[2] != 0).sum(axis=1))
    assert not np.array_equal(block_weights(calibrated)[2] != 0, block_weights(expanded)[2] != 0)
    assert read_record(calibrated).calibrated == ("fc2",)
    assert read_record(expanded).calibrated == ()
    summary = out.calibration_summary
    assert {k: summary[k] for k in ("samples", "holdout_samples", "positions", "rows", "computed_positions", "mask_input")} == {
        "samples": 50, "holdout_samples": 10, "positions": 50, "rows": 50, "computed_positions": 50,
        "mask_input": None}  # the model has no attention_mask input: no padding mask was used
    # the options, with the defaults that depend on other options as they were taken (per child: lead, 10)
    taken = {**CalibrateOptions().__dict__, "first": "lead", "max_iters": 10}
    assert {k: summary[k] for k in CalibrateOptions().__dict__ if k != "mask_input"} == {
        k: v for k, v in taken.items() if k != "mask_input"}
    with pytest.raises(DataError, match=r"^--calibrate: input x expects shape \['\?', 6\]"):  # the default label
        calibrate_model(model, expanded, report, {"x": x[:, :5]})


def test_alpha_one_returns_the_expansion_and_its_report_untouched() -> None:
    model = mlp_model(d=D, h=H, o=O, seed=3)
    expanded, report = expand_model(model, FPEConfig(alpha=1))
    x = np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)
    same, out = calibrate_model(model, expanded, report, {"x": x})
    assert same is expanded and out is report


def test_the_too_few_rows_warning_starts_below_the_inputs_the_fit_has() -> None:
    """Per child the width is alpha * H = 16, less the children the prune left without an input (their
    activation is a constant, which the bias takes): as many fit rows as the rest are enough, one fewer is not."""
    model = mlp_model(d=D, h=H, o=O, seed=3)
    expanded, report = expand_model(model, FPEConfig(alpha=2, seed=1, prune="global"))
    fed = int((block_weights(expanded)[0] != 0).any(axis=1).sum())
    assert fed < 2 * H  # the global prune leaves some children without an input here
    rng = np.random.default_rng(1)
    options = CalibrateOptions(holdout=0.0)
    _, enough = calibrate_model(model, expanded, report, {"x": rng.standard_normal((fed, D)).astype(np.float32)}, options=options)
    assert enough.warnings == [] and enough.calibration[0]["constant_inputs"] == 2 * H - fed
    _, few = calibrate_model(model, expanded, report, {"x": rng.standard_normal((fed - 1, D)).astype(np.float32)},
                             options=options, where="s.npz")
    assert few.warnings == [f"s.npz: fc2 was fit on {fed - 1} rows for {fed} inputs; the fit is underdetermined (held-out "
                            f"error tells): give at least {fed} rows (sample positions that are not padding)"]


def token_mlp() -> onnx.ModelProto:
    """An FFN on (N, S, D) tokens whose output is zeroed at padding positions by the attention mask."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((D, H)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((H, O)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1], np.int64), "last")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="fc1"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["f"], name="fc2"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"]), helper.make_node("Mul", ["f", "m3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", D]),
                                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", O])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_padding_is_left_out_unless_the_mask_option_is_off() -> None:
    model = token_mlp()
    expanded, report = expand_model(model, FPEConfig(alpha=2, seed=1))
    rng = np.random.default_rng(3)
    n, s = 20, 7
    lengths = rng.integers(2, 5, n)  # at most 4 real tokens of 7: every chunk can be cut to 4 positions
    mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)
    sample = {"x": rng.standard_normal((n, s, D)).astype(np.float32), "attention_mask": mask}
    options = CalibrateOptions(holdout=0.0)
    _, masked = calibrate_model(model, expanded, report, sample, options=options)
    summary = masked.calibration_summary
    assert (summary["rows"], summary["positions"], summary["mask_input"]) == (int(mask.sum()), n * s, "attention_mask")
    assert summary["computed_positions"] == n * 4  # the padding after the longest sequence is cut, not computed
    assert masked.calibration[0]["rows"] == int(mask.sum())
    _, unmasked = calibrate_model(model, expanded, report, sample, options=CalibrateOptions(holdout=0.0, mask_input=None))
    assert unmasked.calibration[0]["rows"] == n * s and unmasked.calibration_summary["mask_input"] is None


@pytest.mark.parametrize("field, value, message", [
    ("refit", "all", "--refit must be one of w2, block, none, got 'all'"),
    ("target", "logits", "--target must be one of residual, output, got 'logits'"),
    ("solver", "lu", "--solver must be one of cg, exact, got 'lu'"),
    ("refit_per", "layer", "--refit-per must be one of child, parent, got 'layer'"),
    ("support", "wanda", "--support must be one of hessian, kept, got 'wanda'"),
    ("holdout", 1.0, "--holdout must be in [0, 1), got 1.0"),
    ("holdout", 1.5, "--holdout must be in [0, 1), got 1.5"),
    ("holdout", -0.1, "--holdout must be in [0, 1), got -0.1"),
])
def test_option_errors_name_the_option_and_the_choices(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        CalibrateOptions(**{field: value})
    assert str(caught.value) == message


def with_custom_op_before_the_block(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with an op torch cannot run (a custom domain) between the input and the first linear."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        node.input[:] = ["x_custom" if i == "x" else i for i in node.input]
    out.graph.node.insert(0, helper.make_node("Mystery", ["x"], ["x_custom"], domain="com.example", name="mystery"))
    out.opset_import.append(helper.make_opsetid("com.example", 1))
    return out


@pytest.mark.parametrize("which", ["original", "expanded"])
def test_a_model_that_cannot_be_lifted_is_named(which: str) -> None:
    from neurorewrite.errors import UnsupportedModelError

    model = mlp_model(d=D, h=H, o=O, seed=3)
    expanded, report = expand_model(model, FPEConfig(alpha=2, seed=1))
    if which == "original":
        model = with_custom_op_before_the_block(model)
    else:
        expanded = with_custom_op_before_the_block(expanded)
    x = np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)
    with pytest.raises(UnsupportedModelError, match=f"^the {which} model: cannot lift into torch: unsupported node.*mystery"):
        calibrate_model(model, expanded, report, {"x": x})


def test_hidden_activations_that_overflow_the_gram_are_a_data_error_naming_the_layer() -> None:
    """Finite inputs of 1e19 give finite activations whose squares overflow float32: the support choice
    refuses the Gram matrix (it would never factor) and says where and what to do."""
    model = mlp_model(d=D, h=H, o=O, seed=3)
    expanded, report = expand_model(model, FPEConfig(alpha=2, seed=1))
    x = 1e19 * np.random.default_rng(0).standard_normal((50, D)).astype(np.float32)
    with pytest.raises(DataError, match=r"^--calibrate: fc2: the sample's hidden activations overflow float32.*--support kept"):
        calibrate_model(model, expanded, report, {"x": x})
