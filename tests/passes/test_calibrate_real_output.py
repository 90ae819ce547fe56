"""Calibration judged by the calibrated model itself: onnxruntime's output of the written model, not the
pass's own arithmetic, must show the error the report states (docs/methods.md 1.7)."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.api import expand
from neurorewrite.passes.calibrate import CalibrateOptions
from tests.conftest import run_model, sample_for


def rmse(model, feeds: dict[str, np.ndarray], reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((run_model(model, feeds)[0].astype(np.float64) - reference) ** 2)))


@pytest.mark.parametrize("name, options", [
    ("torchscript_gemm", {"structured": True}),  # tied: the fit is on each parent's summed children
    ("torchscript_gemm", {"split": "random"}),
    ("gelu_silu_chain", {"structured": True}),
    ("gelu_silu_chain", {"split": "random", "bias": "copy"}),
])
def test_the_written_model_has_the_reported_error(exports, name, options) -> None:
    """These models end in the refit linear, so the model's output IS the refit layer's output: the
    report's RMSE before and after must be onnxruntime's, and calibration must lower it."""
    path = exports[name]
    feeds = sample_for(path, batch=256, seed=1)
    reference = run_model(path, feeds)[0].astype(np.float64)
    bare, _ = expand(path, alpha=4, seed=2, **options)
    # magnitude prune (as the bare expansion) and no held-out rows, so "before" is the bare model on all rows
    calibrated, report = expand(path, alpha=4, seed=2, calibrate=feeds, prune_by="magnitude",
                                calibrate_options=CalibrateOptions(holdout=0.0), **options)
    (note,) = report.calibration
    before, after = rmse(bare, feeds, reference), rmse(calibrated, feeds, reference)
    assert before == pytest.approx(note["rmse_before"], rel=1e-3)
    assert after == pytest.approx(note["rmse_after"], rel=1e-2, abs=1e-5), "the report's RMSE is not the model's"
    # tied children have one outgoing weight per parent, so the structured fit wins back less
    assert after < (0.8 if options.get("structured") else 0.5) * before


def test_structured_calibration_generalises_to_new_inputs(exports) -> None:
    """On inputs the fit never saw, the calibrated structured model is still closer to the original."""
    path = exports["torchscript_gemm"]
    bare, _ = expand(path, alpha=4, structured=True)
    calibrated, _ = expand(path, alpha=4, structured=True, calibrate=sample_for(path, batch=256, seed=1))
    held_out = sample_for(path, batch=256, seed=9)
    reference = run_model(path, held_out)[0].astype(np.float64)
    assert rmse(calibrated, held_out, reference) < 0.8 * rmse(bare, held_out, reference)
