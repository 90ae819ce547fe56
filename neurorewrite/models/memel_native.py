"""MEmeL's fused CPU kernel: build it once, load it with ctypes, call it on tensors.

:mod:`neurorewrite.models.memel` runs its statistics, score and top-1 selection in one C pass
(``memel_kernel.c``) for float32 activations on CPU, and falls back to its eager torch code
everywhere else (GPU, other dtypes, non-contiguous tensors, no C compiler). The kernel is built the
first time it is wanted with the system C compiler (``$CC``, else ``cc``), for this CPU
(``-march=native``) and with floating-point contraction off, into
``$NEUROREWRITE_CACHE`` (default ``~/.cache/neurorewrite``) under a name that hashes the source, the
flags and the CPU, so a shared home directory never hands one CPU another's build. The build is
written to a temporary file and renamed, so concurrent processes (ranks) never load half a file.

``NEUROREWRITE_MEMEL_KERNEL=0`` turns the kernel off (the eager path then runs everywhere);
:func:`kernel_status` says which path runs and why, and benchmarks print it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["NativeKernel", "kernel_status", "native_kernel", "usable_for"]

SOURCE = Path(__file__).with_name("memel_kernel.c")
FLAGS = (
    "-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", "-pthread", "-shared", "-fPIC",
)
ENABLE_VARIABLE = "NEUROREWRITE_MEMEL_KERNEL"

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class NativeKernel:
    """The loaded kernel's three entry points, taking tensors (see ``memel_kernel.c`` for the math)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._step = library.memel_step_f32
        self._step.argtypes = [_P, _I, _I, _P, _P, _D, _P, _P, _P, _P, _P, _I]
        self._step.restype = ctypes.c_int
        self._merge = library.memel_merge
        self._merge.argtypes = [_D, _D, _I, _P, _P, _P, _I]
        self._merge.restype = _D
        self._backward = library.memel_backward_f32
        self._backward.argtypes = [_P, _I, _I, _P, ctypes.c_float, _P]
        self._backward.restype = None

    def step(
        self, z2d: Tensor, mean: Tensor, m2: Tensor, count: float, packed: Tensor,
        out: Tensor | None = None, index: Tensor | None = None, phi: Tensor | None = None,
        best: Tensor | None = None, threads: int = 1,
    ) -> None:
        """Fill ``packed[1:]`` (float64, ``[count, sum1, sum2]``; ``packed[0]`` is left alone) with the
        batch sums and, with ``out``/``index``/``best``, the top-1 output; with ``phi`` (batch x
        features) the scores. Every tensor contiguous on CPU; z, mean, m2 float32. ``threads`` splits
        the columns over that many threads (same result for any count)."""
        rows, cols = z2d.shape
        args = (z2d.data_ptr(), rows, cols, mean.data_ptr(), m2.data_ptr(), float(count), _sums_address(packed),
                _address(out), _address(index), _address(phi), _address(best))
        if self._step(*args, threads) != 0:  # no memory or no thread for the split: one thread needs neither
            self._step(*args, 1)

    def merge(self, count: float, batch_count: float, n_forget: int, packed: Tensor, mean: Tensor, m2: Tensor) -> float:
        """Merge the batch sums in ``packed[1:]`` into ``mean`` and ``m2`` in place; returns the new count."""
        sums = _sums_address(packed)
        return float(self._merge(count, batch_count, n_forget, sums, mean.data_ptr(), m2.data_ptr(), mean.numel()))

    def backward(self, grad: Tensor, index: Tensor, scale: float, out: Tensor) -> None:
        """``out = grad`` with each row's selected element multiplied by ``scale``."""
        rows, cols = grad.shape
        self._backward(grad.data_ptr(), rows, cols, index.data_ptr(), scale, out.data_ptr())


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _sums_address(packed: Tensor) -> int:
    """Where ``packed[1:]`` starts; ``packed`` is the contiguous float64 buffer memel_fused makes."""
    return packed.data_ptr() + 8


def usable_for(z2d: Tensor, statistics: Tensor) -> bool:
    """True when the kernel can take this activation: float32, contiguous, on CPU, float32 statistics."""
    return (
        z2d.dtype == torch.float32 and statistics.dtype == torch.float32 and z2d.device.type == "cpu"
        and z2d.is_contiguous() and statistics.device.type == "cpu" and statistics.is_contiguous()
    )


def _cpu_identity() -> str:
    identity = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    identity += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return identity


def _cache_dir() -> Path:
    return Path(os.environ.get("NEUROREWRITE_CACHE") or Path.home() / ".cache" / "neurorewrite")


def _build(compiler: str) -> Path:
    """Compile the kernel into the cache (once per source, flags and CPU); returns the library path."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_identity().encode()).hexdigest()[:16]
    target = _cache_dir() / f"memel_kernel-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary], check=True, capture_output=True, timeout=120)
        os.replace(temporary, target)  # atomic: another rank may be building the same file
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


@functools.cache
def _load() -> tuple[NativeKernel | None, str]:
    if os.environ.get(ENABLE_VARIABLE, "1").strip().lower() in ("0", "false", "off", "no"):
        return None, f"eager torch ({ENABLE_VARIABLE}=0)"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None, "eager torch (no C compiler found: set CC to build the fused CPU kernel)"
    try:
        path = _build(compiler)
        return NativeKernel(ctypes.CDLL(str(path))), f"fused C kernel ({path.name}, built by {Path(compiler).name})"
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(error)]
        return None, f"eager torch (the fused CPU kernel did not build: {reason[0]})"


def native_kernel() -> NativeKernel | None:
    """The loaded kernel, or None when MEmeL must use its eager torch code (see :func:`kernel_status`)."""
    return _load()[0]


def kernel_status() -> str:
    """Which MEmeL path runs on CPU float32 activations in this process, and why."""
    return _load()[1]
