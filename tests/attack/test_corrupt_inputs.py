"""Damaged files: truncated at random offsets and with random bytes flipped, for every command.

Each run either works (a flipped byte can leave a valid model) or is refused with exit 2 and one line
that names the file; no traceback, no "please report this", and a refused command writes nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.attack.conftest import assert_one_line_error, cli, mlp_model, tree

COMMANDS = {
    "inspect": ["inspect", "{m}"],
    "expand": ["expand", "{m}", "--alpha", "2", "-o", "out.onnx"],
    "calibrate": ["expand", "{m}", "--alpha", "2", "--calibrate", "{s}", "-o", "out.onnx"],
    "finetune": ["finetune", "{m}", "--data", "{t}", "--epochs", "1", "-o", "out.onnx"],
    "analyze": ["analyze", "{m}", "--data", "{s}"],
    "bench": ["bench", "{m}", "--batch", "1", "--repeats", "1"],
}
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def damage(data: bytes, draw: st.DataObject) -> bytes:
    """Truncated at a random offset, or 1-4 random bytes replaced."""
    if draw.draw(st.booleans(), label="truncate"):
        return data[: draw.draw(st.integers(0, len(data) - 1), label="offset")]
    out = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4), label="flips")):
        out[draw.draw(st.integers(0, len(out) - 1))] = draw.draw(st.integers(0, 255))
    return bytes(out)


def check(work: Path, command: str, **files: str) -> None:
    names = {"m": "m.onnx", "s": "s.npz", "t": "t.npz", **files}
    before = {k: v for k, v in tree(work).items() if not k.startswith("out.onnx")}
    run = cli(*[a.format(**names) for a in COMMANDS[command]], cwd=work)
    if run.code != 0:
        assert_one_line_error(run)
        assert {k: v for k, v in tree(work).items() if not k.startswith("out.onnx")} == before
    for p in work.glob("out.onnx*"):
        p.unlink()


@pytest.mark.parametrize("command", sorted(COMMANDS))
@SETTINGS
@given(draw=st.data())
def test_damaged_model_file(work: Path, command: str, draw: st.DataObject) -> None:
    (work / "bad.onnx").write_bytes(damage((work / "m.onnx").read_bytes(), draw))
    check(work, command, m="bad.onnx")


@pytest.mark.parametrize("command", ["inspect", "expand", "bench"])
@SETTINGS
@given(draw=st.data())
def test_damaged_external_data_or_header(work: Path, command: str, draw: st.DataObject) -> None:
    which = draw.draw(st.sampled_from(["e.onnx", "e.onnx.data"]), label="file")
    original = (work / which).read_bytes()
    try:
        (work / which).write_bytes(damage(original, draw))
        check(work, command, m="e.onnx")
    finally:
        (work / which).write_bytes(original)


@pytest.mark.parametrize("command", ["calibrate", "finetune", "analyze"])
@SETTINGS
@given(draw=st.data())
def test_damaged_sample_file(work: Path, command: str, draw: st.DataObject) -> None:
    (work / "bad.npz").write_bytes(damage((work / ("t.npz" if command == "finetune" else "s.npz")).read_bytes(), draw))
    check(work, command, s="bad.npz", t="bad.npz")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_things_that_are_not_models(work: Path, command: str) -> None:
    """A sample as the model, a folder, an empty file, a missing file, a model with a cycle."""
    (work / "empty.onnx").write_bytes(b"")
    (work / "folder.onnx").mkdir()
    cyclic = mlp_model(d=6, h=8, o=3)
    cyclic.graph.node[0].input[0] = cyclic.graph.node[-1].output[0]  # fc1 reads the graph's output
    (work / "cyclic.onnx").write_bytes(cyclic.SerializeToString())
    for name in ("s.npz", "folder.onnx", "empty.onnx", "missing.onnx", "cyclic.onnx"):
        run = cli(*[a.format(m=name, s="s.npz", t="t.npz") for a in COMMANDS[command]], cwd=work)
        assert_one_line_error(run, name)


def test_bench_refuses_input_types_it_cannot_feed(work: Path) -> None:
    model = mlp_model(d=6, h=8, o=3)
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    cast = onnx.helper.make_node("Cast", ["xb"], ["x"], to=onnx.TensorProto.FLOAT)
    model.graph.input[0].name = "xb"
    model.graph.node.insert(0, cast)
    (work / "bf16.onnx").write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(work / "bf16.onnx"))
    assert_one_line_error(cli("bench", "bf16.onnx", "--repeats", "1", cwd=work), "bf16.onnx", "bfloat16")
    x = np.zeros((2, 6), np.float32)
    assert cli("bench", "m.onnx", "--repeats", "1", "--batch", "1", cwd=work).code == 0
    assert x.shape == (2, 6)


@pytest.mark.parametrize("elem_type", [0, onnx.TensorProto.STRING], ids=["undefined", "string"])
@pytest.mark.parametrize("command", ["calibrate", "finetune", "analyze"])
def test_an_input_without_a_numeric_element_type_is_one_line(work: Path, command: str, elem_type: int) -> None:
    """Found by test_damaged_model_file: one byte set to 0 (or 8) makes the input's element type UNDEFINED
    (or STRING), which the ONNX checker accepts; the sample's conversion then failed with an internal error."""
    model = onnx.load(str(work / "m.onnx"))
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    onnx.save(model, str(work / "bad.onnx"))
    check(work, command, m="bad.onnx")


@pytest.mark.parametrize("command", ["calibrate", "finetune", "analyze"])
def test_an_input_whose_type_does_not_fit_its_nodes_is_one_line(work: Path, command: str) -> None:
    """Also found by test_damaged_model_file: a byte flip made the float input uint8 (the plain ONNX
    checker does not check the Gemm's type constraint); running the sample through it failed inside torch."""
    model = onnx.load(str(work / "m.onnx"))
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8
    onnx.save(model, str(work / "bad.onnx"))
    check(work, command, m="bad.onnx")


@pytest.mark.parametrize("command", ["inspect", "expand", "calibrate"])
def test_an_external_data_name_with_a_nul_byte_is_one_line(work: Path, command: str) -> None:
    """Found by test_damaged_external_data_or_header: a flipped byte put a NUL into the data file's name,
    and the check that no output overwrites an input failed on it (ValueError: embedded null byte)."""
    header = onnx.load(str(work / "e.onnx"), load_external_data=False)
    for t in header.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "e.onnx\x00data"
    onnx.save(header, str(work / "nul.onnx"))
    check(work, command, m="nul.onnx")
