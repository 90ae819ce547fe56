"""file_bytes (the benchmarks' "file vs original" column) counts the data file a model names."""

from __future__ import annotations

from neurorewrite.rewriter.io import save_model
from neurorewrite.runtime.bench import file_bytes
from tests.builders import mlp_model


def test_a_model_with_external_data_counts_its_uniquely_named_data_file(tmp_path) -> None:
    model = mlp_model(d=64, h=256, o=8)
    save_model(model, tmp_path / "inline.onnx")
    save_model(model, tmp_path / "split.onnx", external_data=True)
    (data,) = tmp_path.glob("split.onnx.*.data")  # save_model's unique name, not split.onnx.data
    inline, split = file_bytes(tmp_path / "inline.onnx"), file_bytes(tmp_path / "split.onnx")
    assert split == (tmp_path / "split.onnx").stat().st_size + data.stat().st_size
    assert abs(split - inline) < 0.05 * inline  # the same weights, stored either way
