"""The per-process benchmark harness: every model alone in its own process, runtime defaults, alternating.

A deployed model runs alone, with its runtime's default thread pool (onnxruntime's and TVM's workers
spin between runs). :func:`bench_processes` times each model that way: one fresh process per model
and round (``python -m neurorewrite.runtime.bench_process``), which loads only that model, sets only
the thread count, warms up and times ``runs`` calls per batch size, and prints the times as JSON.
Models alternate round by round (A, B, C, then C, B, A, ...), so slow drifts of a shared machine hit
them alike; a model's time is the median over rounds of its per-round median. The interleaved
in-process harness (:mod:`neurorewrite.runtime.bench`) is the other view: models side by side in one
process, pools not spinning.

Timings never appear in tests; the benchmarks print them (``benchmarks/deploy.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from neurorewrite.errors import DataError
from neurorewrite.runtime.bench import BenchResult, concrete_shape, feeds_for, random_array


@dataclass(frozen=True)
class Worker:
    """One model as a worker process runs it: ``kind`` ``ort`` (an ONNX file, prepared as ``ort_session``
    does; with ``prepare`` False as stored, in a plain InferenceSession) or ``tvm`` (a compiled library, or
    ``batch -> library`` when compiled per batch)."""

    kind: str
    model: str
    threads: int = 2
    sparse_method: str = "densify"
    libraries: dict[int, str] = field(default_factory=dict)  # tvm compiled per batch (the fixed-shape path)
    spinning: bool = True  # the runtimes' default
    prepare: bool = True  # False: onnxruntime runs the file as stored (what it does without neurorewrite)


def bench_processes(
    workers: dict[str, Worker], batches: Sequence[int], rounds: int = 5, runs: int = 50, warmup: int = 10,
    progress: Callable[[int, int, str], None] | None = None, timeout: float = 900.0,
) -> BenchResult:
    """Median over ``rounds`` of each worker's per-round median seconds, by batch; see the module docstring."""
    labels = list(workers)
    result = BenchResult(labels, list(batches))
    samples: dict[tuple[str, int], list[float]] = {(label, b): [] for label in labels for b in batches}
    total, step = rounds * len(labels), 0
    for r in range(rounds):
        for label in labels if r % 2 == 0 else reversed(labels):
            medians = run_worker(workers[label], batches, runs, warmup, timeout, label)
            for b in batches:
                samples[(label, b)].append(medians[b])
            step += 1
            if progress is not None:
                progress(step, total, label)
    for key, values in samples.items():
        result.median[key] = float(np.median(values))
    return result


def run_worker(worker: Worker, batches: Sequence[int], runs: int, warmup: int, timeout: float, label: str) -> dict[int, float]:
    """Start one worker process; returns its median seconds per batch. Raises DataError naming the model."""
    env = dict(os.environ)
    env["TVM_NUM_THREADS"] = str(worker.threads)
    env.pop("TVM_THREAD_POOL_SPIN_COUNT", None)  # the runtime's default spinning
    if not worker.spinning:
        env["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    command = [sys.executable, "-m", "neurorewrite.runtime.bench_process", json.dumps(asdict(worker)),
               "--batches", *map(str, batches), "--runs", str(runs), "--warmup", str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DataError(f"benchmark worker for model {label} failed: {tail}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {int(b): float(np.median(times)) for b, times in report["times"].items()}


def _session(worker: Worker, batch: int):  # noqa: ANN202 (an InferenceSession or a CompiledModel)
    if worker.kind == "ort" and not worker.prepare:
        import onnxruntime as ort

        from neurorewrite.executor import session_options

        return ort.InferenceSession(worker.model, session_options(worker.threads, worker.spinning),
                                    providers=["CPUExecutionProvider"])
    if worker.kind == "ort":
        from neurorewrite.runtime.ort import ort_session

        return ort_session(worker.model, providers=["CPUExecutionProvider"], threads=worker.threads,
                           sparse_method=worker.sparse_method, spinning=worker.spinning)
    from neurorewrite.runtime.tvm_run import CompiledModel

    return CompiledModel(worker.libraries.get(batch, worker.model))


def _inputs(session: object, kind: str, batch: int) -> tuple[dict[str, np.ndarray], Callable[[], object]]:
    """Random inputs of each input's type (as the interleaved harness makes them) and the call to time."""
    if kind == "ort":
        feeds = feeds_for(session, batch)  # type: ignore[arg-type]
        return feeds, lambda: session.run(None, feeds)  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    shapes, types = session.meta["inputs"], session.input_types  # type: ignore[attr-defined]
    feeds = {name: random_array(concrete_shape(shape, batch), dtype, rng) for (name, shape), dtype in zip(shapes.items(), types)}
    return feeds, lambda: session(feeds)  # type: ignore[operator]  (numpy in, numpy out: as onnxruntime's run)


def _worker_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="time one model alone (a worker of bench_processes)")
    parser.add_argument("worker", help="the Worker as JSON")
    parser.add_argument("--batches", type=int, nargs="+", required=True)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    spec = json.loads(args.worker)
    worker = Worker(**{**spec, "libraries": {int(k): v for k, v in spec.get("libraries", {}).items()}})
    times: dict[str, list[float]] = {}
    sessions: dict[str, object] = {}
    for batch in args.batches:
        key = worker.libraries.get(batch, worker.model)
        if key not in sessions:
            sessions[key] = _session(worker, batch)
        _, run = _inputs(sessions[key], worker.kind, batch)
        for _ in range(args.warmup):
            run()
        measured = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run()
            measured.append(time.perf_counter() - start)
        times[str(batch)] = measured
    print(json.dumps({"times": times}))
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main())
