"""How many workers TVM's CPU thread pool gets: one per physical core, as onnxruntime counts them.

TVM sizes each thread's pool when it first starts, from ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``,
else, on x86, *half* the logical CPUs: it assumes two hyper-threads per core. On a machine with one
thread per core (most cloud VMs, and this project's 2-core CI) that is half the cores, so a library
would run its parallel loops on one core of two, and ``compile`` would time the candidate kernels on
that one core too. The pool cannot grow once started (``runtime.config_threadpool`` only lowers it).

:func:`use_physical_cores` therefore sets ``TVM_NUM_THREADS`` to the physical cores this process may
run on, before the pool starts, unless the user has set either variable (theirs always wins).
``compile`` and :class:`~neurorewrite.runtime.tvm_run.CompiledModel` call it, so the kernel choice is
timed with the pool the library will run on.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["physical_cores", "use_physical_cores"]

THREAD_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")  # what TVM reads, in its order
SYSFS_CPUS = Path("/sys/devices/system/cpu")


def physical_cores(cpus: set[int] | None = None, root: Path = SYSFS_CPUS) -> int:
    """Distinct physical cores among ``cpus`` (default: those this process may run on).

    Two logical CPUs are one core when they share ``core_id`` within one package; where the topology
    cannot be read every logical CPU counts as a core.
    """
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = root / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            cores.add(("cpu", str(cpu)))  # unknown topology: its own core
            continue
        cores.add((package, core))
    return max(1, len(cores))


def use_physical_cores() -> int | None:
    """Set ``TVM_NUM_THREADS`` to :func:`physical_cores` unless the user set it or ``OMP_NUM_THREADS``;
    returns the count set, or None when the user's setting stands. Takes effect for pools not yet
    started (each thread's pool starts at its first parallel kernel)."""
    if any(os.environ.get(name, "").strip() for name in THREAD_VARIABLES):
        return None
    count = physical_cores()
    os.environ["TVM_NUM_THREADS"] = str(count)
    return count
