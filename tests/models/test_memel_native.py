"""Building and loading MEmeL's C kernel (models/memel_native.py), each step called afresh: the process-wide
kernel is loaded once per process (at the first MEmeL step), so tests that only train would never see a
broken cache folder, key, build, status or ctypes declaration in a process that already holds it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import neurorewrite.models.memel_native as native
from neurorewrite.models.memel_native import NativeKernel

COMPILER = native.shutil.which(os.environ.get("CC", "cc")) or native.shutil.which("gcc") or native.shutil.which("clang")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler: MEmeL runs its eager torch code")


def test_the_cache_folder_is_the_variable_or_the_home_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEUROREWRITE_CACHE", str(tmp_path / "mine"))
    assert native._cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("NEUROREWRITE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert native._cache_dir() == tmp_path / ".cache" / "neurorewrite"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo")
def test_the_cpu_identity_is_the_first_processors_model_and_flags() -> None:
    first = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines(keepends=True)
    want = platform.machine() + "".join(line for line in first if line.startswith(("model name", "flags", "Features")))
    assert native._cpu_identity() == want
    assert len(want) > len(platform.machine())  # the CPU's own lines are in it


@needs_compiler
def test_the_kernel_is_built_once_per_source_flags_and_cpu_without_temporaries(monkeypatch, tmp_path: Path) -> None:
    cache = tmp_path / "a" / "b"  # folders that do not exist yet
    monkeypatch.setenv("NEUROREWRITE_CACHE", str(cache))
    # the build stages its file beside the target (one filesystem: an atomic rename), never in the system's
    # temporary folder, here one that does not exist
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-system-temp"))
    built = native._build(COMPILER)
    assert built.parent == cache and built.is_file()
    assert built.name.startswith("memel_kernel-") and built.name.endswith(".so")
    key = built.name[len("memel_kernel-"):-len(".so")]
    assert len(key) == 16 and int(key, 16) >= 0
    stamp = built.stat().st_mtime_ns
    assert native._build(COMPILER) == built and built.stat().st_mtime_ns == stamp  # cached: not compiled again
    monkeypatch.setattr(native, "_cpu_identity", lambda: "another CPU")
    other = native._build(COMPILER)  # the folder exists now; another CPU gets its own file
    assert other != built and other.parent == cache and other.is_file()
    assert sorted(p.name for p in cache.iterdir()) == sorted([built.name, other.name])  # no temporaries left
    NativeKernel(__import__("ctypes").CDLL(str(other)))  # a loadable library with the three entry points


def assert_fused_matches_eager() -> None:
    """MEmeL's fused steps on whatever kernel this process loads give the eager code's outputs, gradients,
    statistics and counts (also run in a fresh process by the test below)."""
    import torch

    from neurorewrite.models.memel import MEmeL
    from neurorewrite.models.memel_fused import eager_only
    from tests.models.test_memel_fused import _run, _stream

    batches = _stream(0, [12] * 5, (30,))
    fused = _run(MEmeL(n_forget=2).train(), batches)
    with eager_only():
        eager = _run(MEmeL(n_forget=2).train(), batches)
    for a, b in zip(fused, eager):
        torch.testing.assert_close(a["out"], b["out"], rtol=1e-6, atol=1e-6)
        assert torch.equal(a["grad"], b["grad"])
        torch.testing.assert_close(a["mean"], b["mean"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a["m2"], b["m2"], rtol=1e-5, atol=1e-4)
        assert a["extra"] == b["extra"]


def failing_compiler(folder: Path) -> str:
    script = folder / "broken-cc"
    script.write_text("#!/bin/sh\necho 'first line' >&2\necho 'broken-cc: the last word' >&2\nexit 1\n")
    script.chmod(0o755)
    return str(script)


def test_a_compiler_that_fails_is_reported_and_leaves_nothing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NEUROREWRITE_CACHE", str(tmp_path / "cache"))
    compiler = failing_compiler(tmp_path)
    with pytest.raises(subprocess.CalledProcessError):
        native._build(compiler)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setenv("CC", compiler)
    kernel, status = native._load.__wrapped__()
    assert kernel is None and status == "eager torch (the fused CPU kernel did not build: broken-cc: the last word)"


def test_the_kernel_can_be_turned_off_or_have_no_compiler(monkeypatch, tmp_path: Path) -> None:
    for value in ("0", "false", " OFF ", "no"):
        monkeypatch.setenv("NEUROREWRITE_MEMEL_KERNEL", value)
        assert native._load.__wrapped__() == (None, "eager torch (NEUROREWRITE_MEMEL_KERNEL=0)")
    monkeypatch.setenv("NEUROREWRITE_MEMEL_KERNEL", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc, no clang either
    assert native._load.__wrapped__() == (None, "eager torch (no C compiler found: set CC to build the fused CPU kernel)")


@needs_compiler
def test_a_freshly_built_kernel_is_loaded_and_agrees_with_the_eager_code(tmp_path: Path) -> None:
    """In a new process with an empty cache: the status names the library it built, and MEmeL's fused steps
    (statistics, selection, output, gradient) match the eager code. A broken ctypes declaration may crash
    the process, hence the subprocess."""
    code = """
from neurorewrite.models.memel_native import kernel_status, native_kernel
from tests.models.test_memel_native import assert_fused_matches_eager
assert native_kernel() is not None, kernel_status()
assert_fused_matches_eager()
print(kernel_status())
"""
    env = {**os.environ, "NEUROREWRITE_CACHE": str(tmp_path), "NEUROREWRITE_MEMEL_KERNEL": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (library,) = tmp_path.glob("memel_kernel-*.so")
    assert result.stdout.strip() == f"fused C kernel ({library.name}, built by {Path(COMPILER).name})"


@needs_compiler
def test_a_freshly_declared_kernel_runs_memel_in_this_process(monkeypatch, tmp_path: Path) -> None:
    """The ctypes declarations of a newly loaded library, used by MEmeL's fused steps in this process: a
    missing or wrong declaration raises or changes a result here."""
    import ctypes

    monkeypatch.setenv("NEUROREWRITE_CACHE", str(tmp_path))
    fresh = NativeKernel(ctypes.CDLL(str(native._build(COMPILER))))
    monkeypatch.setattr(native, "_load", lambda: (fresh, "fresh"))
    assert native.native_kernel() is fresh and native.kernel_status() == "fresh"
    assert_fused_matches_eager()


def test_the_status_is_the_loaders_reason() -> None:
    status = native.kernel_status()
    assert status == native._load()[1] and status.startswith(("fused C kernel (", "eager torch ("))
