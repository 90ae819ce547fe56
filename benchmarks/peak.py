"""The machine's measured peaks, the yardstick for "fraction of peak" in the kernel and deploy benchmarks.

- Compute: a TVM kernel of independent vector FMA chains held in registers (``CHAINS`` accumulators of
  the target's SIMD width), run by 1 and by 2 threads: GFLOP/s (2 flops per multiply-add).
- Memory: a parallel vectorised sum over a buffer far larger than the last-level cache (DRAM) and over
  one that fits it (8 MiB, read repeatedly: the cache), by 1 and 2 threads: GB/s read.

Best of several repetitions (a peak, not a typical value). Run: ``python -m benchmarks.peak``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm.script import tirx as T

from benchmarks.machine import describe
from neurorewrite.kernels.choice import simd_lanes
from neurorewrite.runtime.tvm_session import set_threads
from neurorewrite.runtime.tvm_target import parse_target

CHAINS = 12  # independent accumulators: enough to cover the FMA latency on every CPU we run on
ITERATIONS = 1 << 21
TASKS = 64


@dataclass(frozen=True)
class Peaks:
    """GFLOP/s and GB/s by thread count."""

    gflops: dict[int, float]
    dram_gbs: dict[int, float]
    cache_gbs: dict[int, float]
    lanes: int

    def lines(self) -> list[str]:
        def row(name: str, values: dict[int, float], unit: str) -> str:
            return f"{name}: " + ", ".join(f"{t} thread{'s' if t > 1 else ''} {v:.1f} {unit}" for t, v in sorted(values.items()))
        return [f"peaks (measured, {self.lanes}-float vectors):", "  " + row("FMA", self.gflops, "GFLOP/s"),
                "  " + row("read from DRAM (256 MiB)", self.dram_gbs, "GB/s"),
                "  " + row("read from cache (8 MiB)", self.cache_gbs, "GB/s")]


def _fma_func(lanes: int) -> tvm.tirx.PrimFunc:
    vec = f"float32x{lanes}"

    @T.prim_func(private=True)
    def fma(A: T.Buffer((TASKS, CHAINS * lanes), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for t in T.parallel(TASKS):
            acc = T.alloc_buffer((CHAINS, lanes), "float32", scope="local")
            for c in T.unroll(CHAINS):
                acc[c, T.ramp(0, 1, lanes)] = A.vload([t, c * lanes], vec)
            for _ in range(ITERATIONS // TASKS):
                for c in T.unroll(CHAINS):
                    acc[c, T.ramp(0, 1, lanes)] = acc.vload([c, 0], vec) * T.broadcast(T.float32(0.999999), lanes) + T.broadcast(
                        T.float32(1e-7), lanes)
            for c in T.unroll(CHAINS):
                A[t, T.ramp(c * lanes, 1, lanes)] = acc.vload([c, 0], vec)

    return fma


def _sum_func(lanes: int, size: int) -> tvm.tirx.PrimFunc:
    vec = f"float32x{lanes}"
    per = size // TASKS // (4 * lanes)

    @T.prim_func(private=True)
    def total(A: T.Buffer((size,), "float32"), S: T.Buffer((TASKS, lanes), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for t in T.parallel(TASKS):
            acc = T.alloc_buffer((4, lanes), "float32", scope="local")
            for c in T.unroll(4):
                acc[c, T.ramp(0, 1, lanes)] = T.broadcast(T.float32(0), lanes)
            for i in range(per):
                for c in T.unroll(4):
                    acc[c, T.ramp(0, 1, lanes)] = acc.vload([c, 0], vec) + A.vload([(t * per + i) * 4 * lanes + c * lanes], vec)
            S[t, T.ramp(0, 1, lanes)] = acc.vload([0, 0], vec) + acc.vload([1, 0], vec) + acc.vload([2, 0], vec) + acc.vload([3, 0], vec)

    return total


def _best(run: object, repeats: int) -> float:
    run()  # warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_peaks(threads: tuple[int, ...] = (1, 2), repeats: int = 7) -> Peaks:
    target = parse_target("llvm")
    lanes = simd_lanes(target)
    device = tvm.cpu(0)

    def build(func: tvm.tirx.PrimFunc):  # noqa: ANN202
        return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]

    fma = build(_fma_func(lanes))
    fma_args = [tvm.runtime.tensor(np.ones((TASKS, CHAINS * lanes), np.float32), device)]
    sizes = {"dram": 64 << 20, "cache": 2 << 20}  # floats: 256 MiB and 8 MiB
    sums = {k: (build(_sum_func(lanes, n)), tvm.runtime.tensor(np.ones(n, np.float32), device),
                tvm.runtime.tensor(np.zeros((TASKS, lanes), np.float32), device)) for k, n in sizes.items()}
    gflops, dram, cache = {}, {}, {}
    for t in threads:
        set_threads(t, spinning=True)
        seconds = _best(lambda: fma(*fma_args), repeats)
        gflops[t] = 2 * CHAINS * lanes * (ITERATIONS // TASKS) * TASKS / seconds / 1e9
        for key, out in (("dram", dram), ("cache", cache)):
            f, a, s = sums[key]
            reps = 1 if key == "dram" else 16
            seconds = _best(lambda f=f, a=a, s=s, reps=reps: [f(a, s) for _ in range(reps)], repeats)
            out[t] = sizes[key] * 4 * reps / seconds / 1e9
    return Peaks(gflops, dram, cache, lanes)


def cpu_line() -> str:
    """The machine line of the benchmarks plus what the kernels depend on: LLVM's name for the CPU
    (znver3, znver4, sapphirerapids, ...), its SIMD width and the cache sizes."""
    target = parse_target("llvm")
    feature = tvm.get_global_func("target.llvm_cpu_has_feature", allow_missing=True)
    isa = [f for f in ("avx512f", "avx2", "fma") if feature is not None and feature(f, target)]
    caches = []
    for level in ("L1d", "L2", "L3"):
        size = _cache_size(level)
        if size:
            caches.append(f"{level} {size}")
    mcpu = target.attrs.get("mcpu", "generic")
    return f"{describe()} | llvm cpu {mcpu} | {'+'.join(isa) or 'no AVX'} | {', '.join(caches)}"


def _cache_size(level: str) -> str:
    index = {"L1d": ("1", "Data"), "L2": ("2", "Unified"), "L3": ("3", "Unified")}[level]
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for entry in sorted(base.glob("index*")) if base.exists() else []:
        try:
            if (entry / "level").read_text().strip() == index[0] and (entry / "type").read_text().strip() == index[1]:
                return (entry / "size").read_text().strip()
        except OSError:
            continue
    return ""


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    print(cpu_line())
    print(load_average())
    for line in measure_peaks().lines():
        print(line)


if __name__ == "__main__":
    main()
