"""Bad option values, a full disk, and requests too big for the machine: each one line and exit 2."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import neurorewrite.memory
from tests.attack.conftest import assert_one_line_error, cli, mlp_model, tree

ROOT = Path(__file__).resolve().parents[2]
BAD = {
    "expand-alpha-text": (["expand", "m.onnx", "--alpha", "x"], "--alpha"),
    "expand-alpha-zero": (["expand", "m.onnx", "--alpha", "0"], "--alpha"),
    "expand-seed-negative": (["expand", "m.onnx", "--alpha", "2", "--seed", "-1"], "--seed"),
    "expand-seed-huge": (["expand", "m.onnx", "--alpha", "2", "--seed", str(2**70)], "--seed"),
    "expand-feature-alpha": (["expand", "m.onnx", "--alpha", "100", "--split", "feature"], "--split feature"),
    "expand-npy-sample": (["expand", "m.onnx", "--alpha", "2", "--calibrate", "x.npy"], "x.npy"),
    "expand-missing-sample": (["expand", "m.onnx", "--alpha", "2", "--calibrate", "nope.npz"], "nope.npz"),
    "expand-string-sample": (["expand", "m.onnx", "--alpha", "2", "--calibrate", "str.npz"], "dtype <U"),
    "expand-bad-groups": (["expand", "m.onnx", "--alpha", "2", "--split", "groups", "--groups", "s.npz"], "--groups"),
    "expand-bad-regex": (["expand", "m.onnx", "--alpha", "2", "--layers", "["], "--layers"),
    "finetune-epochs": (["finetune", "m.onnx", "--data", "t.npz", "--epochs", "-1"], "--epochs"),
    "finetune-batch": (["finetune", "m.onnx", "--data", "t.npz", "--batch-size", "0"], "--batch-size"),
    "finetune-lr-zero": (["finetune", "m.onnx", "--data", "t.npz", "--lr", "0"], "--lr"),
    "finetune-lr-inf": (["finetune", "m.onnx", "--data", "t.npz", "--lr", "inf"], "--lr"),
    "finetune-lr-nan": (["finetune", "m.onnx", "--data", "t.npz", "--lr", "nan"], "--lr"),
    "finetune-decay": (["finetune", "m.onnx", "--data", "t.npz", "--weight-decay", "-1"], "--weight-decay"),
    "finetune-decay-inf": (["finetune", "m.onnx", "--data", "t.npz", "--weight-decay", "inf"], "--weight-decay"),
    "finetune-momentum": (["finetune", "m.onnx", "--data", "t.npz", "--optimizer", "sgd", "--momentum", "-1"], "--momentum"),
    "finetune-seed-negative": (["finetune", "m.onnx", "--data", "t.npz", "--seed", "-1"], "--seed"),
    "finetune-seed-huge": (["finetune", "m.onnx", "--data", "t.npz", "--seed", str(2**70)], "--seed"),
    "finetune-no-y": (["finetune", "m.onnx", "--data", "s.npz"], "missing y"),
    "finetune-static-batch": (["finetune", "static.onnx", "--data", "t.npz"], "fixed batch size"),
    "bench-batch": (["bench", "m.onnx", "--batch", "0"], "--batch"),
    "bench-batch-text": (["bench", "m.onnx", "--batch", "a,b"], "--batch"),
    "bench-repeats": (["bench", "m.onnx", "--repeats", "0"], "--repeats"),
    "bench-threads": (["bench", "m.onnx", "--threads", "0"], "--threads"),
    "analyze-missing-data": (["analyze", "m.onnx", "--data", "nope.npz"], "nope.npz"),
    "analyze-html-folder": (["analyze", "m.onnx", "--html", "."], "--html"),
}


@pytest.fixture
def extras(work: Path) -> Path:
    import numpy as np

    np.save(work / "x.npy", np.zeros((4, 6), np.float32))
    np.savez(work / "str.npz", x=np.array([["a"] * 6] * 4))
    static = mlp_model(d=6, h=8, o=3)
    for v in (*static.graph.input, *static.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(static, str(work / "static.onnx"))
    return work


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_option_is_one_line_and_writes_nothing(extras: Path, case: str) -> None:
    argv, needle = BAD[case]
    before = tree(extras)
    assert_one_line_error(cli(*argv, cwd=extras), needle)
    assert tree(extras) == before


def many_rows(work: Path, rows: int = 200) -> str:
    """A sample with enough rows that the refit streams a Gram matrix (``n (n + 1) / 2`` > the width)."""
    np.savez(work / "many.npz", x=np.random.default_rng(0).standard_normal((rows, 6)).astype(np.float32))
    return "many.npz"


def test_calibration_too_big_for_the_machine_is_refused_with_the_figure(work: Path, monkeypatch) -> None:
    """The issue's --alpha 64 --calibrate asked numpy for 288 GiB; here the machine is made small."""
    onnx.save(mlp_model(d=6, h=256, o=3), str(work / "wide.onnx"))
    sample = many_rows(work)
    monkeypatch.setattr(neurorewrite.memory, "machine_memory", lambda: 1 << 30)
    before = tree(work)
    line = assert_one_line_error(cli("expand", "wide.onnx", "--alpha", "64", "--calibrate", sample, "-o", "o.onnx",
                                     cwd=work), "--alpha 64 with --calibrate", "needs about", "this machine has 1.0 GiB")
    # (64 * 256 + 1)^2 float64 entries, the Gram matrix, and 16384^2 float32, the damped Gram's inverse
    # Cholesky factor that chooses the support (2.0 GiB + 1.0 GiB)
    assert "3.0 GiB" in line
    assert "--refit-per parent" in line  # the way out the message names
    kept = assert_one_line_error(cli("expand", "wide.onnx", "--alpha", "64", "--calibrate", sample, "--support", "kept",
                                     "-o", "o.onnx", cwd=work), "needs about")
    assert "2.0 GiB" in kept  # the Gram matrix alone
    assert tree(work) == before
    assert cli("expand", "wide.onnx", "--alpha", "2", "--calibrate", "s.npz", "-o", "o.onnx", cwd=work).code == 0


