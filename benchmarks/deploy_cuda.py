"""CUDA deploy benchmark: the widened models compiled for CUDA by ``neurorewrite compile`` against onnxruntime's CUDA provider.

Models as in ``benchmarks/deploy.py``: the FFN 768 -> 3072 -> 768 (ReLU) and the 2-layer encoder, FPE
alpha 4 (random split, global prune) written as ``sparse``. Per model: the dense original in
onnxruntime with ``CUDAExecutionProvider`` (inputs and outputs bound on the device with IOBinding), the
``sparse`` file compiled for ``cuda`` once per batch (``--shape``, MetaSchedule ``--trials`` per batch;
on CUDA every sparse layer runs the TensorIR ELL kernel) and once for any batch (no ``--shape``,
default schedules), inputs already on the device. Median of ``--repeats`` calls after a device sync
each; ratios against the original at batch 1 and 32. Prints the CPU and GPU.

Without a CUDA device (or without onnxruntime's CUDA provider) it says so, builds the CUDA libraries
(code generation and nvcc, which the tests also check), and exits 0: run it on a GPU machine for the
numbers. Run: ``python -m benchmarks.deploy_cuda [--trials N] [--repeats N] [--models ffn encoder]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import tvm

from benchmarks.deploy import _written, export_encoder, export_ffn
from benchmarks.peak import cpu_line
from neurorewrite.runtime.tvm_compile import compile
from neurorewrite.runtime.tvm_session import input_specs, static_shape
from neurorewrite.table import format_table

BATCHES = (1, 32)


def gpu_line() -> str:
    device = tvm.cuda(0)
    if not device.exist:
        return "no CUDA device visible to TVM"
    return f"GPU {device.device_name} (compute {device.compute_version}), onnxruntime providers {ort.get_available_providers()}"


def cuda_libraries(sparse: Path, folder: Path, trials: int) -> dict[str, dict[int, Path]]:
    """``{"tvm": {batch: library}, "tvm any batch": {0: library}}`` compiled for cuda."""
    import onnx

    specs = input_specs(onnx.load(str(sparse)))
    fixed = {}
    for batch in BATCHES:
        lib = folder / f"{sparse.stem}.cuda.b{batch}.so"
        compile(sparse, "cuda", output=lib, shapes={s.name: static_shape(s, batch) for s in specs}, tune=trials > 0,
                trials=trials, database=folder / f"{sparse.stem}.cuda.tuning")
        fixed[batch] = lib
    anybatch = folder / f"{sparse.stem}.cuda.any.so"
    compile(sparse, "cuda", output=anybatch)
    return {"tvm": fixed, "tvm any batch": {0: anybatch}}


def _median_us(run: Callable[[], None], repeats: int) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def ort_cuda_runner(path: Path, x: np.ndarray) -> Callable[[], None]:
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    binding = session.io_binding()
    binding.bind_ortvalue_input(session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output(session.get_outputs()[0].name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def tvm_cuda_runner(library: Path, x: np.ndarray) -> Callable[[], None]:
    from neurorewrite.runtime.tvm_run import CompiledModel

    compiled = CompiledModel(library, device="cuda")
    data = tvm.runtime.tensor(x, compiled.device)
    main = compiled.vm["main"]

    def run() -> None:
        main(data)
        compiled.device.sync()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=128, help="MetaSchedule trials per batch for the fixed-shape libraries")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--models", nargs="+", choices=("ffn", "encoder"), default=["ffn", "encoder"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(cpu_line())
    print(gpu_line())
    runnable = tvm.cuda(0).exist and "CUDAExecutionProvider" in ort.get_available_providers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            original = export_ffn(folder, torch.nn.ReLU) if name == "ffn" else export_encoder(folder)
            sparse = _written(original, folder, "sparse", split="random", format="sparse")
            libraries = cuda_libraries(sparse, folder, args.trials if runnable else 0)
            if not runnable:
                print(f"{name}: CUDA libraries built ({', '.join(p.name for libs in libraries.values() for p in libs.values())}); "
                      "no CUDA device or provider here, nothing timed")
                continue
            shape = [d if isinstance(d, int) else 16 for d in input_specs(__import__("onnx").load(str(original)))[0].shape]
            times: dict[tuple[str, int], float] = {}
            for n in BATCHES:
                x = np.random.default_rng(n).standard_normal([n, *shape[1:]]).astype(np.float32)
                times[("original", n)] = _median_us(ort_cuda_runner(original, x), args.repeats)
                for label, libs in libraries.items():
                    times[(label, n)] = _median_us(tvm_cuda_runner(libs.get(n, libs.get(0)), x), args.repeats)
            for label in ("original", *libraries):
                row = [name, label]
                for n in BATCHES:
                    row += [f"{times[(label, n)]:.0f}", f"{times[(label, n)] / times[('original', n)]:.2f}x"]
                rows.append(tuple(row))
    if rows:
        print(format_table(("model", "variant", "batch 1 us", "batch 1 ratio", "batch 32 us", "batch 32 ratio"), rows,
                           title=f"\nCUDA: TVM sparse kernels vs onnxruntime CUDAExecutionProvider (dense original), "
                                 f"median of {args.repeats}, inputs on the device"))


if __name__ == "__main__":
    main()
