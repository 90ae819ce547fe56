"""rewriter/io's checks that whole-command tests pass over: the in-memory checker (directly, and through a
written copy for models too big to hand over), the message for non-finite weights, an empty external
tensor, and the data files a model names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from neurorewrite.errors import ModelLoadError
from neurorewrite.rewriter import io
from neurorewrite.rewriter.io import (
    check_in_memory,
    checkable_in_memory,
    load_model,
    model_files,
    nonfinite_message,
    nonfinite_weights,
    save_model,
)
from tests.builders import mlp_model


def undefined_input(model: onnx.ModelProto) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[0].input[0] = "nowhere"
    return bad


def misfit_gemm() -> onnx.ModelProto:
    """A Gemm whose weight does not fit its input: only strict shape inference (full_check) sees it."""
    w = onnx.numpy_helper.from_array(np.ones((3, 5), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("through_a_file", [False, True])
def test_the_in_memory_check(monkeypatch, through_a_file: bool) -> None:
    good = mlp_model()
    if through_a_file:  # as for a model over the protobuf limit: checked through a written copy
        monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1)
    assert checkable_in_memory(good) is not through_a_file
    check_in_memory(good, full_check=True)
    with pytest.raises(ModelLoadError, match="^the label: the ONNX checker rejects this model"):
        check_in_memory(undefined_input(good), "the label")
    with pytest.raises(ModelLoadError, match="^<in-memory model>: the ONNX checker rejects this model: .*nowhere"):
        check_in_memory(undefined_input(good))  # the default label, and the checker's own reason
    check_in_memory(misfit_gemm())  # the plain checker does not infer shapes
    with pytest.raises(ModelLoadError, match="^the label: the ONNX checker rejects"):
        check_in_memory(misfit_gemm(), "the label", full_check=True)


def test_loading_an_in_memory_model_checks_it() -> None:
    good = mlp_model()
    assert load_model(good) is good
    with pytest.raises(ModelLoadError, match="^<in-memory model>: the ONNX checker rejects"):
        load_model(undefined_input(good))
    load_model(undefined_input(good), check=False)  # asked not to check
    with pytest.raises(ModelLoadError, match="<in-memory model>"):
        load_model(misfit_gemm(), full_check=True)


def test_the_non_finite_message_names_the_first_tensor_and_counts_the_others() -> None:
    assert nonfinite_message("m.onnx", [("fc1.weight", 3)]) == (
        "m.onnx: weight fc1.weight holds 3 NaN/infinite value(s); outputs that depend on it are not finite")
    assert nonfinite_message("m.onnx", [("a", 1), ("b", 2), ("c", 5)]) == (
        "m.onnx: weight a holds 1 NaN/infinite value(s) (and 2 more tensor(s)); outputs that depend on it are not finite")
    assert "(and 1 more tensor(s))" in nonfinite_message("m.onnx", [("a", 1), ("b", 2)])


def test_an_empty_external_tensor_loads(tmp_path: Path) -> None:
    """A zero-size initializer stored as external data (0 bytes at offset 0) is valid, not malformed."""
    empty = TensorProto(name="empty", dims=[0], data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "m.onnx.data"), ("offset", "0"), ("length", "0")):
        empty.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Concat", ["x", "empty"], ["y"], axis=0)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], [empty])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    (tmp_path / "m.onnx.data").write_bytes(b"")
    model = load_model(tmp_path / "m.onnx")
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).shape == (0,)


def test_model_files_lists_the_external_data(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)  # weights over the 1 KiB external threshold
    files = model_files(path, "the input")
    assert files[0] == ("the input", path)
    data = [f for _, f in files[1:]]
    assert data and all(f.is_file() and f.parent == tmp_path and f.name != "m.onnx" for f in data)
    assert model_files(tmp_path / "missing.onnx") == [("the model", tmp_path / "missing.onnx")]


def test_a_model_with_spilled_tensors_is_checked_through_a_written_copy(tmp_path: Path, monkeypatch) -> None:
    """Spilled tensors point at absolute paths, which the checker refuses in memory: the check must
    write the model out (and still find a real defect)."""
    import neurorewrite.external_data.spill as spill_files

    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 0)
    model = load_model(path, spill=True)
    assert not checkable_in_memory(model)
    check_in_memory(model, "spilled", full_check=True)
    with pytest.raises(ModelLoadError, match="^spilled: the ONNX checker rejects"):
        check_in_memory(undefined_input(model), "spilled")


def graph_with(initializers: list[TensorProto], constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(v)) for name, v in constants.items()]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in constants]
                              or [helper.make_tensor_value_info(initializers[0].name, TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_non_finite_weights_are_found_in_initializers_and_constants_by_name() -> None:
    clean = onnx.numpy_helper.from_array(np.ones(4, np.float32), "clean")
    bad = onnx.numpy_helper.from_array(np.array([np.nan, 1, np.inf, 2], np.float32), "bad")
    shape = onnx.numpy_helper.from_array(np.array([2, 2], np.int64), "shape")  # not a float: passed over
    model = graph_with([shape, clean, bad], {
        "c_ok": np.ones(3, np.float32),
        "c_bad": np.array([1, np.inf, np.nan], np.float32),  # named by its output: Constant tensors are unnamed
        "mask_fill": np.array(-np.inf, np.float32),  # the attention-mask idiom: a scalar infinity is fine
        "scalar_nan": np.array([np.nan], np.float32),  # a one-element NaN is not
    })
    assert nonfinite_weights(model) == [("bad", 2), ("c_bad", 2), ("scalar_nan", 1)]


def test_a_tensor_whose_data_does_not_fill_its_shape_is_a_damaged_file() -> None:
    short = onnx.numpy_helper.from_array(np.ones(4, np.float32), "short")
    short.raw_data = short.raw_data[:6]
    with pytest.raises(ModelLoadError, match=r"^m\.onnx: tensor short: its data does not match its type and shape \[4\]"):
        nonfinite_weights(graph_with([short], {}), "m.onnx")


def test_external_tensors_not_loaded_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    assert nonfinite_weights(io.read_header(path)) == []  # the header alone: nothing to read, nothing refused


def test_model_files_does_not_read_a_model_over_the_scan_limit(tmp_path: Path, monkeypatch) -> None:
    """Finding the data files reads the model's protobuf; a file over the limit (inline weights of
    GiBs) is listed alone rather than read whole."""
    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    assert len(model_files(path)) == 2
    monkeypatch.setattr(io, "HEADER_SCAN_LIMIT", path.stat().st_size - 1)
    assert model_files(path) == [("the model", path)]
    monkeypatch.setattr(io, "HEADER_SCAN_LIMIT", path.stat().st_size)  # at the limit: still read
    assert len(model_files(path)) == 2


def test_the_non_finite_warning_names_the_file_and_points_at_the_caller(tmp_path: Path) -> None:
    bad = onnx.numpy_helper.from_array(np.array([np.nan, 1.0], np.float32), "bad")
    model = graph_with([bad], {})
    with pytest.warns(Warning) as caught:
        io.warn_nonfinite(model, "m.onnx")
    (w,) = caught
    assert str(w.message).startswith("m.onnx: weight bad holds 1 NaN")
    onnx.save(model, str(tmp_path / "m.onnx"))
    with pytest.warns(Warning) as caught:
        load_model(tmp_path / "m.onnx", check=False)  # load_model -> warn_nonfinite -> warnings.warn
    where = Path(caught[0].filename).resolve()
    assert where != Path(io.__file__).resolve()  # not the line inside io that warns
    if where.name != "trampoline.py":  # mutmut's mutated copies put a frame of their own in between
        assert where == Path(__file__).resolve()  # the line that loaded it
    short = onnx.numpy_helper.from_array(np.ones(4, np.float32), "short")
    short.raw_data = short.raw_data[:6]
    with pytest.raises(ModelLoadError, match="^m.onnx: tensor short"):
        io.warn_nonfinite(graph_with([short], {}), "m.onnx")


def test_load_model_defaults_and_labels(tmp_path: Path, monkeypatch) -> None:
    import neurorewrite.external_data.spill as spill_files
    from neurorewrite.external_data import has_spilled

    load_model(misfit_gemm())  # no strict shape inference unless asked
    nan = graph_with([onnx.numpy_helper.from_array(np.array([np.nan, 1.0], np.float32), "bad")], {})
    with pytest.warns(Warning, match="^the model: weight bad holds 1 NaN"):
        load_model(nan, check=False)
    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 0)
    assert not has_spilled(load_model(path))  # spilled only when asked
    assert not io.uses_external_data(mlp_model())  # an inline model
    assert io.uses_external_data(io.read_header(path))


def test_the_scan_covers_every_tensor_and_every_chunk(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    header = io.read_header(path)  # its tensors are external and not loaded: passed over
    big = np.ones(1 << 24 | 7, np.float32)
    big[-1] = np.nan  # in the tensor's second chunk
    header.graph.initializer.append(onnx.numpy_helper.from_array(big, "late"))
    assert nonfinite_weights(header) == [("late", 1)]
    short = onnx.numpy_helper.from_array(np.ones(4, np.float32), "short")
    short.raw_data = short.raw_data[:6]
    with pytest.raises(ModelLoadError, match=r"^the model: tensor short: .*\(buffer size"):
        nonfinite_weights(graph_with([short], {}))  # the default label, and onnx's own reason
