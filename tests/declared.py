"""Skips that CI must not hide (a pytest plugin, loaded by tests/conftest.py).

A test skips cleanly where a component is missing (``pytest.importorskip``), which is right on a
developer's machine without TVM, and wrong in CI, where ``./run`` installs every component the project
declares: there a missing or broken TVM would turn about fifty tests into silent skips and CI would stay
green. So, when the ``CI`` environment variable is set (CI services set ``CI=true``; ``.ci/run`` sets it too):

- the session fails at its start if a declared component cannot be imported, naming it and the error;
- any test or module skipped because an import failed fails instead.

GPU tests (marker ``gpu``) skip cleanly where no GPU is present, and run whenever one is: the marker, not
the test, decides, so a GPU machine whose TVM lacks CUDA fails the GPU tests instead of skipping them.
``NEUROREWRITE_GPU=0/1`` overrides the detection; ``NEUROREWRITE_DECLARED`` (comma-separated import names)
overrides the declared list, for the tests of this plugin.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# import name -> what pyproject.toml declares (``./run`` installs the dev and tvm extras)
DECLARED = {
    "numpy": "numpy (dependency)",
    "onnx": "onnx (dependency)",
    "onnxruntime": "onnxruntime (dependency)",
    "torch": "torch (extras dev, torch)",
    "onnxscript": "onnxscript (extras dev, torch)",
    "scipy": "scipy (extras dev, torch)",
    "sklearn": "scikit-learn (extra dev)",
    "skl2onnx": "skl2onnx (extra dev)",
    "hypothesis": "hypothesis (extra dev)",
    "matplotlib": "matplotlib (extras dev, analyze)",
    "tvm": "apache-tvm (extra tvm)",
}
IMPORT_SKIP = re.compile(r"could not import '[^']+'[^\n]*")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def declared() -> list[str]:
    override = os.environ.get("NEUROREWRITE_DECLARED")
    return [n.strip() for n in override.split(",") if n.strip()] if override is not None else list(DECLARED)


def gpu_present() -> bool:
    """An NVIDIA GPU visible to this machine (driver files or nvidia-smi), whatever the Python packages say."""
    forced = os.environ.get("NEUROREWRITE_GPU")
    if forced is not None:
        return forced.strip() not in ("", "0")
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("GPU ") for line in out.splitlines())


def missing_components() -> list[str]:
    missing = []
    for name in declared():
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a broken install raises more than ImportError (TVM: OSError)
            missing.append(f"{name} ({DECLARED.get(name, 'declared')}): {type(e).__name__}: {e}".splitlines()[0])
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    if not in_ci() or hasattr(session.config, "workerinput"):  # xdist workers: the controller checked
        return
    missing = missing_components()
    if missing:
        pytest.exit("CI: declared components cannot be imported, so their tests would only skip: "
                    + "; ".join(missing), returncode=3)


def _import_skip_reason(longrepr: object) -> str | None:
    """``could not import 'x': ...`` when a skip report comes from ``pytest.importorskip``."""
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr
    found = IMPORT_SKIP.search(str(text))
    return found.group(0) if found else None


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # noqa: ANN201
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and (reason := _import_skip_reason(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"CI: a module-level import skip is a failure here ({reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and (reason := _import_skip_reason(report.longrepr)):
        report.outcome = "failed"
        report.longrepr = f"CI: an import skip is a failure here ({reason})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not gpu_present():
        skip = pytest.mark.skip(reason="no GPU on this machine (set NEUROREWRITE_GPU=1 to run the GPU tests anyway)")
        for item in gpu_items:
            item.add_marker(skip)
