"""tests/declared.py: in CI an import skip fails, a declared component that cannot be imported fails the
session at its start, and GPU tests skip without a GPU but run with one. Each case is a real pytest run
in a subprocess on a small test folder, with the plugin loaded as tests/conftest.py loads it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ABSENT = "neurorewrite_absent_component"


def pytest_run(folder: Path, ci: bool, **env: str) -> subprocess.CompletedProcess[str]:
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a GPU\n")
    (folder / "conftest.py").write_text(
        "from tests.declared import (pytest_collection_modifyitems, pytest_make_collect_report,\n"
        "                            pytest_runtest_makereport, pytest_sessionstart)\n")
    full_env = {k: v for k, v in os.environ.items() if k not in ("CI", "NEUROREWRITE_GPU", "NEUROREWRITE_DECLARED")}
    full_env.update(env, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    full_env.setdefault("NEUROREWRITE_DECLARED", "json")  # something importable: keeps the session start cheap
    full_env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # hypothesis's and xdist's plugins cost seconds per run
    if ci:
        full_env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, env=full_env, capture_output=True, text=True, timeout=300)


def write(folder: Path, name: str, body: str) -> None:
    (folder / name).write_text(textwrap.dedent(body))


@pytest.fixture()
def import_skips(tmp_path: Path) -> Path:
    write(tmp_path, "test_module_skip.py", f"""
        import pytest
        pytest.importorskip("{ABSENT}")

        def test_never_runs():
            pass
    """)
    write(tmp_path, "test_inner_skip.py", f"""
        import pytest

        def test_needs_it():
            pytest.importorskip("{ABSENT}")

        def test_plain_skip_is_still_a_skip():
            pytest.skip("not an import")
    """)
    return tmp_path


def test_outside_ci_import_skips_are_skips(import_skips: Path) -> None:
    result = pytest_run(import_skips, ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 skipped" in result.stdout


def test_in_ci_import_skips_fail(import_skips: Path) -> None:
    result = pytest_run(import_skips, ci=True)
    assert result.returncode != 0, result.stdout
    assert "CI: a module-level import skip is a failure here (could not import 'neurorewrite_absent_component'" in result.stdout
    (import_skips / "test_module_skip.py").unlink()  # a collection error stops the run: now the test-level one
    result = pytest_run(import_skips, ci=True)
    assert result.returncode == 1, result.stdout
    assert "1 failed, 1 skipped" in result.stdout and "CI: an import skip is a failure here" in result.stdout


def test_in_ci_a_declared_component_that_cannot_be_imported_stops_the_session(tmp_path: Path) -> None:
    """Missing, or installed but broken (TVM's native library failing to load raises OSError, not ImportError)."""
    fake = tmp_path / "fake"
    (fake / "tvm").mkdir(parents=True)
    (fake / "tvm" / "__init__.py").write_text("raise OSError('libtvm.so: cannot open shared object file')\n")
    tests = tmp_path / "tests_here"
    tests.mkdir()
    write(tests, "test_ok.py", "def test_ok():\n    pass\n")
    result = pytest_run(tests, ci=True, NEUROREWRITE_DECLARED=f"json,{ABSENT},tvm", PYTHONPATH=str(fake))
    assert result.returncode == 3, result.stdout + result.stderr
    text = result.stdout + result.stderr
    assert "declared components cannot be imported" in text
    assert f"{ABSENT} (declared): ModuleNotFoundError" in text and "tvm (apache-tvm (extra tvm)): OSError: libtvm.so" in text
    assert pytest_run(tests, ci=False, NEUROREWRITE_DECLARED=f"json,{ABSENT},tvm", PYTHONPATH=str(fake)).returncode == 0


def test_gpu_tests_skip_without_a_gpu_and_run_with_one(tmp_path: Path) -> None:
    write(tmp_path, "test_gpu.py", """
        import pytest

        @pytest.mark.gpu
        def test_on_the_gpu():
            print("RAN ON THE GPU")
            assert False, "ran: this stands for a GPU test that fails on a GPU machine"
    """)
    result = pytest_run(tmp_path, ci=True, NEUROREWRITE_GPU="0")
    assert result.returncode == 0 and "1 skipped" in result.stdout and "no GPU on this machine" in result.stdout, result.stdout
    result = pytest_run(tmp_path, ci=True, NEUROREWRITE_GPU="1")
    assert result.returncode == 1 and "1 failed" in result.stdout and "RAN ON THE GPU" in result.stdout, result.stdout


def test_this_machine_is_judged_by_its_hardware() -> None:
    """Without an override, GPU detection reads the driver (or nvidia-smi), not a Python package: on a
    machine with neither it finds no GPU, on one whose driver lists GPUs it finds one."""
    env = {k: v for k, v in os.environ.items() if k != "NEUROREWRITE_GPU"}
    code = "from tests.declared import gpu_present; print(gpu_present())"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, check=True).stdout.strip()
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        assert out == "True"
    elif shutil.which("nvidia-smi") is None:
        assert out == "False"
    else:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        assert out == str(any(line.startswith("GPU ") for line in listed.splitlines()))
