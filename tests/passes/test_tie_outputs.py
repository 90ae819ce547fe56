"""The --structured preset: tied outgoing weights, exact stored count, dense-size graph, calibration keeps ties."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.record import read_record
from tests.conftest import run_model, sample_for


def _stored_nonzeros(model: onnx.ModelProto) -> int:
    return sum(int(np.count_nonzero(onnx.numpy_helper.to_array(t))) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


def _float_elements(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


@pytest.mark.parametrize("name", ["torchscript_gemm", "transformer"])
def test_structured_keeps_count_and_size(exports, name: str) -> None:
    original = onnx.load(str(exports[name]))
    model, report = expand(exports[name], alpha=4, structured=True)
    onnx.checker.check_model(model, full_check=True)
    record = read_record(model)
    assert record.structured and record.format == "grouped" and record.config.split == "blocks"
    assert all(row.kind in ("tied",) or row.kind.startswith("grouped") for row in record.lowered)
    # stored weights: exactly the original nonzero count, and no tensor bigger than the original's
    assert _stored_nonzeros(model) == _stored_nonzeros(original)
    # stored floats: the original's plus the (alpha - 1) * H hidden-bias copies (the dense format: 4x)
    hidden = report.blocks[0].width_before
    assert _float_elements(model) <= _float_elements(original) + 3 * hidden
    feeds = sample_for(exports[name], batch=3)
    y, = run_model(model, feeds)[:1]
    assert np.isfinite(y).all() and y.shape == run_model(exports[name], feeds)[0].shape


def test_structured_is_the_tied_function(exports) -> None:
    """Grouped+tied computes the dense expansion whose children all carry the parent's W2 column."""
    from neurorewrite.passes.tie_outputs import tie_outputs

    path = exports["transformer"]
    model, _ = expand(path, alpha=2, structured=True)
    dense, report = expand(path, alpha=2, split="blocks", prune="layer")
    tied, _ = tie_outputs(onnx.load(str(path)), dense, report)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Sum"] == 1 and sum(".child" in t.name for t in model.graph.initializer) == 2  # a MatMul per child
    feeds = sample_for(path, batch=3)
    want, got = run_model(tied, feeds)[0], run_model(model, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    assert not np.allclose(want, run_model(dense, feeds)[0])  # tying changed W2', so the test has teeth


def test_structured_calibration_keeps_ties_and_helps(exports) -> None:
    feeds = sample_for(exports["sklearn_mlp"], batch=200)
    bare, _ = expand(exports["sklearn_mlp"], alpha=4, structured=True)
    cal, report = expand(exports["sklearn_mlp"], alpha=4, structured=True, calibrate=feeds)
    assert report.calibration and report.calibration[0]["rmse_after"] <= report.calibration[0]["rmse_before"]
    assert _stored_nonzeros(cal) == _stored_nonzeros(bare)
    assert any(row.kind == "tied" for row in read_record(cal).lowered)


def test_structured_option_errors(exports) -> None:
    with pytest.raises(InvalidOptionError, match="--structured writes the grouped format"):
        expand(exports["torchscript_gemm"], alpha=2, structured=True, format="sparse")
    with pytest.raises(InvalidOptionError, match="--structured needs one input partition"):
        expand(exports["torchscript_gemm"], alpha=2, structured=True, split="groups", groups=[[0], [1]])
