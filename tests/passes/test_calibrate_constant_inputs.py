"""Calibration leaves the children the prune left without an input out of the W2 refit (their activation is
one value on every row; neurorewrite.fpe.constant_inputs): the calibrated model computes what the
full-width refit gives, on plain, bias-free and gated (separate and fused gate/up) blocks, keeps the
nonzero count, and declines the reduction where the second linear has no bias to take the shift."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from neurorewrite.api import expand
from neurorewrite.passes import calibrate
from neurorewrite.passes.calibrate import CalibrateOptions
from tests.builders import mlp_model
from tests.conftest import run_model
from tests.passes.test_calibrate_lead import correlated, nonzeros
from tests.passes.test_expand_inputs import D as GD
from tests.passes.test_expand_inputs import gated_model, gated_weights

MODELS = {
    "mlp": lambda: (mlp_model(d=6, h=8, o=3, seed=3), 6),
    "mlp-without-biases": lambda: (mlp_model(d=6, h=8, o=3, seed=3, matmul=True, bias=False), 6),
    "gated": lambda: (gated_model(gated_weights(), fused=False), GD),
    "gated-fused": lambda: (gated_model(gated_weights(), fused=True), GD),
}


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_reduced_refit_computes_what_the_full_width_one_does(name: str, solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the exact solver, the same model; with CG's default 10 iterations (whose relative residual
    no longer counts the constant columns' trivially met equations, so it may stop at another iterate of
    an ill-conditioned problem), the same held-out error to 1%."""
    model, d = MODELS[name]()
    x, probe = correlated(300, d=d, seed=2), correlated(50, d=d, seed=5)
    options = CalibrateOptions(solver=solver)
    reduced, report = expand(model, alpha=4, calibrate={"x": x}, calibrate_options=options)
    (note,) = report.calibration
    assert note["constant_inputs"] > 0 and note["support"] == "hessian"
    monkeypatch.setattr(calibrate, "_inputless", lambda *args: None)  # every input in the fit
    full, full_report = expand(model, alpha=4, calibrate={"x": x}, calibrate_options=options)
    assert full_report.calibration[0]["constant_inputs"] == 0
    assert nonzeros(reduced) == nonzeros(full) == nonzeros(model)
    assert note["holdout_rmse_after"] == pytest.approx(full_report.calibration[0]["holdout_rmse_after"], rel=1e-2)
    if solver == "exact":
        want = run_model(full, {"x": probe})[0]
        np.testing.assert_allclose(run_model(reduced, {"x": probe})[0], want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_a_second_linear_without_bias_keeps_its_nonzero_constant_inputs_in_the_fit() -> None:
    """relu(b1) of an inputless child is a nonzero constant; with b2 zero no row can take its shift."""
    model = mlp_model(d=6, h=8, o=3, seed=3, matmul=True)
    b2 = next(t for t in model.graph.initializer if t.name == "fc2.b")
    b2.CopyFrom(numpy_helper.from_array(np.zeros(3, np.float32), "fc2.b"))
    b1 = next(t for t in model.graph.initializer if t.name == "fc1.b")
    b1.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(b1)) + 0.5, "fc1.b"))  # relu(b1) > 0
    onnx.checker.check_model(model)
    _, report = expand(model, alpha=4, calibrate={"x": correlated(300, d=6, seed=2)})
    (note,) = report.calibration
    assert note["constant_inputs"] == 0 and note["holdout_rmse_after"] < note["holdout_rmse_before"]
