"""The README's demo runs end to end (examples double as tests)."""

from __future__ import annotations

import onnx

from examples.demo import run


def test_digits_demo_runs_and_prints_its_table(tmp_path, capsys):
    acc = run(hidden=8, alpha=2, seed=0, out=tmp_path)
    out = capsys.readouterr().out
    assert "fpe+calibrate" in out and "nonzeros" in out
    assert set(acc) == {"dense", "fpe", "fpe+calibrate"}
    assert acc["dense"] > 0.85  # a trained classifier, not chance (0.1)
    for name in ("digits.onnx", "digits.fpe.onnx", "digits.fpe.cal.onnx"):
        onnx.checker.check_model(str(tmp_path / name), full_check=True)
