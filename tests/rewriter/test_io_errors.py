"""rewriter/io's refusals, one deterministic case each, with the whole one-line message a user sees.

The property-based attack tests (tests/attack) reach these paths by random damage, a different set on
every run; here each external-data rule, each damaged-text case and each load default is pinned down on
its own, so a changed rule or a garbled message fails the same test every time.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from neurorewrite.errors import ModelLoadError
from neurorewrite.external_data import folder_lock
from neurorewrite.rewriter import io
from neurorewrite.rewriter.io import check_data_files, check_model_file, load_model, read_header, save_model
from tests.builders import mlp_model

W_BYTES = 24  # the external tensor below: float32 [2, 3]


def header_with(entries: dict[str, str], inline_first: bool = False, second: dict[str, str] | None = None) -> onnx.ModelProto:
    """A model header whose initializer ``w`` (float32 [2, 3]) is external with the given entries (and,
    optionally, a second external tensor ``v`` of the same shape, and an inline tensor before both)."""
    tensors = []
    if inline_first:
        tensors.append(onnx.numpy_helper.from_array(np.ones(3, np.float32), "inline"))
    for name, info in (("w", entries), ("v", second)):
        if info is None:
            continue
        t = TensorProto(name=name, dims=[2, 3], data_type=TensorProto.FLOAT, data_location=TensorProto.EXTERNAL)
        for key, value in info.items():
            t.external_data.add(key=key, value=value)
        tensors.append(t)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def refusal(header: onnx.ModelProto, path: Path) -> str:
    with pytest.raises(ModelLoadError) as caught:
        check_data_files(header, path)
    return str(caught.value)


def test_external_data_outside_the_folder_or_not_a_name_is_refused(tmp_path: Path) -> None:
    m = tmp_path / "m.onnx"
    assert refusal(header_with({"location": "a\x00b"}), m) == (
        f"{m}: tensor w names external data 'a\\x00b', which is not a file name; is the file damaged?")
    for location in ("", "/etc/passwd", "../w.data", "sub/../../w.data"):
        assert refusal(header_with({"location": location}), m) == (
            f"{m}: tensor w names external data {location!r} outside the model's folder")
    # no location entry at all is the empty name
    assert refusal(header_with({"offset": "0"}), m) == f"{m}: tensor w names external data '' outside the model's folder"


def test_a_missing_data_file_and_a_folder_in_its_place(tmp_path: Path) -> None:
    m = tmp_path / "m.onnx"
    assert refusal(header_with({"location": "w.data"}), m) == (
        f"{m}: its external data file {tmp_path / 'w.data'} is missing (tensor w); copy the model together with its data file")
    (tmp_path / "w.data").mkdir()
    assert refusal(header_with({"location": "w.data"}), m) == (
        f"{m}: its external data file {tmp_path / 'w.data'} is not a file (tensor w); copy the model together with its data file")


def test_inline_tensors_before_an_external_one_do_not_end_the_check(tmp_path: Path) -> None:
    assert "w.data is missing" in refusal(header_with({"location": "w.data"}, inline_first=True), tmp_path / "m.onnx")


def test_offset_and_length_default_and_must_fit(tmp_path: Path) -> None:
    m = tmp_path / "m.onnx"
    (tmp_path / "w.data").write_bytes(bytes(W_BYTES))
    check_data_files(header_with({"location": "w.data"}), m)  # no offset (0), no length: exactly the file
    check_data_files(header_with({"location": "w.data", "offset": "0", "length": str(W_BYTES)}), m)
    assert refusal(header_with({"location": "w.data", "offset": "4"}), m) == (
        f"{m}: its external data file {tmp_path / 'w.data'} is truncated ({W_BYTES} bytes; tensor w needs {W_BYTES + 4})")
    assert refusal(header_with({"location": "w.data", "length": "20"}), m) == (
        f"{m}: tensor w has shape [2, 3] ({W_BYTES} bytes) but its external data entry says offset 0, length 20; "
        "is the file damaged?")
    assert refusal(header_with({"location": "w.data", "offset": "-4", "length": str(W_BYTES)}), m) == (
        f"{m}: tensor w has shape [2, 3] ({W_BYTES} bytes) but its external data entry says offset -4, length {W_BYTES}; "
        "is the file damaged?")
    for bad in ({"offset": "four"}, {"length": "1e3"}):
        assert refusal(header_with({"location": "w.data", **bad}), m) == (
            f"{m}: tensor w has a malformed type, offset or length")


def test_two_tensors_in_one_file_are_each_checked_against_its_size(tmp_path: Path) -> None:
    m = tmp_path / "m.onnx"
    (tmp_path / "w.data").write_bytes(bytes(2 * W_BYTES))
    w, v = {"location": "w.data"}, {"location": "w.data", "offset": str(W_BYTES)}
    check_data_files(header_with(w, second=v), m)
    assert refusal(header_with(w, second={"location": "w.data", "offset": str(W_BYTES + 1)}), m) == (
        f"{m}: its external data file {tmp_path / 'w.data'} is truncated ({2 * W_BYTES} bytes; tensor v needs {2 * W_BYTES + 1})")


def test_a_negative_dimension_is_a_malformed_entry(tmp_path: Path) -> None:
    header = header_with({"location": "w.data"})
    header.graph.initializer[0].dims[0] = -2
    (tmp_path / "w.data").write_bytes(bytes(W_BYTES))
    assert refusal(header, tmp_path / "m.onnx") == f"{tmp_path / 'm.onnx'}: tensor w has a malformed type, offset or length"


def damaged_text(model: onnx.ModelProto, marker: str, path: Path) -> Path:
    """Write ``model`` with the text ``marker`` replaced in place by bytes that are not UTF-8 (same length,
    so the protobuf stays well formed: only the text is damaged)."""
    raw = model.SerializeToString()
    assert raw.count(marker.encode()) == 1
    path.write_bytes(raw.replace(marker.encode(), b"\xff\xfe" + marker.encode()[2:]))
    return path


def test_damaged_text_is_named_by_field_and_message(tmp_path: Path) -> None:
    model = mlp_model()
    model.producer_name = "PRODUCER"
    path = damaged_text(model, "PRODUCER", tmp_path / "a.onnx")
    with pytest.raises(ModelLoadError) as caught:
        check_model_file(path)
    assert str(caught.value) == f"{path}: the producer_name of a model is not valid UTF-8 text; is the file damaged?"
    # a field after an unset message field of the same tensor (TensorProto's segment) is still read
    model = mlp_model()
    model.graph.initializer[0].doc_string = "TENSORDOC"
    path = damaged_text(model, "TENSORDOC", tmp_path / "b.onnx")
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    assert str(caught.value) == f"{path}: the doc_string of a TensorProto is not valid UTF-8 text; is the file damaged?"


def test_check_model_file_checks_by_default_without_strict_inference(tmp_path: Path) -> None:
    from tests.rewriter.test_io_checks import misfit_gemm, undefined_input

    bad = tmp_path / "bad.onnx"
    onnx.save(undefined_input(mlp_model()), str(bad))
    with pytest.raises(ModelLoadError, match=f"^{re.escape(str(bad))}: the ONNX checker rejects this model: .*nowhere"):
        check_model_file(bad)
    check_model_file(bad, check=False)
    misfit = tmp_path / "misfit.onnx"
    onnx.save(misfit_gemm(), str(misfit))
    check_model_file(misfit)
    load_model(misfit)
    for refuse in (lambda: check_model_file(misfit, full_check=True), lambda: load_model(misfit, full_check=True)):
        with pytest.raises(ModelLoadError, match=f"^{re.escape(str(misfit))}: the ONNX checker rejects"):
            refuse()


def test_a_file_without_a_graph_and_a_graph_without_outputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")  # parses as an empty ModelProto
    with pytest.raises(ModelLoadError) as caught:
        check_model_file(empty)
    assert str(caught.value) == f"{empty}: not an ONNX model (no graph found); is the file complete?"
    no_outputs = mlp_model()
    del no_outputs.graph.output[:]
    path = tmp_path / "no_outputs.onnx"
    onnx.save(no_outputs, str(path))
    assert len(check_model_file(path).graph.node) == len(no_outputs.graph.node)  # nodes but no outputs: a graph (the checker takes it)


def test_read_header_names_what_is_wrong_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        read_header(tmp_path / "none.onnx")
    assert str(caught.value) == f"{tmp_path / 'none.onnx'}: no such file"
    with pytest.raises(ModelLoadError) as caught:
        read_header(tmp_path)
    assert str(caught.value) == f"{tmp_path}: not a file"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")  # a length prefix far past the end
    with pytest.raises(ModelLoadError) as caught:
        read_header(garbage)
    message = str(caught.value)
    assert message.startswith(f"{garbage}: not a readable ONNX model (") and message.endswith("); is the file complete?")
    reason = message[len(f"{garbage}: not a readable ONNX model ("):-len("); is the file complete?")]
    assert reason and reason != "None"  # onnx's own reason


def test_a_data_file_onnx_refuses_to_read_is_one_line_naming_the_model(tmp_path: Path) -> None:
    """A symbolic link passes the size checks; onnx refuses to read through it. Unchecked loading must
    still turn that into the model's own error."""
    folder, elsewhere = tmp_path / "m", tmp_path / "o"
    folder.mkdir()
    elsewhere.mkdir()
    path = folder / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    (data,) = [f for f in folder.iterdir() if f.name != "m.onnx"]
    os.replace(data, elsewhere / data.name)
    os.symlink(elsewhere / data.name, data)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, check=False)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read its external data (") and "symbolic link" in message


def test_a_tensor_exactly_at_the_spill_threshold_is_spilled(tmp_path: Path, monkeypatch) -> None:
    import neurorewrite.external_data.spill as spill_files
    from neurorewrite.external_data import spilled

    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    sizes = {t.name: io._declared_bytes(t) for t in read_header(path).graph.initializer if t.data_location == TensorProto.EXTERNAL}
    name, size = max(sizes.items(), key=lambda kv: kv[1])
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", size)
    model = load_model(path, spill=True)
    assert {t.name for t in model.graph.initializer if spilled(t)} == {n for n, s in sizes.items() if s >= size} == {name}


def test_a_file_model_with_nan_weights_is_named_in_the_warning(tmp_path: Path) -> None:
    model = mlp_model()
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w.flat[0] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, model.graph.initializer[0].name))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.warns(Warning, match=f"^{re.escape(str(path))}: weight {model.graph.initializer[0].name} holds 1 NaN"):
        load_model(path)


def test_loading_takes_a_shared_lock_so_readers_do_not_wait_for_each_other(tmp_path: Path) -> None:
    """Another reader holds the folder's shared lock: loading must not queue behind it (an exclusive
    lock would wait until that reader is done)."""
    path = tmp_path / "m.onnx"
    save_model(mlp_model(d=32, h=64, o=8), path, external_data=True)
    done = threading.Event()
    with folder_lock(tmp_path, shared=True):
        loader = threading.Thread(target=lambda: (load_model(path), done.set()), daemon=True)
        loader.start()
        loaded_while_held = done.wait(timeout=30)
    loader.join(timeout=60)
    assert loaded_while_held
