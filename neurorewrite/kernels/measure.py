"""Kernel choice by measurement: every candidate kernel of a layer timed alone on this machine, once.

``compile`` asks :func:`choose` for each sparse layer. On the machine the library is built for (an
``llvm`` target whose CPU is this one's), each candidate of :mod:`neurorewrite.kernels.choice` is
compiled for the target and timed at the batch sizes that matter (the ``--shape`` batch, or for a
symbolic batch a ladder of probes from 1 to 64), rounds interleaved so machine load hits every
candidate alike, the minimum kept. The fastest per probe wins (:func:`~.choice.choice_from_costs`).
The result goes into the tuning database folder (``neurorewrite-kernels.json``, keyed by target,
threads, probes and the layer's sparsity pattern), so the next compile of the same layer reads it
instead of measuring. For any other target (CUDA, another CPU) the static estimates decide.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tvm

from neurorewrite.kernels.choice import Candidate, Choice, SparseLinearTask, choice_from_costs, estimated_choice

RECORDS = "neurorewrite-kernels.json"
FORMAT = 1
PROBES = (1, 2, 4, 8, 16, 32, 64)  # batch sizes timed for a symbolic batch
ROUNDS = 5  # interleaved rounds; each candidate's minimum over them is kept
TARGET_SECONDS = 0.003  # each timed sample repeats the kernel to take about this long
PRUNE = 3.0  # a candidate over this factor of the best first try at a probe is not timed further there
MIN_MEASURED_NONZEROS = 1 << 16  # smaller layers take microseconds whatever runs them: the estimates decide


def this_machine(target: tvm.target.Target) -> bool:
    """Whether ``target`` is this machine's CPU (so its kernels can be timed here)."""
    if target.kind.name != "llvm":
        return False
    mcpu = target.attrs.get("mcpu") if hasattr(target, "attrs") else None
    host = tvm.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    return not mcpu or host is None or str(mcpu) == host()


def pool_threads() -> int:
    """Threads of TVM's pool in this process (what the timings were taken with)."""
    num = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    return int(num()) if num is not None else 1


class KernelRecords:
    """The measured choices in a tuning database folder (one JSON file, rewritten atomically)."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.path = None if folder is None else Path(folder) / RECORDS
        self.records: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format") == FORMAT:
                    self.records = dict(data.get("records", {}))
            except (OSError, ValueError):
                self.records = {}  # an unreadable file is measured again and rewritten

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def put(self, key: str, record: dict) -> None:
        self.records[key] = record
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{RECORDS}.", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "records": self.records}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def record_key(task: SparseLinearTask, probes: tuple[int, ...], threads: int) -> str:
    from neurorewrite.kernels.tuning import target_key

    return f"{task.signature()}|{target_key(task.target)}|threads={threads}|probes={','.join(map(str, probes))}"


def choose(
    task: SparseLinearTask, candidates: list[Candidate], probes: tuple[int, ...], records: KernelRecords | None,
    measure: bool = True,
) -> Choice:
    """The layer's kernel per batch size: recorded, else measured here (and recorded), else estimated."""
    if task.nonzeros < MIN_MEASURED_NONZEROS and measure and task.cpu:
        return estimated_choice(candidates, list(probes), max_kernels=1)  # one kernel: its weights are few
    if not (measure and task.cpu and this_machine(task.target)):
        return estimated_choice(candidates, list(probes))
    threads = pool_threads()
    key = record_key(task, probes, threads)
    names = {c.name for c in candidates}
    known = records.get(key) if records is not None else None
    if known is not None and all(name in names for _, name in known["choice"]):
        return Choice([(int(n), str(name)) for n, name in known["choice"]], "recorded",
                      {k: {int(n): float(t) for n, t in v.items()} for k, v in known.get("timings_us", {}).items()})
    costs = time_candidates(task, candidates, probes)
    choice = choice_from_costs(costs, "measured")
    if records is not None:
        records.put(key, {
            "layer": task.name, "threads": threads, "choice": [[n, name] for n, name in choice.ranges],
            "timings_us": {name: {str(n): round(t, 2) for n, t in per.items()} for name, per in costs.items()},
        })
    return choice


def compile_alone(candidates: list[Candidate], target: tvm.target.Target) -> dict[str, object]:
    """Every candidate's kernel (default schedule where it is tunable) built in one module: name -> function.
    A candidate that does not build for the target is left out."""
    funcs = {}
    for i, candidate in enumerate(candidates):
        try:
            func, _ = candidate.build()
            if candidate.schedule is not None:
                func = candidate.schedule(func)
        except Exception:  # noqa: BLE001 (a candidate that cannot be scheduled for this target is not chosen)
            continue
        funcs[f"k{i}"] = (candidate.name, func.with_attr("global_symbol", f"k{i}"))
    if not funcs:
        return {}
    lib = tvm.compile(tvm.IRModule({key: func for key, (_, func) in funcs.items()}), target=target)
    return {name: lib[key] for key, (name, _) in funcs.items()}


def time_candidates(task: SparseLinearTask, candidates: list[Candidate], probes: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """Microseconds per call of every candidate at every probe (inf where pruned or failing)."""
    device = tvm.cpu(0)
    rng = np.random.default_rng(0)
    built = compile_alone(candidates, task.target)
    kernels = {c.name: (built[c.name], [tvm.runtime.tensor(a, device) for a in c.build()[1]])
               for c in candidates if c.name in built}
    costs: dict[str, dict[int, float]] = {name: {} for name in kernels}
    for n in probes:
        xt = tvm.runtime.tensor(rng.standard_normal((task.in_features, n)).astype(np.float32), device)
        yt = tvm.runtime.tensor(np.zeros((task.out_features, n), np.float32), device)
        # two tries of every candidate (one slow try on a busy machine must not drop the best one), then
        # the rounds for those within PRUNE of the best
        samples: dict[str, list[float]] = {name: [_once(f, [xt, *weights, yt])] for name, (f, weights) in kernels.items()}
        for name, (f, weights) in kernels.items():
            samples[name].append(_timed(f, [xt, *weights, yt], max(1, int(TARGET_SECONDS / max(samples[name][0], 1e-7)))))
        best = min(min(v) for v in samples.values())
        alive = {name: max(1, int(TARGET_SECONDS / max(min(v), 1e-7))) for name, v in samples.items() if min(v) <= PRUNE * best}
        for _ in range(ROUNDS):
            for name, number in alive.items():
                f, weights = kernels[name]
                samples[name].append(_timed(f, [xt, *weights, yt], number))
        for name in kernels:
            costs[name][n] = min(samples[name]) * 1e6 if name in alive else float("inf")
    return costs


def _once(f, args: list) -> float:  # noqa: ANN001
    f(*args)  # warm: caches, pool threads
    start = time.perf_counter()
    f(*args)
    return time.perf_counter() - start


def _timed(f, args: list, number: int) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(number):
        f(*args)
    return (time.perf_counter() - start) / number
