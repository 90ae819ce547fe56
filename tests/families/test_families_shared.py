"""ALBERT, built from its transformers config and exported: its layers run one shared FFN, which the
TorchScript exporter writes as Identity copies of one set of weights. Expanded once, both blocks read
the one expanded copy in every format, so the whole model keeps its nonzero count; calibration fits
the one set on both blocks' rows."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import neurorewrite
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.io import load_model
from neurorewrite.passes.prepare import prepare_for_runtime
from neurorewrite.runtime.ort import ort_session
from tests.conftest import run_model
from tests.families.hf import feeds


def initializer_nonzeros(model: onnx.ModelProto) -> int:
    return sum(int(np.count_nonzero(numpy_helper.to_array(t))) for t in model.graph.initializer)


@pytest.mark.parametrize("exporter", ["ts", "dynamo"])
def test_albert_shared_ffn_is_expanded_once_and_keeps_the_model_count(families, exporter: str) -> None:
    """TorchScript reads the shared weights through Identity copies; dynamo stores each use's transposed
    weight as an initializer of its own (equal values): expanded, both read one set."""
    path = families.path("albert", exporter)
    original = load_model(path)
    search = find_blocks(original)
    assert [(b.form, b.activation) for b in search.blocks] == [("mlp", "Gelu(tanh)")] * 2 and not search.skipped
    new, report = neurorewrite.expand(path, alpha=4, seed=0)
    onnx.checker.check_model(new, full_check=True)
    stored_twice = sum(int(np.count_nonzero(numpy_helper.to_array(t))) for t in original.graph.initializer
                       if t.name in {search.blocks[1].first.weight, search.blocks[1].second.weight})
    assert initializer_nonzeros(new) == initializer_nonzeros(original) - (stored_twice if exporter == "dynamo" else 0)
    assert all(b.nnz_after == b.nnz_before and b.width_after == 4 * b.width_before for b in report.blocks)
    assert all("reads the same weights as block(s)" in b.notes[-1] for b in report.blocks)
    first, second = find_blocks(new).blocks
    assert [lin.weight for lin in first.linears] == [lin.weight for lin in second.linears]
    assert first.first.bias == second.first.bias
    dense = run_model(new, feeds("albert"))[0]
    assert np.isfinite(dense).all()
    same, _ = neurorewrite.expand(path, alpha=1)
    np.testing.assert_allclose(run_model(same, feeds("albert"))[0], run_model(original, feeds("albert"))[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["sparse", "grouped"])
def test_albert_formats_store_the_shared_ffn_once(families, tmp_path, fmt: str) -> None:
    path = families.path("albert", "ts")
    split = {"split": "shared"} if fmt == "grouped" else {}
    dense, _ = neurorewrite.expand(path, alpha=4, seed=0, **split)
    out = tmp_path / f"albert.{fmt}.onnx"
    neurorewrite.expand(path, alpha=4, seed=0, format=fmt, output=out, **split)
    lowered = onnx.load(str(out))
    readers = [[i for i in n.input if i in {t.name for t in lowered.graph.initializer}]
               for n in lowered.graph.node if n.op_type in ("SparseLinear", "MatMul") and "/ffn" in n.name]
    halves = len(readers) // 2  # the first use's nodes, then the second's, in graph order
    assert halves and readers[:halves] == readers[halves:], "the second use reads the first use's tensors"
    got = ort_session(str(out)).run(None, feeds("albert"))[0]
    np.testing.assert_allclose(got, run_model(dense, feeds("albert"))[0], rtol=1e-4, atol=1e-5)


def test_albert_calibrates_its_shared_ffn_as_one_set(families) -> None:
    path = families.path("albert", "ts")
    sample = {"input_ids": np.random.default_rng(0).integers(0, 101, (64, 9)).astype(np.int64)}
    new, report = neurorewrite.expand(path, alpha=4, calibrate=sample)
    assert initializer_nonzeros(new) == initializer_nonzeros(load_model(path))
    first, second = find_blocks(new).blocks
    assert [lin.weight for lin in first.linears] == [lin.weight for lin in second.linears]
    (note,) = report.calibration
    assert note["shared_with"] == [first.name] and note["holdout_rmse_after"] < note["holdout_rmse_before"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "tvm"])
def test_the_runtime_preparation_keeps_one_copy_of_the_shared_ffn(families, tmp_path, runtime: str) -> None:
    """Densified (onnxruntime) or folded (TVM), the two uses of ALBERT's FFN read one set of constants:
    a copy per use would multiply the runtime's memory for the FFN by the number of layers."""
    path = families.path("albert", "ts")
    sample = {"input_ids": np.random.default_rng(0).integers(0, 101, (64, 9)).astype(np.int64)}
    out = tmp_path / "albert.sparse.onnx"
    neurorewrite.expand(path, alpha=4, calibrate=sample, format="sparse", output=out)
    prepared, _ = prepare_for_runtime(load_model(out), runtime)
    inits = {t.name for t in prepared.graph.initializer}
    ffn = [n for n in prepared.graph.node if "/ffn" in n.name and n.op_type in ("MatMul", "SparseLinear")]
    weights = [[i for i in n.input[1:] if i in inits] for n in ffn]
    assert len(ffn) >= 4 and all(weights)
    assert len({tuple(w) for w in weights}) == len(ffn) // 2, "each layer's constants once, read by both uses"
