"""Load a library written by :func:`neurorewrite.runtime.tvm_compile.compile` and run it from Python."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from neurorewrite.errors import DataError, ModelLoadError, last_line
from neurorewrite.runtime.tvm_compile import FORMAT_VERSION, file_digest, metadata_path

_LIBRARY_MAGIC = b"\x7fELF"


class CompiledModel:
    """``model(inputs)`` -> list of output arrays. ``inputs``: a mapping by input name, a sequence, or one array."""

    def __init__(self, path: str | os.PathLike, device: str | None = None) -> None:
        import tvm
        from tvm import relax

        self.path = Path(path)
        self.meta = _read_metadata(self.path)
        self.input_names = list(self.meta["inputs"])
        kind = json.loads(self.meta["target"])["kind"] if self.meta["target"].startswith("{") else "llvm"
        self.device = tvm.cuda(0) if (device or ("cuda" if kind == "cuda" else "cpu")) == "cuda" else tvm.cpu(0)
        if kind == "cuda" and not self.device.exist:
            raise ModelLoadError(f"{self.path} was compiled for cuda, and this machine has no CUDA device")
        try:
            library = tvm.runtime.load_module(str(self.path))
            self.vm = relax.VirtualMachine(library, self.device)
        except Exception as e:  # TVM raises TVMError / OSError variants for unloadable libraries
            raise ModelLoadError(f"{self.path}: cannot load the compiled library ({last_line(e)})") from e

    def __call__(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        import tvm

        arrays = self._arrange(inputs)
        result = self.vm["main"](*[tvm.runtime.tensor(a, self.device) for a in arrays])
        outputs = list(result) if isinstance(result, (list, tuple)) or hasattr(result, "__len__") and not hasattr(result, "numpy") else [result]
        return [o.numpy() for o in outputs]

    def _arrange(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise DataError(f"{self.path}: no array for input(s) {', '.join(missing)} (has {', '.join(inputs)})")
            inputs = [inputs[n] for n in self.input_names]
        if len(inputs) != len(self.input_names):
            raise DataError(f"{self.path}: expects {len(self.input_names)} input(s) {self.input_names}, got {len(inputs)}")
        arrays, sizes = [], {}  # sizes: the value each symbolic dimension takes in this call
        for name, value in zip(self.input_names, inputs):
            value = np.ascontiguousarray(value, dtype=np.float32)
            expected = list(self.meta["inputs"][name])
            if not _fits(list(value.shape), expected, sizes):
                raise DataError(f"{self.path}: input {name} was compiled for shape {expected}, got {list(value.shape)}; "
                                "recompile with --shape for other shapes (or without it for any batch)")
            arrays.append(value)
        return arrays


def _fits(shape: list[int], expected: list, sizes: dict[str, int]) -> bool:
    """Whether ``shape`` matches ``expected``, whose named (symbolic) dims take one size across inputs."""
    if len(shape) != len(expected):
        return False
    for got, want in zip(shape, expected):
        if isinstance(want, str):
            if got < 1 or sizes.setdefault(want, got) != got:
                return False
        elif got != want:
            return False
    return True


def _read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such compiled library")
    with open(path, "rb") as f:
        if f.read(4) != _LIBRARY_MAGIC:
            raise ModelLoadError(f"{path}: not a compiled library (no shared-object header); recompile it")
    meta_file = metadata_path(path)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: its description {meta_file.name} is missing or unreadable ({e}); recompile") from e
    if meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("inputs"), dict):
        raise ModelLoadError(f"{meta_file}: unknown format {meta.get('format')!r}; recompile with this version")
    if meta.get("sha256") != file_digest(path):
        raise ModelLoadError(f"{path}: the library is corrupt or was changed after compiling (checksum differs "
                             f"from {meta_file.name}); recompile it")
    return meta


def load(path: str | os.PathLike, device: str | None = None) -> CompiledModel:
    """Load a compiled library; call the result with the inputs to get the outputs."""
    return CompiledModel(path, device)
