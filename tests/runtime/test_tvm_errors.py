"""Bad input on the TVM path: each a NeurorewriteError naming the cause, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from neurorewrite.errors import DataError, InvalidOptionError, ModelLoadError  # noqa: E402
from neurorewrite.kernels.tuning import MANIFEST, open_database  # noqa: E402
from neurorewrite.runtime import compile, load  # noqa: E402
from neurorewrite.runtime.tvm_target import parse_target  # noqa: E402
from tests.runtime.tvm_models import masked, mlp  # noqa: E402


def _model(shape: list | None = None):  # noqa: ANN202
    rng = np.random.default_rng(0)
    return mlp(masked(rng, 16, 8, 0.5), np.zeros(16, np.float32), masked(rng, 4, 16, 0.5), np.zeros(4, np.float32),
               sparse=True, input_shape=shape)


def test_unknown_target_is_refused_and_nothing_written(tmp_path: Path) -> None:
    for bad in ("vulkan-ish", '{"kind": "nonsense"}', '{"kind": "llvm"'):
        with pytest.raises(InvalidOptionError, match="--target"):
            compile(_model([2, 8]), bad, output=tmp_path / "m.so")
    assert list(tmp_path.iterdir()) == []


def test_a_shape_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError, match="does not fit"):
        compile(_model(), "llvm", output=tmp_path / "m.so", shapes={"x": [2, 9]})
    with pytest.raises(InvalidOptionError, match="--kernel-choice"):
        compile(_model(), "llvm", output=tmp_path / "m.so", kernel_choice="guess")
    assert list(tmp_path.iterdir()) == []


def test_database_from_another_target_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "db"
    open_database(db, parse_target("cuda"))
    assert json.loads((db / MANIFEST).read_text())["target"]
    with pytest.raises(InvalidOptionError, match="tuned for target cuda"):
        compile(_model([2, 8]), "llvm", output=tmp_path / "m.so", tune=True, trials=1, database=db)
    assert not (tmp_path / "m.so").exists()


def test_corrupt_or_missing_library_is_a_load_error(tmp_path: Path) -> None:
    lib = tmp_path / "m.so"
    compile(_model([2, 8]), "llvm", output=lib)
    truncated = tmp_path / "t.so"
    truncated.write_bytes(lib.read_bytes()[:4000])
    (tmp_path / "t.so.json").write_text((tmp_path / "m.so.json").read_text())
    with pytest.raises(ModelLoadError, match="corrupt"):
        load(truncated)
    garbage = tmp_path / "g.so"
    garbage.write_bytes(b"not a library")
    with pytest.raises(ModelLoadError, match="not a compiled library"):
        load(garbage)
    with pytest.raises(ModelLoadError, match="no such"):
        load(tmp_path / "missing.so")


def test_wrong_input_shape_at_run_time_is_a_data_error(tmp_path: Path) -> None:
    compile(_model([2, 8]), "llvm", output=tmp_path / "m.so")
    model = load(tmp_path / "m.so")
    with pytest.raises(DataError, match=r"compiled for shape \[2, 8\], got \[3, 8\]"):
        model(np.zeros((3, 8), np.float32))
    with pytest.raises(DataError, match="no array for input"):
        model({"y": np.zeros((2, 8), np.float32)})
    assert model(np.ones((2, 8), np.float32))[0].shape == (2, 4)
    compile(_model(), "llvm", output=tmp_path / "any.so", kernel_choice="estimate")  # symbolic batch
    anybatch = load(tmp_path / "any.so")
    assert anybatch(np.ones((5, 8), np.float32))[0].shape == (5, 4)
    with pytest.raises(DataError, match=r"compiled for shape \['batch', 8\], got \[5, 9\]"):
        anybatch(np.ones((5, 9), np.float32))
