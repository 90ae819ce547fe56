"""No command writes over one of its inputs, however the output path is spelled.

Every (command, input role) pair is attacked with the output spelled six ways: relative from the
folder, absolute, through ``sub/..``, a symlink, a hard link, and through a symlinked folder. Each must
be refused before any work with one line naming the output option, and leave every file as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from neurorewrite.paths import check_no_overwrite, same_file, suffixed_output, tagged_output
from neurorewrite.rewriter.io import load_model
from tests.attack.conftest import assert_one_line_error, cli, tree

SPELLINGS = ("relative", "absolute", "dotdot", "symlink", "hardlink", "folder-symlink")

# (command line with {out} for the output, the file the output aims at, the option the error names)
CASES = {
    "expand-model": (["expand", "m.onnx", "--alpha", "2", "-o", "{out}"], "m.onnx", "-o"),
    "expand-external-data": (["expand", "e.onnx", "--alpha", "2", "-o", "{out}"], "e.onnx.data", "-o"),
    "expand-calibrate": (["expand", "m.onnx", "--alpha", "2", "--calibrate", "s.npz", "-o", "{out}"], "s.npz", "-o"),
    "expand-groups": (["expand", "m.onnx", "--alpha", "2", "--split", "groups", "--groups", "g.json", "-o", "{out}"],
                      "g.json", "-o"),
    "finetune-model": (["finetune", "m.onnx", "--data", "t.npz", "-o", "{out}"], "m.onnx", "-o"),
    "finetune-data": (["finetune", "m.onnx", "--data", "t.npz", "-o", "{out}"], "t.npz", "-o"),
    "finetune-external-data": (["finetune", "e.onnx", "--data", "t.npz", "-o", "{out}"], "e.onnx.data", "-o"),
    "analyze-model": (["analyze", "m.onnx", "--html", "{out}"], "m.onnx", "--html"),
    "analyze-second-model": (["analyze", "m.onnx", "e.onnx", "--html", "{out}"], "e.onnx", "--html"),
    "analyze-second-data": (["analyze", "m.onnx", "e.onnx", "--html", "{out}"], "e.onnx.data", "--html"),
    "analyze-data": (["analyze", "m.onnx", "--data", "s.npz", "--html", "{out}"], "s.npz", "--html"),
}


def spell(work: Path, target: str, how: str) -> str:
    """``target`` (a file in ``work``) written the way ``how`` says; links are made here."""
    if how == "relative":
        return target
    if how == "absolute":
        return str(work / target)
    if how == "dotdot":
        (work / "sub").mkdir(exist_ok=True)
        return f"sub/../{target}"
    if how == "symlink":
        (work / "link").symlink_to(target)
        return "link"
    if how == "hardlink":
        os.link(work / target, work / "hard")
        return "hard"
    alias = work.parent / (work.name + "-alias")
    alias.symlink_to(work, target_is_directory=True)
    return str(alias / target)


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_that_is_an_input_is_refused_before_any_work(work: Path, case: str, how: str) -> None:
    argv, target, option = CASES[case]
    (work / "g.json").write_text(json.dumps([[0, 1, 2], [3, 4, 5]]))
    out = spell(work, target, how)
    before = tree(work)
    run = cli(*[a.format(out=out) for a in argv], cwd=work)
    assert_one_line_error(run, option, "same file")
    assert tree(work) == before
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_default_outputs_are_never_the_input(tmp_path: Path) -> None:
    for name in ("m.onnx", "m", "w.so", "m.fpe.onnx", ".hidden", "a.b.c"):
        p = tmp_path / name
        for out in (tagged_output(p, "fpe"), tagged_output(p, "tuned"), suffixed_output(p, ".so")):
            assert out.name != p.name and out.parent == p.parent
    assert suffixed_output(tmp_path / "w.so", ".so").name == "w.so.so"
    assert suffixed_output(tmp_path / "m.onnx", ".so").name == "m.so"


def test_collision_rule_is_reusable_for_any_option(tmp_path: Path) -> None:
    """The rule takes any labelled inputs (e.g. a future --teacher) and names both options."""
    teacher = tmp_path / "teacher.onnx"
    teacher.write_bytes(b"x")
    os.link(teacher, tmp_path / "alias.onnx")
    with pytest.raises(Exception, match=r"-o .*alias.onnx is the same file as --teacher .*teacher.onnx"):
        check_no_overwrite([("--teacher", teacher)], [("-o", tmp_path / "alias.onnx")])
    check_no_overwrite([("--teacher", teacher)], [("-o", tmp_path / "other.onnx")])
    assert same_file(tmp_path / "x" / ".." / "teacher.onnx", teacher)
    assert not same_file(tmp_path / "missing-a", tmp_path / "missing-b")


def test_input_whose_data_file_has_the_outputs_data_name_keeps_its_weights(work: Path) -> None:
    """The attack that replaced an input's weights: in.onnx keeps its data in out.onnx.data."""
    model = onnx.load(str(work / "m.onnx"))
    onnx.save(model, str(work / "in.onnx"), save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    x = {"x": np.ones((2, 6), np.float32)}
    import onnxruntime as ort

    before = ort.InferenceSession(str(work / "in.onnx")).run(None, x)[0]
    data_before = (work / "out.onnx.data").read_bytes()
    run = cli("expand", "in.onnx", "--alpha", "2", "-o", "out.onnx", cwd=work)
    assert run.code == 0, run.err
    assert (work / "out.onnx.data").read_bytes() == data_before
    np.testing.assert_array_equal(ort.InferenceSession(str(work / "in.onnx")).run(None, x)[0], before)
    load_model(work / "out.onnx")


def test_output_whose_old_data_an_input_reads_is_refused(work: Path) -> None:
    """Publishing out.onnx removes the data its old version used; an input reading that file stops it."""
    assert cli("expand", "e.onnx", "--alpha", "2", "-o", "out.onnx", cwd=work).code == 0
    (old_data,) = work.glob("out.onnx.*.data")
    header = onnx.load(str(work / "out.onnx"), load_external_data=False)
    (work / "copy.onnx").write_bytes(header.SerializeToString())  # reads out.onnx's data file
    before = tree(work)
    run = cli("expand", "copy.onnx", "--alpha", "2", "-o", "out.onnx", cwd=work)
    assert_one_line_error(run, "old external data of -o out.onnx", old_data.name, "external data of the model copy.onnx")
    assert tree(work) == before


@pytest.mark.parametrize("relative", [True, False])
def test_reruns_work_from_any_folder_and_leave_one_data_file(work: Path, relative: bool) -> None:
    out_dir = work / "out"
    out_dir.mkdir()
    for _ in range(3):
        if relative:  # from the output's folder, as in the issue
            run = cli("expand", "../e.onnx", "--alpha", "2", "-o", "ok.fpe.onnx", cwd=out_dir)
        else:
            run = cli("expand", work / "e.onnx", "--alpha", "2", "-o", out_dir / "ok.fpe.onnx", cwd=work.parent)
        assert run.code == 0, run.err
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(".data")) == ["ok.fpe.onnx"]
    assert len(list(out_dir.glob("ok.fpe.onnx.*.data"))) == 1
    load_model(out_dir / "ok.fpe.onnx")


