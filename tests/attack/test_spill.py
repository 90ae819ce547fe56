"""Spilled tensors (the big-model path, forced here on small models): every pass, session and save
gives exactly what the in-protobuf path gives, and nothing of the spill outlives the process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import neurorewrite
import neurorewrite.external_data as external_data
import neurorewrite.external_data.spill as spill_files
from neurorewrite.rewriter.io import load_model
from neurorewrite.runtime import ort_session
from tests.attack.conftest import mlp_model

ROOT = Path(__file__).resolve().parents[2]
X = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)


def _expand(tmp_path: Path, tag: str, **options) -> tuple[np.ndarray, np.ndarray, onnx.ModelProto]:
    out = tmp_path / f"{tag}.onnx"
    new, _ = neurorewrite.expand(mlp_model(d=16, h=12, o=4), alpha=3, output=out, **options)
    return ort_session(out).run(None, {"x": X})[0], ort_session(new).run(None, {"x": X})[0], new


@pytest.mark.parametrize("options", [{"format": "dense"}, {"format": "sparse"}, {"structured": True},
                                     {"format": "dense", "calibrate": {"x": X}}, {"structured": True, "calibrate": {"x": X}}],
                         ids=["dense", "sparse", "structured", "calibrated", "structured-calibrated"])
def test_spilled_expansion_equals_the_in_memory_one(tmp_path: Path, monkeypatch, options: dict) -> None:
    kept, kept_session, kept_model = _expand(tmp_path, "kept", **options)
    assert not external_data.has_spilled(kept_model)
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 0)  # every new tensor goes to a spill file
    spilled, spilled_session, spilled_model = _expand(tmp_path, "spilled", **options)
    assert external_data.has_spilled(spilled_model)
    np.testing.assert_array_equal(spilled, kept)
    np.testing.assert_array_equal(spilled_session, kept_session)
    written = onnx.load(str(tmp_path / "spilled.onnx"), load_external_data=False)
    assert not external_data.has_spilled(written)  # the file on disk never names a spill file
    onnx.checker.check_model(str(tmp_path / "spilled.onnx"), full_check=True)


def test_api_without_output_returns_a_self_contained_model(monkeypatch) -> None:
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 0)
    new, _ = neurorewrite.expand(mlp_model(d=16, h=12, o=4), alpha=2)
    assert not external_data.has_spilled(new)
    onnx.checker.check_model(new, full_check=True)


def test_spilled_tensors_map_back_read_only_and_are_written_into_one_data_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 0)
    value = np.arange(1200, dtype=np.float32).reshape(2, 600).T  # not contiguous: written slab by slab
    t = external_data.make_tensor(value, "w")
    assert external_data.spilled(t)
    mapped = external_data.tensor_array(t)
    np.testing.assert_array_equal(mapped, value)
    assert not mapped.flags.writeable
    np.testing.assert_array_equal(np.concatenate(list(external_data.tensor_chunks(t, 500))), value.ravel())
    model = mlp_model(d=4, h=3, o=2)
    model.graph.initializer.append(t)
    with open(tmp_path / "d.bin", "wb") as data:
        header = external_data.write_split(model, data, "d.bin")
    assert external_data.locations(header) == ["d.bin"]
    inline = external_data.materialize(model)
    assert not external_data.has_spilled(inline)


def test_a_process_removes_its_spill_folder_and_a_killed_ones_is_removed_by_the_next(tmp_path: Path) -> None:
    code = f"""
import os, sys, signal
sys.path[:0] = [{str(ROOT)!r}]
import numpy as np
import neurorewrite.external_data as ed
import neurorewrite.external_data.spill
ed.spill.SPILL_THRESHOLD = 0
t = ed.make_tensor(np.ones(10, np.float32), "w")
print(os.path.dirname(dict((e.key, e.value) for e in t.external_data)["location"]), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    clean = subprocess.run([sys.executable, "-c", code, "exit"], capture_output=True, text=True, env=env, check=True)
    assert not Path(clean.stdout.strip()).exists()
    killed = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True, env=env)
    left = Path(killed.stdout.strip())
    assert killed.returncode == -9 and left.is_dir()
    subprocess.run([sys.executable, "-c", code, "exit"], capture_output=True, text=True, env=env, check=True)
    assert not left.exists()


def test_loading_a_written_spilled_model_gives_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 0)
    neurorewrite.expand(mlp_model(d=64, h=32, o=8), alpha=2, output=tmp_path / "o.onnx")
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 1 << 62)
    reference, _ = neurorewrite.expand(mlp_model(d=64, h=32, o=8), alpha=2)
    loaded = load_model(tmp_path / "o.onnx")
    by_name = {t.name: onnx.numpy_helper.to_array(t) for t in reference.graph.initializer}
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), by_name[t.name])


def test_loading_with_spill_keeps_big_external_tensors_out_of_protobuf(tmp_path: Path, monkeypatch) -> None:
    onnx.save(mlp_model(d=64, h=32, o=8), str(tmp_path / "e.onnx"), save_as_external_data=True,
              location="e.onnx.data", size_threshold=0)
    plain = load_model(tmp_path / "e.onnx")
    monkeypatch.setattr(spill_files, "SPILL_THRESHOLD", 1024)
    kept = load_model(tmp_path / "e.onnx", spill=True)
    assert sum(external_data.spilled(t) for t in kept.graph.initializer) == 2  # the two 8 KiB weights
    (tmp_path / "e.onnx.data").write_bytes(b"")  # the spilled copies are this process's own
    for a, b in zip(plain.graph.initializer, kept.graph.initializer):
        np.testing.assert_array_equal(external_data.tensor_array(b), onnx.numpy_helper.to_array(a))
    feeds = {"x": np.ones((2, 64), np.float32)}
    np.testing.assert_array_equal(ort_session(kept).run(None, feeds)[0], ort_session(plain).run(None, feeds)[0])
