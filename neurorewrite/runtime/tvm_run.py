"""Load a library written by :func:`neurorewrite.runtime.tvm_compile.compile` and run it from Python."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from neurorewrite.errors import DataError, ModelLoadError, last_line
from neurorewrite.runtime.tvm_compile import FORMAT_VERSION, metadata_path

_LIBRARY_MAGIC = b"\x7fELF"


class CompiledModel:
    """``model(inputs)`` -> list of output arrays. ``inputs``: a mapping by input name, a sequence, or one array.

    Per call on a CPU the inputs are copied into staging tensors kept between calls (TVM's kernels may
    assume 64-byte aligned data, which a numpy array need not have) and the outputs are copied out
    through DLPack: a fresh ``tvm.runtime.tensor`` per input and ``Tensor.numpy()`` per output took
    18 and 7 us on a Zen 4 core, 7% of the FPE FFN's 342 us batch-1 call, where ``np.copyto`` into
    the staging view and a DLPack copy out take about 1 us each. One model object is not for concurrent
    calls from several threads (neither is TVM's virtual machine)."""

    def __init__(self, path: str | os.PathLike, device: str | None = None) -> None:
        import tvm
        from tvm import relax

        from neurorewrite.runtime.tvm_threads import use_physical_cores

        use_physical_cores()  # TVM's own default is half the logical CPUs: one core of two on a 2-core VM
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.input_names = list(self.meta["inputs"])
        # libraries written before the field existed took float32 only
        self.input_types = [np.dtype(self.meta.get("input_types", {}).get(n, "float32")) for n in self.input_names]
        kind = target_kind(self.meta["target"])
        self.device = tvm.cuda(0) if (device or ("cuda" if kind == "cuda" else "cpu")) == "cuda" else tvm.cpu(0)
        if kind == "cuda" and not self.device.exist:
            raise ModelLoadError(f"{self.path} was compiled for cuda, and this machine has no CUDA device")
        with tempfile.TemporaryDirectory(prefix="neurorewrite-lib.") as private:
            # the bytes hashed are the bytes loaded: a private copy nobody else can change or truncate
            copy = Path(private) / "library.so"
            digest = _copy_and_hash(self.path, copy)
            if digest != self.meta["sha256"]:
                raise ModelLoadError(f"{self.path}: the library is corrupt or was changed after compiling (checksum "
                                     f"differs from {metadata_path(self.path).name}); recompile it")
            check_elf(copy, self.path)
            try:
                library = tvm.runtime.load_module(str(copy))
                self.vm = relax.VirtualMachine(library, self.device)
                self._main = self.vm["main"]
            except Exception as e:  # TVM raises TVMError / OSError variants for unloadable libraries
                raise ModelLoadError(f"{self.path}: cannot load the compiled library ({last_line(e)})") from e
        self._on_cpu = self.device.dlpack_device_type() == tvm.cpu(0).dlpack_device_type()
        self._staging: dict[int, tuple[object, np.ndarray]] = {}  # input position -> (TVM tensor, numpy view of it)

    def __call__(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        import tvm

        arrays = self._arrange(inputs)
        if self._on_cpu:
            result = self._main(*[self._staged(position, a) for position, a in enumerate(arrays)])
        else:
            result = self._main(*[tvm.runtime.tensor(a, self.device) for a in arrays])
        outputs = list(result) if isinstance(result, (list, tuple)) or hasattr(result, "__len__") and not hasattr(result, "numpy") else [result]
        if self._on_cpu:  # copies, as Tensor.numpy() made: an output may be memory the library keeps (a constant)
            return [np.from_dlpack(o).copy() for o in outputs]
        return [o.numpy() for o in outputs]

    def _staged(self, position: int, array: np.ndarray) -> object:
        """``array`` copied into this input's staging tensor (made again when the shape changes)."""
        import tvm

        staged = self._staging.get(position)
        if staged is None or staged[1].shape != array.shape:
            tensor = tvm.runtime.empty(array.shape, array.dtype.name, self.device)
            staged = self._staging[position] = (tensor, np.from_dlpack(tensor))
        np.copyto(staged[1], array)
        return staged[0]

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
        for name, dtype, value in zip(self.input_names, self.input_types, inputs):
            value = np.asarray(value)
            if value.dtype.kind not in "biuf":
                raise DataError(f"{self.path}: input {name} has dtype {value.dtype}; it must hold numbers")
            if dtype.kind in "iub" and value.dtype.kind == "f" and not np.array_equal(value, np.round(value)):
                raise DataError(f"{self.path}: input {name} takes {dtype.name} values (token ids, say), got fractions")
            value = np.ascontiguousarray(value, dtype=dtype)
            expected = list(self.meta["inputs"][name])
            if not _fits(list(value.shape), expected, sizes):
                raise DataError(f"{self.path}: input {name} was compiled for shape {expected}, got {list(value.shape)}; "
                                "recompile with --shape for other shapes (or without it for any batch)")
            arrays.append(value)
        return arrays


INPUT_TYPES = ("float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
               "bool")


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


def read_metadata(path: Path) -> dict:
    """The library's description ``LIBRARY.json``, every field checked; a ModelLoadError otherwise."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such compiled library")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the compiled library ({e.strerror or e})") from e
    if magic != _LIBRARY_MAGIC:
        raise ModelLoadError(f"{path}: not a compiled library (no shared-object header); recompile it")
    meta_file = metadata_path(path)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: its description {meta_file.name} is missing or unreadable ({e}); recompile") from e
    problem = _metadata_problem(meta)
    if problem:
        raise ModelLoadError(f"{meta_file}: {problem}; recompile the model with this version")
    return meta


def _metadata_problem(meta: object) -> str | None:
    """What is wrong with a parsed description, or None."""
    if not isinstance(meta, dict):
        return f"expected a JSON object, found {type(meta).__name__}"
    if meta.get("format") != FORMAT_VERSION:
        return f"unknown format {meta.get('format')!r}"
    target = meta.get("target")
    if not isinstance(target, str) or not target:
        return "no target"
    if target_kind(target) is None:
        return f"malformed target {target[:80]!r}"
    inputs = meta.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        return "no inputs"
    for name, shape in inputs.items():
        # a dim is a positive size, or the name of a symbolic one (a library built for any batch)
        if not isinstance(shape, list) or not all(
                (isinstance(d, int) and not isinstance(d, bool) and d > 0) or (isinstance(d, str) and d) for d in shape):
            return f"input {name} has shape {shape!r}, not a list of positive integers and dimension names"
    types = meta.get("input_types", {})
    if not isinstance(types, dict) or set(types) - set(inputs) or not all(t in INPUT_TYPES for t in types.values()):
        return f"input_types {str(types)[:80]} does not give a numeric type per input"
    outputs = meta.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        return "outputs is not a list of names"
    digest = meta.get("sha256")
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return "no sha256 checksum of the library"
    return None


def target_kind(target: str) -> str | None:
    """``llvm``/``cuda``/... from a target string or JSON dict; None when the JSON is malformed."""
    if not target.startswith("{"):
        return target.split()[0] if target.split() else None
    try:
        kind = json.loads(target).get("kind")
    except (ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _copy_and_hash(source: Path, copy: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(copy, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    except OSError as e:
        raise ModelLoadError(f"{source}: cannot read the compiled library ({e.strerror or e})") from e
    return digest.hexdigest()


def check_elf(path: Path, label: Path) -> None:
    """Refuse a shared object whose headers point past its end: ``dlopen`` maps such a file and the
    process dies of SIGBUS on the first access to the missing part (a truncated library)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != _LIBRARY_MAGIC or head[4] not in (1, 2) or head[5] not in (1, 2):
            raise ModelLoadError(f"{label}: not a valid shared object (bad ELF header); recompile it")
        wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
        if wide:
            phoff, shoff = struct.unpack_from(order + "QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 54)
        else:
            phoff, shoff = struct.unpack_from(order + "II", head, 28)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", head, 42)
        if phoff + phentsize * phnum > size or (shnum and shoff + shentsize * shnum > size):
            raise ModelLoadError(f"{label}: the library is truncated ({size} bytes); recompile it")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        entry = table[i * phentsize:(i + 1) * phentsize]
        if wide:
            offset, filesz = struct.unpack_from(order + "Q", entry, 8)[0], struct.unpack_from(order + "Q", entry, 32)[0]
        else:
            offset, filesz = struct.unpack_from(order + "I", entry, 4)[0], struct.unpack_from(order + "I", entry, 16)[0]
        if offset + filesz > size:
            raise ModelLoadError(f"{label}: the library is truncated ({size} bytes, a segment ends at "
                                 f"{offset + filesz}); recompile it")


def load(path: str | os.PathLike, device: str | None = None) -> CompiledModel:
    """Load a compiled library; call the result with the inputs to get the outputs."""
    return CompiledModel(path, device)