def test_the_memory_check_follows_the_refit_options(work: Path, monkeypatch) -> None:
    """Per child, alpha 2 of 256 units is a 513^2 float64 Gram (2.1 MB); per parent 257^2 (0.5 MB)."""
    onnx.save(mlp_model(d=6, h=256, o=3), str(work / "wide.onnx"))
    base = ("expand", "wide.onnx", "--alpha", "2", "--calibrate", many_rows(work))
    monkeypatch.setattr(neurorewrite.memory, "machine_memory", lambda: 5 << 19)  # 2.5 MiB
    assert_one_line_error(cli(*base, "-o", "c.onnx", cwd=work), "over 512 hidden units", "this machine has")
    assert cli(*base, "--refit-per", "parent", "-o", "p.onnx", cwd=work).code == 0
    assert cli(*base, "--refit", "none", "-o", "n.onnx", cwd=work).code == 0


def test_a_small_sample_is_solved_in_its_rows_where_the_gram_would_not_fit(work: Path, monkeypatch) -> None:
    """16 rows for 512 inputs: the refit keeps the rows (16 x 512), not a 513^2 Gram, and the check knows."""
    onnx.save(mlp_model(d=6, h=256, o=3), str(work / "wide.onnx"))
    monkeypatch.setattr(neurorewrite.memory, "machine_memory", lambda: 3 << 19)  # 1.5 MiB
    run = cli("expand", "wide.onnx", "--alpha", "2", "--calibrate", "s.npz", "--holdout", "0", "-o", "c.onnx", "--json",
              cwd=work)
    assert run.code == 0, run.err
    notes = json.loads(run.out)["calibration"]
    assert [n["solver"] for n in notes] == ["rows"] and notes[0]["width"] == 512
    assert notes[0]["rmse_after"] < notes[0]["rmse_before"]


def test_expansion_too_big_for_the_machine_is_refused(work: Path, monkeypatch) -> None:
    monkeypatch.setattr(neurorewrite.memory, "machine_memory", lambda: 1 << 20)
    onnx.save(mlp_model(d=64, h=256, o=64), str(work / "wide.onnx"))
    assert_one_line_error(cli("expand", "wide.onnx", "--alpha", "16", "-o", "o.onnx", cwd=work),
                          "--alpha 16", "this machine has")


def _fsize_limit() -> None:  # in the child: writes past 64 KiB fail with EFBIG, as on a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))


@pytest.mark.parametrize("argv", [["expand", "big.onnx", "--alpha", "2", "-o", "out.onnx"],
                                  pytest.param(["finetune", "big.onnx", "--data", "tb.npz", "--epochs", "1", "-o",
                                                "out.onnx"], marks=pytest.mark.slow)])  # torch in a fresh process
def test_full_disk_is_one_line_and_leaves_nothing(work: Path, argv: list[str]) -> None:
    import numpy as np

    onnx.save(mlp_model(d=64, h=256, o=4), str(work / "big.onnx"))  # ~280 KB written by either command
    rng = np.random.default_rng(0)
    np.savez(work / "tb.npz", x=rng.standard_normal((8, 64)).astype(np.float32), y=rng.integers(0, 4, 8))
    before = tree(work)
    proc = subprocess.run([sys.executable, "-m", "neurorewrite.cli", *argv], cwd=work, capture_output=True, text=True,
                          preexec_fn=_fsize_limit, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "out.onnx" in lines[0] and "File too large" in lines[0], lines[0]
    assert tree(work) == before
    assert sorted(p.name for p in work.iterdir()) == sorted(before)
