"""TVM's CPU pool runs one worker per physical core (TVM alone would take half the logical CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neurorewrite.runtime.tvm_compile import compile
from neurorewrite.runtime.tvm_threads import physical_cores, use_physical_cores
from tests.runtime.tvm_models import masked, mlp, reference


def _topology(root: Path, cpus: dict[int, tuple[int, int]]) -> Path:
    """A sysfs-shaped folder: logical CPU -> (package, core)."""
    for cpu, (package, core) in cpus.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_hyper_threads_of_one_core_count_once(tmp_path: Path) -> None:
    # 2 packages x 2 cores x 2 threads; core ids repeat across packages
    root = _topology(tmp_path, {c: (c // 4, (c // 2) % 2) for c in range(8)})
    assert physical_cores(set(range(8)), root) == 4
    assert physical_cores({0, 1}, root) == 1  # the affinity holds both threads of one core
    assert physical_cores({0, 4}, root) == 2  # core 0 of each package


def test_one_thread_per_core_counts_every_cpu(tmp_path: Path) -> None:
    root = _topology(tmp_path, {0: (0, 0), 1: (0, 1)})
    assert physical_cores({0, 1}, root) == 2


def test_unreadable_topology_counts_each_cpu(tmp_path: Path) -> None:
    assert physical_cores({0, 1, 2}, tmp_path) == 3


def test_the_users_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, other in (("TVM_NUM_THREADS", "OMP_NUM_THREADS"), ("OMP_NUM_THREADS", "TVM_NUM_THREADS")):
        monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv(name, "3")
        assert use_physical_cores() is None
        assert os.environ[name] == "3" and other not in os.environ
        monkeypatch.delenv(name)
    assert use_physical_cores() == physical_cores()
    assert os.environ["TVM_NUM_THREADS"] == str(physical_cores())


ROOT = Path(__file__).resolve().parents[2]


def _fresh_process_json(args: list[str], timeout: int = 300) -> Any:
    """Run ``python args`` as a user would, without TVM_NUM_THREADS or OMP_NUM_THREADS; returns its last
    stdout line, parsed as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


_CHILD = """
import json, sys
import numpy as np
import tvm
from neurorewrite.runtime.tvm_run import CompiledModel
model = CompiledModel(sys.argv[1])
y = model(np.load(sys.argv[2]))[0]
print(json.dumps({"threads": tvm.get_global_func("runtime.NumThreads")(), "y": y.tolist()}))
"""


def test_a_loaded_library_runs_on_every_physical_core(tmp_path: Path) -> None:
    """In a fresh process without TVM_NUM_THREADS or OMP_NUM_THREADS, as a user runs it."""
    rng = np.random.default_rng(0)
    w1, w2 = masked(rng, 64, 32, 0.3), masked(rng, 16, 64, 0.3)
    b1, b2 = rng.standard_normal(64).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    lib = tmp_path / "mlp.so"
    compile(mlp(w1, b1, w2, b2, sparse=True), "llvm", output=lib, shapes={"x": [4, 32]})
    x = rng.standard_normal((4, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = _fresh_process_json(["-c", _CHILD, str(lib), str(tmp_path / "x.npy")])
    assert result["threads"] == physical_cores()
    np.testing.assert_allclose(np.array(result["y"]), reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)


_COMPILE = """
import json, sys
import numpy as np
from neurorewrite.runtime.tvm_compile import compile
from tests.runtime.tvm_models import masked, mlp
rng = np.random.default_rng(0)
w1, w2 = masked(rng, 512, 256, 0.6), masked(rng, 8, 512, 0.5)
b1, b2 = np.zeros(512, np.float32), np.zeros(8, np.float32)
_, report = compile(mlp(w1, b1, w2, b2, sparse=True), "llvm", output=sys.argv[1], shapes={"x": [1, 256]})
print(json.dumps([k["choice"] for k in report.sparse_kernels]))
"""


def test_compile_times_the_kernels_on_every_physical_core(tmp_path: Path) -> None:
    """The measured kernel choice is recorded with the pool it was timed on: the one the library runs on."""
    lib = tmp_path / "wide.so"
    assert "measured" in _fresh_process_json(["-c", _COMPILE, str(lib)], timeout=600)
    records = json.loads((tmp_path / "wide.so.tuning" / "neurorewrite-kernels.json").read_text())["records"]
    assert {r["threads"] for r in records.values()} == {physical_cores()}


_RESIZE = """
import json
import tvm
from neurorewrite.runtime.tvm_session import set_threads
count = tvm.get_global_func("runtime.NumThreads")
set_threads(1)
one = count()
set_threads(2)
print(json.dumps([one, count()]))
"""


def test_the_benchmarks_pool_can_go_from_one_thread_to_two() -> None:
    """``set_threads(1)`` then ``set_threads(2)`` in one process (benchmarks time 1 thread, then 2): the pool
    starts once, so it must start big enough for the second call."""
    assert _fresh_process_json(["-c", _RESIZE]) == [1, 2]
