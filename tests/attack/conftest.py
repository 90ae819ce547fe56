"""Shared pieces of the attack suite: small real models on disk, and the CLI run the way a user runs it.

:func:`cli` calls ``neurorewrite.cli.main`` in this process (fast; an exception that escapes it is a
traceback a user would see, so the test fails with it) and returns the exit code and stderr lines.
:func:`assert_one_line_error` is the promise of every refusal: exit 2 and one line naming the cause.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from builders import mlp_model  # noqa: E402

from neurorewrite.cli import main  # noqa: E402


@dataclass
class Run:
    code: int
    out: str
    err: list[str]


def cli(*args: object, cwd: Path | None = None) -> Run:
    """Run ``neurorewrite ARGS`` in this process (in ``cwd``); an escaping exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse refuses malformed options itself, with exit 2
                code = int(e.code or 0)
    finally:
        os.chdir(previous)
    lines = [line for line in err.getvalue().splitlines() if line.strip() and "\r" not in line]
    return Run(code, out.getvalue(), [line for line in lines if ": warning: " not in line])


def assert_one_line_error(run: Run, *needles: str) -> str:
    """Exit 2, exactly one error line, no traceback and no 'please report', containing every needle."""
    assert run.code == 2, (run.code, run.err)
    errors = [line for line in run.err if "error:" in line]
    assert len(errors) == 1 and len(run.err) <= 2, run.err  # argparse adds its usage line
    line = errors[0]
    assert "Traceback" not in line and "please report" not in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes() if p.is_file() else b"<missing>")
    return h.hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file under ``folder`` (the state a refused command must leave as it was)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A folder with ``m.onnx`` (6 -> 8 -> 3, inline), ``e.onnx`` + ``e.onnx.data`` (64 -> 32 -> 8, weights
    in the data file and so in its expansions' data files too), ``s.npz`` (sample for m's input x),
    ``t.npz`` (training x, y for m)."""
    onnx.save(mlp_model(d=6, h=8, o=3), str(tmp_path / "m.onnx"))
    onnx.save(mlp_model(d=64, h=32, o=8), str(tmp_path / "e.onnx"), save_as_external_data=True,
              location="e.onnx.data", size_threshold=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    np.savez(tmp_path / "s.npz", x=x)
    np.savez(tmp_path / "t.npz", x=x, y=rng.integers(0, 3, 16))
    return tmp_path
