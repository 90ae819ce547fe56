"""MetaSchedule tuning into a database that the next compile reuses (slow: tuning spawns workers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

from neurorewrite.api import expand
from neurorewrite.runtime import compile, load, ort_session


def _encoder(exports) -> onnx.ModelProto:
    """A transformer encoder layer with its FFN widened to SparseLinear: dense ops and sparse kernels."""
    model, _ = expand(exports["transformer"], alpha=4, split="random", format="sparse")
    return model


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {model.graph.input[0].name: [2, 5, 16]}


def test_tasks_are_the_reductions_and_not_the_hand_scheduled_kernels(exports, tmp_path: Path) -> None:
    from neurorewrite.kernels import tuning
    from neurorewrite.runtime.tvm_import import import_model
    from neurorewrite.runtime.tvm_target import parse_target

    target = parse_target("llvm")
    model = _encoder(exports)
    mod, kernels = import_model(model, _shapes(model), target, scheduled=False)
    assert kernels  # the FFN runs on neurorewrite's kernels ...
    tasks = tuning.untuned_tasks(mod, target, tuning.open_database(tmp_path / "db", target))
    names = [t.task_name for t in tasks]
    assert any("matmul" in name for name in names) and any("softmax" in name for name in names)
    scripts = [t.dispatched[0].script() for t in tasks]
    assert not any("is_scheduled" in s for s in scripts)  # ... which tuning leaves alone
    # every task reduces (no transposes, reshapes or element-wise ops: they compile fine unscheduled)
    assert all(any(r in name for r in ("matmul", "softmax", "layer_norm", "sum", "mean", "max")) for name in names), names


@pytest.mark.slow
def test_tuned_compile_matches_and_warm_compile_reuses_the_database(exports, tmp_path: Path) -> None:
    model = _encoder(exports)
    calls: list[tuple[int, int]] = []
    _, first = compile(model, "llvm", output=tmp_path / "m.so", tune=True, trials=24, shapes=_shapes(model),
                       progress=lambda done, total, label: calls.append((done, total)))
    assert first.tuned_tasks >= 2 and calls and calls[-1] == (24, 24)
    records = [json.loads(line) for line in (tmp_path / "m.so.tuning" / "database_tuning_record.json").read_text().splitlines()]
    measured = {task for task, (_, run_secs, *_rest) in records if max(run_secs) < 1.0}  # failures record 1e10 s
    assert len(measured) >= 2  # candidates built and ran
    _, warm = compile(model, "llvm", output=tmp_path / "m.so", tune=True, trials=24, shapes=_shapes(model))
    assert warm.tuned_tasks == 0
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    want = ort_session(model, providers=["CPUExecutionProvider"]).run(None, {model.graph.input[0].name: x})[0]
    np.testing.assert_allclose(load(tmp_path / "m.so")(x)[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow
def test_ell_kernel_is_tuned_where_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the TensorIR ELL kernel runs (CUDA; a CPU when it is the kernel chosen), MetaSchedule tunes it.
    Here it is made the only candidate on an SSE2 CPU, the target this machine can run it on."""
    from neurorewrite.kernels import choice
    from tests.runtime.tvm_models import masked, mlp, reference

    monkeypatch.setattr(choice, "_FAMILIES", {k: v for k, v in choice._FAMILIES.items() if k == "TensorIR ELL"})
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = masked(rng, 64, 48, 0.05), np.zeros(64, np.float32), masked(rng, 8, 64, 0.05), np.zeros(8, np.float32)
    target = {"kind": "llvm", "mcpu": "x86-64", "num-cores": 2}  # SSE2 only: no gather instruction
    model = mlp(w1, b1, w2, b2, sparse=True, input_shape=[2, 48])
    _, report = compile(model, target, output=tmp_path / "m.so", tune=True, trials=16)
    assert {k["kernel"] for k in report.sparse_kernels} == {"TensorIR ELL cols"}
    assert report.tuned_tasks >= 2
    records = (tmp_path / "m.so.tuning" / "database_tuning_record.json").read_text().splitlines()
    assert any(max(json.loads(line)[1][1]) < 1.0 for line in records)  # a candidate built and ran
    x = rng.standard_normal((2, 48)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "m.so")(x)[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