@pytest.mark.parametrize("argv", [["expand", "m.onnx", "--alpha", "2", "-o", "{out}"],
                                  ["finetune", "m.onnx", "--data", "t.npz", "--epochs", "1", "-o", "{out}"],
                                  ["analyze", "m.onnx", "--html", "{out}"]])
@pytest.mark.parametrize("kind", ["folder", "fifo", "dangling-symlink-folder", "missing-folder"])
def test_hostile_output_paths_are_refused(work: Path, argv: list[str], kind: str) -> None:
    """A folder, a FIFO (a device would be the same: a rename would replace it), a path through a
    symlink to nothing, a folder that does not exist."""
    if kind == "folder":
        (work / "dir").mkdir()
        out = "dir"
    elif kind == "fifo":
        os.mkfifo(work / "pipe")
        out = "pipe"
    elif kind == "dangling-symlink-folder":
        (work / "gone").symlink_to(work / "nowhere", target_is_directory=True)
        out = "gone/out.onnx"
    else:
        out = "missing/out.onnx"
    before = tree(work)
    assert_one_line_error(cli(*[a.format(out=out) for a in argv], cwd=work), out.split("/")[0])
    assert tree(work) == before
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("argv", [["inspect", "e.onnx"], ["expand", "e.onnx", "--alpha", "2", "-o", "o.onnx"],
                                  ["analyze", "e.onnx"], ["bench", "e.onnx", "--repeats", "1"],
                                  ["finetune", "e.onnx", "--data", "t.npz", "-o", "o.onnx"]])
def test_missing_external_data_is_one_line_naming_the_file(work: Path, argv: list[str]) -> None:
    (work / "e.onnx.data").unlink()
    assert_one_line_error(cli(*argv, cwd=work), "e.onnx.data", "is missing")
