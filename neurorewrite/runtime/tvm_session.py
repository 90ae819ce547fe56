"""An onnxruntime-session look-alike over TVM-compiled libraries, so TVM sits in the same benchmark harness.

:func:`tvm_session` compiles either one library per batch size (``--shape``: the fast path) or one
library with the model's symbolic batch that runs them all (``symbolic=True``), and
:class:`TvmSession` picks the library for the batch of the inputs it is given. It offers the two
methods the harness uses: ``get_inputs()`` (name, shape with the symbolic batch, type) and
``run(None, feeds)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from neurorewrite.errors import DataError
from neurorewrite.runtime.bench import concrete_shape
from neurorewrite.runtime.tvm_run import CompiledModel


@dataclass(frozen=True)
class InputSpec:
    """What ``InferenceSession.get_inputs()`` returns per input, as far as the harness reads it."""

    name: str
    shape: list
    type: str = "tensor(float)"


ANY_BATCH = 0  # the key of a library compiled with a symbolic batch


class TvmSession:
    """``run(None, feeds)`` on the library compiled for the feeds' batch size."""

    def __init__(self, inputs: list[InputSpec], libraries: Mapping[int, CompiledModel]) -> None:
        self._inputs = inputs
        self._libraries = dict(libraries)

    def get_inputs(self) -> list[InputSpec]:
        return list(self._inputs)

    def run(self, _output_names: object, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        batch = int(np.shape(feeds[self._inputs[0].name])[0])
        if ANY_BATCH in self._libraries:
            return self._libraries[ANY_BATCH](dict(feeds))
        if batch not in self._libraries:
            raise DataError(f"no TVM library compiled for batch {batch} (compiled: {sorted(self._libraries)})")
        return self._libraries[batch](dict(feeds))


def set_threads(threads: int, spinning: bool = True) -> None:
    """TVM's thread pool size (the kernels' ``parallel`` loops), to compare with onnxruntime like for like;
    ``spinning=False`` makes idle workers sleep at once (as ``ort_session(spinning=False)``).

    The pool takes its size once, when it starts, and ``runtime.config_threadpool`` can lower it but not
    raise it; so the pool starts with a worker per logical CPU (or ``threads``, if more; not the process's
    affinity, which a library may have narrowed) and each call sets how many of them work. A benchmark
    that times 1 thread and then 2 in one process gets 2."""
    import tvm

    os.environ["TVM_NUM_THREADS"] = str(max(threads, os.cpu_count() or 1))  # read when the pool starts
    if not spinning:
        os.environ["TVM_THREAD_POOL_SPIN_COUNT"] = "0"
    config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(1, threads)  # 1: all (big) cores, up to ``threads`` workers


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    return [
        InputSpec(i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in i.type.tensor_type.shape.dim],
                  f"tensor({onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()})")  # onnxruntime's names
        for i in model.graph.input if i.name not in initializers
    ]


def static_shape(spec: InputSpec, batch: int) -> list[int]:
    """The spec's shape as the benchmark harness feeds it (:func:`neurorewrite.runtime.bench.concrete_shape`)."""
    return concrete_shape(spec.shape, batch)


def tvm_session(
    model_path: str | os.PathLike, batches: Sequence[int], threads: int, folder: str | os.PathLike,
    tune: bool = False, trials: int = 0, spinning: bool = False, symbolic: bool = False,
    database: str | os.PathLike | None = None,
) -> TvmSession:
    """Compile ``model_path`` for llvm into ``folder`` (once per batch size, or once for every batch with
    ``symbolic``) and wrap the libraries for the benchmark harness (by default idle workers do not spin,
    as in its onnxruntime sessions). The kernel choice is measured here and kept in ``database``
    (default: one folder per library)."""
    from neurorewrite.runtime.tvm_compile import compile

    set_threads(threads, spinning=spinning)
    model = onnx.load(str(model_path))
    specs = input_specs(model)
    libraries = {}
    for batch in [ANY_BATCH] if symbolic else batches:
        lib = Path(folder) / f"{Path(model_path).stem}.{'any' if batch == ANY_BATCH else f'b{batch}'}.so"
        shapes = None if batch == ANY_BATCH else {s.name: static_shape(s, batch) for s in specs}
        compile(model, "llvm", output=lib, shapes=shapes, tune=tune and batch != ANY_BATCH, trials=trials,
                database=database if database is not None else Path(str(lib) + ".tuning"))
        libraries[batch] = CompiledModel(lib)
    return TvmSession(specs, libraries)
