"""`neurorewrite expand` and `inspect` from the command line: output, reports, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from neurorewrite.cli import COMMANDS, main
from tests.builders import mlp_model
from tests.conftest import run_model


@pytest.fixture()
def model_path(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(mlp_model(d=10, h=12, o=4), str(path))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_expand_writes_beside_the_input_and_prints_a_table(capsys, model_path):
    code, out, err = run_cli(capsys, "expand", model_path, "--alpha", "4")
    assert code == 0, err
    written = model_path.with_name("model.fpe.onnx")
    assert written.is_file()
    assert "12 -> 48" in out and "nonzeros" in out
    onnx.checker.check_model(str(written), full_check=True)
    x = np.ones((2, 10), np.float32)
    assert run_model(written, {"x": x})[0].shape == (2, 4)


def test_expand_options_and_json_report(capsys, model_path, tmp_path):
    out_path = tmp_path / "out.onnx"
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps([[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]))
    code, out, err = run_cli(
        capsys, "expand", model_path, "--alpha", "2", "-o", out_path, "--split", "groups", "--groups", groups,
        "--seed", "7", "--bias", "copy", "--prune", "layer", "--json",
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["split"] == "groups" and report["seed"] == 7 and report["prune"] == "layer"
    assert report["blocks"][0]["nnz_after"] == report["blocks"][0]["nnz_before"]
    assert out_path.is_file()


def test_inspect_shows_blocks_and_fpe_metadata(capsys, model_path):
    assert run_cli(capsys, "expand", model_path, "--alpha", "3")[0] == 0
    code, out, _ = run_cli(capsys, "inspect", model_path.with_name("model.fpe.onnx"))
    assert code == 0
    assert "FPE: alpha=3" in out and "12 -> 36" in out
    code, out, _ = run_cli(capsys, "inspect", model_path, "--json")
    info = json.loads(out)
    assert info["blocks"][0]["width"] == 12 and info["fpe"] is None


def test_calibrate_from_the_command_line(capsys, model_path, tmp_path):
    sample = tmp_path / "sample.npz"
    np.savez(sample, x=np.random.default_rng(0).standard_normal((64, 10)).astype(np.float32))
    code, out, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "--calibrate", sample)
    assert code == 0, err
    assert "calibration" in out and "fc2" in out
    header = next(line for line in out.splitlines() if "refit layer" in line)
    assert "support" in header and any("fc2" in line and "hessian" in line for line in out.splitlines())
    assert "split=tiered lead-share=0.75" in out, "a sample makes the tiered split with its lead share the default"
    row = next(line for line in out.splitlines() if "fc2" in line and "hessian" in line)
    assert "first layer" in header and " lead " in row and " - -> " in row  # no bare fit-row error with held-out rows
    assert "not measured with a lead refit" in out
    code, out, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "-o", tmp_path / "bare.onnx")
    assert code == 0 and "split=random" in out, err


def test_lead_share_from_the_command_line(capsys, model_path, tmp_path):
    code, out, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "--split", "tiered", "--lead-share", "0.6",
                             "--json", "-o", tmp_path / "lead.onnx")
    assert code == 0, err
    assert json.loads(out)["lead_share"] == 0.6
    code, out, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "--lead-share", "0.6",
                             "-o", tmp_path / "no.onnx")
    assert code != 0 and not (tmp_path / "no.onnx").exists()
    assert err.strip() == ("neurorewrite expand: error: --lead-share shapes the tiered split; with --split random "
                           "leave it out or add --split tiered")


CALIBRATION_CHOICES = [("--support", "support", "hessian"), ("--support", "support", "kept"),
                       ("--first-layer", "first", "lead"), ("--first-layer", "first", "keep")]


@pytest.mark.parametrize("flag, key, value", CALIBRATION_CHOICES)
def test_a_calibration_option_reaches_the_refit(capsys, model_path, tmp_path, flag, key, value):
    sample = tmp_path / "sample.npz"
    np.savez(sample, x=np.random.default_rng(0).standard_normal((200, 10)).astype(np.float32))
    code, out, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "--calibrate", sample, flag, value,
                             "--json", "-o", tmp_path / f"{value}.onnx")
    assert code == 0, err
    assert [n[key] for n in json.loads(out)["calibration"]] == [value]


@pytest.mark.parametrize("flag, value", [("--support", "kept"), ("--first-layer", "lead"), ("--first-layer", "keep")])
def test_a_calibration_option_needs_a_sample(capsys, model_path, tmp_path, flag, value):
    code, _, err = run_cli(capsys, "expand", model_path, "--alpha", "2", flag, value, "-o", tmp_path / "o.onnx")
    assert_one_line_error(code, err, flag, "give --calibrate SAMPLE.npz")
    assert not (tmp_path / "o.onnx").exists()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, f"exit {code}: the README promises 2"
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _not_onnx(good: Path, tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "x.onnx").write_text("hello, I am not a model")
    return tmp / "x.onnx", ["x.onnx", "not a readable ONNX model"]


def _truncated(good: Path, tmp: Path) -> tuple[Path, list[str]]:
    data = good.read_bytes()
    (tmp / "x.onnx").write_bytes(data[: len(data) // 2])
    return tmp / "x.onnx", ["x.onnx"]


def _missing(good: Path, tmp: Path) -> tuple[Path, list[str]]:
    return tmp / "nope.onnx", ["nope.onnx", "no such file"]


BAD_CASES = {"not_onnx": _not_onnx, "truncated": _truncated, "missing": _missing}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_model_files(capsys, model_path, tmp_path, case):
    bad, needles = BAD_CASES[case](model_path, tmp_path)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "expand", bad, "--alpha", "2", "-o", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_model_without_mlp_block(capsys, tmp_path):
    path = tmp_path / "plain.onnx"
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])]))
    onnx.save_model(model, str(path))
    code, _, err = run_cli(capsys, "expand", path, "--alpha", "2")
    assert_one_line_error(code, err, "no MLP block")
    assert not path.with_name("plain.fpe.onnx").exists()


@pytest.mark.parametrize("alpha", ["0", "-2", "2.5", "four"])
def test_bad_alpha(capsys, model_path, alpha):
    code, _, err = run_cli(capsys, "expand", model_path, "--alpha", alpha)
    assert_one_line_error(code, err, "--alpha")
    assert not model_path.with_name("model.fpe.onnx").exists()


def test_unreadable_npz(capsys, model_path, tmp_path):
    bad = tmp_path / "sample.npz"
    bad.write_bytes(b"PK\x03\x04 broken")
    code, _, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "--calibrate", bad)
    assert_one_line_error(code, err, "--calibrate", "sample.npz")
    assert not model_path.with_name("model.fpe.onnx").exists()


def test_npz_that_does_not_match_the_model(capsys, model_path, tmp_path):
    sample = tmp_path / "sample.npz"
    np.savez(sample, x=np.ones((5, 3), np.float32))
    code, _, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "--calibrate", sample)
    assert_one_line_error(code, err, "expects shape")


@pytest.mark.parametrize("content", ["[[0, 1], [1, 2]]", "[[0, 1]]", "{\"groups\": 3}", "not json"])
def test_split_file_that_is_not_a_partition(capsys, model_path, tmp_path, content):
    groups = tmp_path / "groups.json"
    groups.write_text(content)
    code, _, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "--split", "groups", "--groups", groups)
    assert_one_line_error(code, err, "--groups")
    assert not model_path.with_name("model.fpe.onnx").exists()


def test_existing_output_survives_a_failed_run(capsys, model_path, tmp_path):
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "expand", model_path, "--alpha", "0", "-o", out)
    assert code == 2 and out.read_bytes() == b"precious"
    code, _, err = run_cli(capsys, "expand", model_path, "--alpha", "2", "-o", out)
    assert code == 0, err
    onnx.checker.check_model(str(out), full_check=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keep.onnx")], "temp files left behind"


def test_console_script_help_for_every_command():
    exe = Path(sys.executable).with_name("neurorewrite")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "neurorewrite.cli"]
    env = dict(os.environ)
    result = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, check=True)
    missing = [c for c in COMMANDS if c not in result.stdout]
    assert not missing, f"commands missing from --help: {missing}"
    for command in COMMANDS:
        sub = subprocess.run(cmd + [command, "--help"], capture_output=True, text=True, env=env)
        assert sub.returncode == 0 and "usage" in sub.stdout, sub.stderr


def test_inspect_lists_how_each_layer_is_stored(capsys, model_path, tmp_path):
    out_path = tmp_path / "sparse.onnx"
    assert run_cli(capsys, "expand", model_path, "--alpha", "2", "--format", "sparse", "-o", out_path)[0] == 0
    code, out, _ = run_cli(capsys, "inspect", out_path)
    assert code == 0
    assert "format sparse" in out and "stored as" in out and "csr" in out and "fc1" in out
