"""Compiled libraries: outputs that are inputs, a full disk, file modes, malformed sidecars, and
libraries damaged after compiling (truncated with a checksum that matches, changed under a loader)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

from neurorewrite.errors import ModelLoadError  # noqa: E402
from neurorewrite.runtime import load  # noqa: E402
from tests.attack.conftest import assert_one_line_error, cli, mlp_model, tree  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``w.so`` (an ONNX model with a library's name) compiled by default to ``w.so.so``, under umask 022."""
    folder = tmp_path_factory.mktemp("compiled")
    onnx.save(mlp_model(d=6, h=8, o=3), str(folder / "w.so"))
    old = os.umask(0o022)
    try:
        run = cli("compile", "w.so", "--shape", "x=2,6", cwd=folder)
    finally:
        os.umask(old)
    assert run.code == 0, run.err
    return folder


def test_default_output_of_a_model_named_like_a_library_is_beside_it(built: Path) -> None:
    onnx.checker.check_model(str(built / "w.so"))  # the input is still the model
    assert (built / "w.so.so").is_file() and (built / "w.so.so.json").is_file()
    assert load(built / "w.so.so")(np.ones((2, 6), np.float32))[0].shape == (2, 3)


def test_library_and_sidecar_get_normal_modes(built: Path) -> None:
    assert stat.S_IMODE((built / "w.so.so").stat().st_mode) == 0o755
    assert stat.S_IMODE((built / "w.so.so.json").stat().st_mode) == 0o644


@pytest.mark.parametrize("argv,needle", [
    (["compile", "m.onnx", "--shape", "x=2,6", "-o", "m.onnx"], "-o m.onnx is the same file as the model"),
    (["compile", "e.onnx", "--shape", "x=2,64", "-o", "e.onnx.data"], "external data"),
    (["compile", "lib.so.json", "--shape", "x=2,6", "-o", "lib.so"], "-o's description lib.so.json"),
    (["compile", "m.onnx", "--shape", "x=2,6", "--tune", "--trials", "1", "--database", "m.onnx"], "--database m.onnx"),
    (["compile", "m.onnx", "--shape", "x=2,6", "-o", "nofolder/m.so"], "does not exist"),
])
def test_compile_outputs_that_are_inputs_are_refused(work: Path, argv: list[str], needle: str) -> None:
    onnx.save(mlp_model(d=6, h=8, o=3), str(work / "lib.so.json"))
    before = tree(work)
    assert_one_line_error(cli(*argv, cwd=work), needle)
    assert tree(work) == before


@pytest.mark.slow  # a second full build in a fresh process
def test_compile_to_a_full_disk_is_one_line_and_leaves_nothing(work: Path, tmp_path_factory) -> None:
    """The linker writes the library; it is given a disk that takes 64 KiB (the issue's g++ errors)."""
    gxx = shutil.which("g++") or pytest.skip("no g++")
    wrapper = tmp_path_factory.mktemp("cc") / "full-disk-g++"
    wrapper.write_text(f'#!/bin/sh\nulimit -f 64\nexec {gxx} "$@"\n')
    wrapper.chmod(0o755)
    before = tree(work)
    proc = subprocess.run([sys.executable, "-m", "neurorewrite.cli", "compile", "m.onnx", "--shape", "x=2,6"],
                          cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "CXX": str(wrapper)})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "cannot write m.so" in lines[0], lines[0]
    assert sorted(p.name for p in work.iterdir()) == sorted(before)


SIDECARS = {
    "a JSON list": lambda m: [m],
    "no target": lambda m: {k: v for k, v in m.items() if k != "target"},
    "target not text": lambda m: {**m, "target": 7},
    "malformed target JSON": lambda m: {**m, "target": '{"kind": '},
    "inputs a list": lambda m: {**m, "inputs": ["x"]},
    "negative dim": lambda m: {**m, "inputs": {"x": [2, -6]}},
    "no checksum": lambda m: {k: v for k, v in m.items() if k != "sha256"},
    "checksum not hex": lambda m: {**m, "sha256": "z" * 64},
    "other format": lambda m: {**m, "format": 99},
    "outputs not names": lambda m: {**m, "outputs": [1]},
    "input type not numeric": lambda m: {**m, "input_types": {"x": "object"}},
    "input type for no input": lambda m: {**m, "input_types": {"ids": "int64"}},
}


@pytest.mark.parametrize("case", sorted(SIDECARS))
def test_every_malformed_sidecar_is_one_load_error(built: Path, tmp_path: Path, case: str) -> None:
    lib = tmp_path / "m.so"
    lib.write_bytes((built / "w.so.so").read_bytes())
    meta = json.loads((built / "w.so.so.json").read_text())
    (tmp_path / "m.so.json").write_text(json.dumps(SIDECARS[case](meta)))
    with pytest.raises(ModelLoadError) as info:
        load(lib)
    assert len(str(info.value).splitlines()) == 1 and "m.so" in str(info.value)
    (tmp_path / "m.so.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load(lib)


LOADER = """
import hashlib, json, sys
sys.path.insert(0, {root!r})
from neurorewrite.errors import ModelLoadError
from neurorewrite.runtime import load
lib = sys.argv[1]
whole = open(sys.argv[2], "rb").read()
for cut in map(int, sys.argv[3:]):
    open(lib, "wb").write(whole[:cut])
    meta = json.load(open(lib + ".json"))
    meta["sha256"] = hashlib.sha256(whole[:cut]).hexdigest()  # a checksum that matches the damage
    json.dump(meta, open(lib + ".json", "w"))
    try:
        load(lib)
        print(cut, "loaded", flush=True)
    except ModelLoadError as e:
        print(cut, "refused", str(e).splitlines()[0][:80], flush=True)
"""


@pytest.mark.slow  # a fresh process imports TVM for each example
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.floats(0.01, 0.99), min_size=6, max_size=12))
def test_truncated_library_with_a_matching_checksum_is_refused_not_a_crash(built: Path, tmp_path_factory, cuts) -> None:
    folder = tmp_path_factory.mktemp("truncated")
    whole = built / "w.so.so"
    size = whole.stat().st_size
    offsets = sorted({max(4, int(size * c)) for c in cuts})
    (folder / "t.so.json").write_text((built / "w.so.so.json").read_text())
    proc = subprocess.run([sys.executable, "-c", LOADER.format(root=str(ROOT)), str(folder / "t.so"), str(whole),
                           *map(str, offsets)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the loader died ({proc.returncode}): {proc.stderr[-1500:]}"
    results = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert sorted(map(int, results)) == offsets
    assert all(r.startswith("refused") for r in results.values()), results


def test_the_loaded_bytes_are_the_checked_bytes(built: Path, tmp_path: Path) -> None:
    """The loader maps a private copy of what it hashed: damaging the file afterwards cannot reach it."""
    lib = tmp_path / "m.so"
    lib.write_bytes((built / "w.so.so").read_bytes())
    (tmp_path / "m.so.json").write_text((built / "w.so.so.json").read_text())
    model = load(lib)
    lib.write_bytes(lib.read_bytes()[:1000])  # truncated under the loaded model: a mapped file would SIGBUS
    assert model(np.ones((2, 6), np.float32))[0].shape == (2, 3)
    flipped = bytearray((built / "w.so.so").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    lib.write_bytes(bytes(flipped))
    with pytest.raises(ModelLoadError, match="checksum"):
        load(lib)
