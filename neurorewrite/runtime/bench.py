"""The benchmark harness: median latency of several models side by side, runs interleaved.

Interleaving (model A, model B, model A, ...) spreads the noise of a shared machine over every model
alike, so the ratios are fairer than back-to-back runs. Timings never appear in tests.

Sessions are made with ``spinning=False``: after each run an onnxruntime thread pool busy-waits for
more work, and with several sessions alternating on 2 cores the idle pools take the cores from the
one running (measured: a dense 768-3072-768 FFN at batch 32 and 2 threads read 10.6 ms interleaved
with spinning, 1.6-1.8 ms without). A deployed model runs alone; the harness should time it alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from neurorewrite.errors import DataError, ModelLoadError, NeurorewriteError, UnsupportedModelError, first_line
from neurorewrite.executor import DTYPES, match_inputs
from neurorewrite.rewriter.io import check_model_file, data_files, read_header
from neurorewrite.runtime.ort import ort_session

SEQUENCE = 16  # length used for every symbolic dimension after the batch dimension


@dataclass
class BenchResult:
    """Median seconds per run, by model label and batch size, and each model's file size."""

    labels: list[str]
    batches: list[int]
    median: dict[tuple[str, int], float] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)

    def ratio(self, label: str, batch: int) -> float:
        return self.median[(label, batch)] / self.median[(self.labels[0], batch)]


def feeds_for(session: ort.InferenceSession, batch: int, seed: int = 0, label: str = "the model") -> dict[str, np.ndarray]:
    """Random inputs of each input's type (normal floats, 0/1 integers and booleans): the first
    symbolic dimension is ``batch``, later ones :data:`SEQUENCE`. An input of another type (bfloat16,
    strings, ...) is an UnsupportedModelError naming it."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        dtype = DTYPES.get(i.type)
        if dtype is None:
            raise UnsupportedModelError(f"{label}: input {i.name} has type {i.type}; bench makes random inputs of "
                                        f"types {', '.join(DTYPES)} only")
        feeds[i.name] = random_array(concrete_shape(i.shape, batch), dtype, rng)
    return feeds


def random_array(shape: Sequence[int], dtype: np.dtype | type, rng: np.random.Generator) -> np.ndarray:
    """Normal floats, or 0/1 integers and booleans (valid token ids and masks for any vocabulary)."""
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, 2, size=shape).astype(dtype)


def concrete_shape(shape: Sequence[int | str | None], batch: int) -> list[int]:
    """``shape`` with its first symbolic dimension = ``batch`` and later ones = :data:`SEQUENCE`."""
    dims, first = [], True
    for d in shape:
        dims.append(d if isinstance(d, int) else batch if first else SEQUENCE)
        first = first and isinstance(d, int)
    return dims


def file_bytes(path: str | os.PathLike) -> int:
    """Size of a model file plus the external data files it names, if any (``save_model`` gives each
    write its own ``<model>.<hex>.data``, so the name is read from the model, not guessed)."""
    return os.path.getsize(path) + sum(f.stat().st_size for f in data_files(read_header(path), path) if f.is_file())


def bench_sessions(
    sessions: dict[str, ort.InferenceSession],
    batches: Sequence[int],
    repeats: int = 20,
    warmup: int = 3,
    progress: Callable[[int, int, str], None] | None = None,
    burst: int = 1,
) -> BenchResult:
    """Time every session on the same inputs, interleaved; the first session is the reference.

    Each round runs every session ``burst`` times in a row (each run is one sample): more than 1 lets a
    spinning thread pool settle before its session is timed. Raises DataError naming the model when a
    session does not accept the reference's inputs.
    """
    labels = list(sessions)
    result = BenchResult(labels, list(batches))
    first = sessions[labels[0]]
    step, total = 0, len(batches) * (repeats + warmup)
    for batch in batches:
        base = feeds_for(first, batch, label=labels[0])
        feeds = {label: match_inputs(s, base, f"model {label}") for label, s in sessions.items()}
        samples: dict[str, list[float]] = {label: [] for label in labels}
        for r in range(repeats + warmup):
            for label, session in sessions.items():
                for _ in range(burst):
                    start = time.perf_counter()
                    try:
                        session.run(None, feeds[label])
                    except Exception as e:  # onnxruntime's own exception types for shape errors
                        raise DataError(f"model {label} cannot run on the inputs of {labels[0]} at batch {batch}: {first_line(e)}") from e
                    if r >= warmup:
                        samples[label].append(time.perf_counter() - start)
            step += 1
            if progress is not None:
                progress(step, total, f"batch {batch}")
        for label in labels:
            result.median[(label, batch)] = float(np.median(samples[label]))
    return result


def bench_files(
    paths: Sequence[str | os.PathLike],
    batches: Sequence[int],
    repeats: int = 20,
    threads: int | None = None,
    sparse_method: str = "densify",
    progress: Callable[[int, int, str], None] | None = None,
) -> BenchResult:
    """Load each model file into onnxruntime (CPU) and run :func:`bench_sessions`."""
    labels = [str(p) for p in paths]
    if len(set(labels)) != len(labels):
        raise DataError("bench: the same model is listed twice")
    for p in paths:  # every file validated (checker, external data) before any session is made
        check_model_file(p)
    sessions = {label: _open(p, threads, sparse_method) for label, p in zip(labels, paths)}
    result = bench_sessions(sessions, batches, repeats, progress=progress)
    result.nbytes = {label: file_bytes(p) for label, p in zip(labels, paths)}
    return result


def _open(path: str | os.PathLike, threads: int | None, sparse_method: str) -> ort.InferenceSession:
    try:
        return ort_session(path, providers=["CPUExecutionProvider"], threads=threads, sparse_method=sparse_method,
                           spinning=False)
    except NeurorewriteError:
        raise
    except Exception as e:  # onnxruntime's own exception types: an op it lacks, a type it cannot run
        raise ModelLoadError(f"{path}: onnxruntime cannot open the model ({first_line(e)})") from e
