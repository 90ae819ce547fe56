"""The CLI's error promise, checked one way for every command (README "Errors", docs/architecture.md):
bad input gives exit code 2, exactly one line on stderr that names the cause, nothing on stdout, and
nothing written: no output, no temporary file, no data file, and files that were there are unchanged."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str


def run_cli(argv: Sequence[object], in_process: bool = True, cwd: Path | None = None) -> CliRun:
    """Run ``neurorewrite ARGV`` in this process (``neurorewrite.cli.main``; argparse's SystemExit caught)
    or as a real process (``python -m neurorewrite.cli``, this checkout first on the path)."""
    args = [str(a) for a in argv]
    if not in_process:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "neurorewrite.cli", *args], capture_output=True, text=True,
                              env=env, cwd=cwd, stdin=subprocess.DEVNULL, timeout=300)
        return CliRun(proc.returncode, proc.stdout, proc.stderr)
    from neurorewrite.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code if isinstance(stop.code, int) else 1
    return CliRun(int(code), out.getvalue(), err.getvalue())


def snapshot(folders: Sequence[Path]) -> dict[Path, bytes]:
    """Every file under ``folders`` (recursively, hidden ones included) with its bytes."""
    files = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    files[path] = path.read_bytes()
    return files


def assert_cli_fails(argv: Sequence[object], *needles: str, outputs: Sequence[Path] = (), watch: Sequence[Path] = (),
                     in_process: bool = True) -> CliRun:
    """Run the CLI on bad input and check the promise: exit 2, one stderr line
    ``neurorewrite COMMAND: error: ...`` containing every needle, empty stdout, every path in ``outputs``
    absent afterwards, and the folders of ``outputs`` (and the ``watch`` folders) holding exactly the files
    they held before, byte for byte: no temporary file is left and nothing that was there is touched."""
    folders = sorted({Path(p).parent for p in outputs} | {Path(p) for p in watch})
    before = snapshot(folders)
    result = run_cli(argv, in_process=in_process)
    lines = result.err.splitlines()
    assert result.code == 2, f"exit {result.code}, expected 2; stderr: {result.err!r}"
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got {len(lines)}: {result.err!r}"
    command = next((str(a) for a in argv if not str(a).startswith("-")), "")
    assert lines[0].startswith(f"neurorewrite {command}: error: ") or lines[0].startswith("neurorewrite: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert result.out == "", f"stdout should be empty on an error: {result.out!r}"
    for path in outputs:
        assert not Path(path).exists(), f"{path} was written"
    after = snapshot(folders)
    assert sorted(after) == sorted(before), f"files appeared or vanished: {sorted(set(after) ^ set(before))}"
    changed = [p for p in before if after[p] != before[p]]
    assert not changed, f"files changed: {changed}"
    return result
