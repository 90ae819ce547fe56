"""Non-finite values: refused in samples with the array, row and column named; reported in weights;
never written by a command that introduced them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from neurorewrite.errors import DataError
from neurorewrite.rewriter.io import nonfinite_weights
from neurorewrite.sample import load_sample
from tests.attack.conftest import assert_one_line_error, cli, mlp_model, tree

BAD = st.sampled_from([np.nan, np.inf, -np.inf])


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 7), data=st.data(), bad=BAD)
def test_sample_with_a_non_finite_value_names_its_row_and_column(rows: int, cols: int, data: st.DataObject,
                                                                  bad: float) -> None:
    x = np.zeros((rows, cols), np.float32)
    r, c = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, cols - 1))
    x[r, c] = bad
    later = [(i, j) for i in range(rows) for j in range(cols) if (i, j) > (r, c)]
    for i, j in data.draw(st.lists(st.sampled_from(later), max_size=3, unique=True) if later else st.just([])):
        x[i, j] = np.nan
    with pytest.raises(DataError, match=rf"array x holds \d+ non-finite value\(s\), the first \({bad}\) at row {r}, column {c};"):
        load_sample({"x": x}, "--data")


@settings(max_examples=10, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=3, max_size=4), data=st.data())
def test_rank3_sample_names_the_row_and_the_position_within_it(shape: list[int], data: st.DataObject) -> None:
    x = np.ones(shape, np.float64)
    where = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    x[where] = np.inf
    with pytest.raises(DataError, match=rf"at row {where[0]}, column \({', '.join(map(str, where[1:]))},?\)"):
        load_sample({"x": x}, "--calibrate")


def test_string_and_object_samples_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dtype <U1; samples must hold numbers"):
        load_sample({"x": np.array(["a", "b"])}, "--calibrate")
    np.savez(tmp_path / "s.npz", x=np.array(["a"]))
    with pytest.raises(DataError, match="must hold numbers"):
        load_sample(tmp_path / "s.npz", "--data")


@pytest.mark.parametrize("command", ["expand", "finetune", "analyze"])
def test_cli_refuses_non_finite_data_before_writing(work: Path, command: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    x[5, 4] = np.nan
    np.savez(work / "bad.npz", x=x, y=rng.integers(0, 3, 16))
    argv = {"expand": ["expand", "m.onnx", "--alpha", "2", "--calibrate", "bad.npz", "-o", "o.onnx"],
            "finetune": ["finetune", "m.onnx", "--data", "bad.npz", "-o", "o.onnx"],
            "analyze": ["analyze", "m.onnx", "--data", "bad.npz"]}[command]
    before = tree(work)
    assert_one_line_error(cli(*argv, cwd=work), "bad.npz", "array x", "row 5, column 4")
    assert tree(work) == before


def _with_nan_weight(path: Path) -> None:
    model = mlp_model(d=6, h=8, o=3)
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[2, 3] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    onnx.save(model, str(path))


def test_nan_weights_are_reported_and_calibration_and_training_refused(work: Path) -> None:
    _with_nan_weight(work / "nan.onnx")
    run = cli("expand", "nan.onnx", "--alpha", "2", "-o", "o.onnx", cwd=work)
    assert run.code == 0
    import io as _io
    import contextlib

    from neurorewrite.cli import main

    err = _io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(_io.StringIO()):
        assert main(["inspect", str(work / "nan.onnx")]) == 0
    assert "warning: " in err.getvalue() and "fc1.w holds 1 NaN/infinite value(s)" in err.getvalue()
    assert nonfinite_weights(onnx.load(str(work / "o.onnx")))  # copies of the input's NaN, not new ones
    assert_one_line_error(cli("expand", "nan.onnx", "--alpha", "2", "--calibrate", "s.npz", "-o", "c.onnx", cwd=work),
                          "--calibrate", "fc1.w", "NaN")
    assert_one_line_error(cli("finetune", "nan.onnx", "--data", "t.npz", "-o", "f.onnx", cwd=work), "fc1.w", "training")
    assert not (work / "c.onnx").exists() and not (work / "f.onnx").exists()


def test_a_refit_that_overflows_is_never_written(work: Path) -> None:
    """Finite sample, finite weights, but the hidden layer overflows float32: the refit would be NaN."""
    model = mlp_model(d=6, h=8, o=3)
    for t in model.graph.initializer[:1]:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(1e38), t.name))
    onnx.save(model, str(work / "huge.onnx"))
    assert not nonfinite_weights(model)
    before = tree(work)
    line = assert_one_line_error(cli("expand", "huge.onnx", "--alpha", "2", "--calibrate", "s.npz", "-o", "o.onnx",
                                     cwd=work))
    assert "nothing was written" in line or "not finite" in line or "non-finite" in line, line
    assert tree(work) == before


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lr=st.sampled_from([1e30, 1e38]))
def test_training_that_diverges_is_never_written(work: Path, lr: float) -> None:
    before = tree(work)
    run = cli("finetune", "m.onnx", "--data", "t.npz", "--lr", lr, "--epochs", "3", "-o", "f.onnx", cwd=work)
    if run.code == 0:  # the optimizer may survive a huge step; then every written weight must be finite
        assert not nonfinite_weights(onnx.load(str(work / "f.onnx")))
        (work / "f.onnx").unlink()
    else:
        assert_one_line_error(run)
    assert tree(work) == before
