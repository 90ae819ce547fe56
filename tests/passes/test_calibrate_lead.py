"""``--first-layer lead`` (the default under ``--calibrate``): each parent's lead child is refit, in the
written model, to the least-squares fit of the parent's whole pre-activation on the sample; nothing
else in W1' changes, the count holds, and blocks the refit does not apply to keep W1' as expanded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.fpe.lead import lead_children
from neurorewrite.passes.calibrate import CalibrateOptions
from tests.builders import mlp_model
from tests.passes.test_calibrate_options import block_weights
from tests.passes.test_expand_inputs import D as GD
from tests.passes.test_expand_inputs import gated_model, gated_weights

D, H, O, ALPHA = 6, 8, 3, 3
KW = {"alpha": ALPHA, "seed": 1, "prune_by": "magnitude", "split": "random"}  # W1' as the bare expansion's


def correlated(n: int, d: int = D, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) * 0.7 + np.eye(d)
    return (rng.standard_normal((n, d)) @ mixing + 0.5).astype(np.float32)


def nonzeros(model: onnx.ModelProto) -> int:
    return sum(int(np.count_nonzero(onnx.numpy_helper.to_array(t))) for t in model.graph.initializer)


def test_the_written_lead_rows_are_the_least_squares_fit_of_their_parents() -> None:
    model = mlp_model(d=D, h=H, o=O, seed=3)
    x = correlated(600)
    bare, _ = expand(model, **KW)
    calibrated, report = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(holdout=0.0, ridge=1e-9), **KW)
    w1, b1, _, _ = block_weights(model)
    w1e, b1e, _, _ = block_weights(bare)
    w1c, b1c, _, _ = block_weights(calibrated)
    leads = lead_children(w1e, ALPHA, np.sqrt((x.astype(np.float64) ** 2).mean(axis=0)))
    z = x.astype(np.float64) @ w1.T + b1
    for parent, row in enumerate(leads):
        support = np.flatnonzero(w1e[row])
        a = np.column_stack([x[:, support].astype(np.float64), np.ones(len(x))])
        want = np.linalg.lstsq(a, z[:, parent], rcond=None)[0]
        np.testing.assert_allclose(w1c[row, support], want[:-1], rtol=1e-3, atol=1e-4)
        assert b1c[row] == pytest.approx(want[-1], rel=1e-3, abs=1e-4)
    others = np.setdiff1d(np.arange(len(w1e)), leads)
    np.testing.assert_array_equal(w1c[others], w1e[others])
    np.testing.assert_array_equal(b1c[others], b1e[others])
    np.testing.assert_array_equal(w1c != 0, w1e != 0)
    assert nonzeros(calibrated) == nonzeros(bare) == nonzeros(model)
    assert [(n["first"], n["first_layer"]) for n in report.calibration] == [("lead", "fc1")]


def test_the_lead_lowers_the_held_out_error_and_keep_leaves_w1_as_expanded() -> None:
    model = mlp_model(d=D, h=H, o=O, seed=3)
    x = correlated(1000, seed=1)
    bare, _ = expand(model, **KW)
    keep, keep_report = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(first="keep"), **KW)
    lead, lead_report = expand(model, calibrate={"x": x}, **KW)
    np.testing.assert_array_equal(block_weights(keep)[0], block_weights(bare)[0])
    (kept,), (led,) = keep_report.calibration, lead_report.calibration
    assert kept["first"] == "keep"
    assert kept["holdout_rmse_before"] == pytest.approx(led["holdout_rmse_before"])  # both the bare model's
    assert led["holdout_rmse_after"] < kept["holdout_rmse_after"]
    # with held-out rows the lead's fit rows have no bare error (it would cost a pass of the bare block)
    assert led["rmse_before"] is None and kept["rmse_before"] is not None


def test_per_parent_the_lead_is_an_option() -> None:
    """Per parent (the fast path for wide models) W1' stays as expanded unless the lead is asked for."""
    model = mlp_model(d=D, h=H, o=O, seed=3)
    x = correlated(500, seed=3)
    bare, _ = expand(model, **KW)
    plain, report = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(refit_per="parent"), **KW)
    assert [n["first"] for n in report.calibration] == ["keep"]
    np.testing.assert_array_equal(block_weights(plain)[0], block_weights(bare)[0])
    led, report = expand(model, calibrate={"x": x}, calibrate_options=CalibrateOptions(refit_per="parent", first="lead"),
                         **KW)
    assert [n["first"] for n in report.calibration] == ["lead"]
    assert not np.array_equal(block_weights(led)[0], block_weights(bare)[0])
    assert nonzeros(led) == nonzeros(model)


def test_gated_and_tied_blocks_keep_their_first_layer() -> None:
    w = gated_weights()
    x = correlated(300, d=GD, seed=2)
    model = gated_model(w, fused=False)
    bare, _ = expand(model, **KW)
    calibrated, report = expand(model, calibrate={"x": x}, **KW)
    assert [n["first"] for n in report.calibration] == ["keep"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in calibrated.graph.initializer}
    for t in bare.graph.initializer:  # gate and up as expanded
        if t.name in inits and onnx.numpy_helper.to_array(t).shape[0] == GD:
            np.testing.assert_array_equal(inits[t.name], onnx.numpy_helper.to_array(t))
    _, structured = expand(mlp_model(d=D, h=H, o=O, seed=3), alpha=ALPHA, structured=True, calibrate={"x": correlated(300)})
    assert [n["first"] for n in structured.calibration] == ["keep"]
