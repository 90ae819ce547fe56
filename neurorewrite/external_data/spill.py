"""Spilled tensors: a pass's big new tensors (and, with ``load_model(spill=True)``, an input's big
external tensors) live in files of this process's spill folder, not in protobuf.

:func:`make_tensor` writes an array of :data:`SPILL_THRESHOLD` bytes or more into a spill file and
returns a TensorProto that names it by absolute path; :func:`tensor_array` maps it back read-only,
:func:`tensor_chunks` reads it a chunk at a time, :func:`materialize` loads spilled tensors into the
protobuf for code that reads initializers with onnx's own helpers. The spill folder is locked while
the process lives and removed at exit (or, if the process was killed, by the next process).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper

from neurorewrite.external_data.common import COPY_CHUNK, remove_dead_folders, _DATA_FIELDS, _copy_fields, _external, _external_info, _nbytes

SPILL_THRESHOLD = 64 << 20  # bytes: a pass's new tensor this big goes to a spill file, not into protobuf
SPILL_PREFIX = "neurorewrite-spill."
def spilled(t: onnx.TensorProto) -> bool:
    """Whether ``t`` is a spilled tensor (external data at an absolute path: see the module docstring)."""
    return _external(t) and any(e.key == "location" and os.path.isabs(e.value) for e in t.external_data)


def has_spilled(model: onnx.ModelProto) -> bool:
    return any(spilled(t) for t in model.graph.initializer)


class _SpillFolder:
    """This process's spill folder, made on first use, locked while the process lives, removed at exit."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.pid = 0
        self.fd: int | None = None
        self.counter = itertools.count()

    def get(self) -> Path:
        if self.path is None or self.pid != os.getpid():  # a forked child makes its own
            _remove_dead_spills()
            self.path = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX))
            self.pid = os.getpid()
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            atexit.register(self.remove, self.path, self.pid)
        return self.path

    @staticmethod
    def remove(path: Path, pid: int) -> None:
        if os.getpid() == pid:
            shutil.rmtree(path, ignore_errors=True)


_SPILL = _SpillFolder()


def _remove_dead_spills() -> None:
    """Remove spill folders of processes that died without cleaning up (their lock is free)."""
    remove_dead_folders(tempfile.gettempdir(), lambda entry: entry.name.startswith(SPILL_PREFIX))


def make_tensor(value: np.ndarray, name: str) -> onnx.TensorProto:
    """An initializer holding ``value``: spilled when it has :data:`SPILL_THRESHOLD` bytes or more and a
    plain numeric type, else an ordinary TensorProto (``numpy_helper.from_array``)."""
    if value.nbytes < SPILL_THRESHOLD or value.dtype.kind not in "biuf" or value.dtype.byteorder == ">":
        return numpy_helper.from_array(value, name)
    path = _SPILL.get() / f"{next(_SPILL.counter)}.bin"
    with open(path, "wb") as f:
        _write_array(value, f)
    t = onnx.TensorProto(name=name, dims=list(value.shape), data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                         data_location=onnx.TensorProto.EXTERNAL)
    for key, v in (("location", str(path)), ("offset", "0"), ("length", str(value.nbytes))):
        t.external_data.add(key=key, value=v)
    return t


def spill_copy(t: onnx.TensorProto, base: str | os.PathLike) -> None:
    """Turn ``t``, an external tensor of the model file in folder ``base``, into a spilled tensor: its
    bytes are copied file to file (``copy_file_range``: no copy passes through this process's memory)
    into a spill file that only this process uses, so nothing can change them while they are mapped."""
    location, offset, length = _external_info(t)
    if length < 0:
        length = _nbytes(t)
    path = _SPILL.get() / f"{next(_SPILL.counter)}.bin"
    with open(Path(base) / location, "rb") as src, open(path, "wb", buffering=0) as dst:
        left, at = length, offset
        while left > 0:
            try:
                n = os.copy_file_range(src.fileno(), dst.fileno(), min(left, 1 << 30), at)
            except OSError:  # another filesystem or kernel without it: plain reads
                src.seek(at)
                chunk = src.read(min(left, COPY_CHUNK))
                n = dst.write(chunk) if chunk else 0
            if n <= 0:
                raise OSError(f"external data of tensor {t.name} ends before its {length} bytes")
            left -= n
            at += n
    del t.external_data[:]
    for key, v in (("location", str(path)), ("offset", "0"), ("length", str(length))):
        t.external_data.add(key=key, value=v)


def _write_array(value: np.ndarray, f: BinaryIO) -> None:
    """Write ``value``'s C-order bytes; a non-contiguous array is written a slab of rows at a time."""
    if value.flags.c_contiguous:
        value.tofile(f)
        return
    rows = max(1, COPY_CHUNK // max(1, value[0:1].nbytes))
    for start in range(0, value.shape[0], rows):
        np.ascontiguousarray(value[start:start + rows]).tofile(f)


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    """The values of an initializer: a read-only map of a spilled tensor's file, else ``to_array``."""
    if not spilled(t):
        return numpy_helper.to_array(t)
    location, offset, _ = _external_info(t)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=tuple(t.dims))


def tensor_chunks(t: onnx.TensorProto, elements: int = 1 << 24) -> Iterator[np.ndarray]:
    """The flat values of an initializer, ``elements`` at a time; a spilled tensor is read from its file
    in chunks (a scan of it should not map, and so count as resident, the whole file)."""
    if not spilled(t):
        values = numpy_helper.to_array(t).reshape(-1)
        for start in range(0, values.size, elements):
            yield values[start:start + elements]
        return
    location, offset, _ = _external_info(t)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
    total = int(np.prod(t.dims, dtype=np.int64))
    with open(location, "rb") as f:
        f.seek(offset)
        for start in range(0, total, elements):
            yield np.fromfile(f, dtype=dtype, count=min(elements, total - start))


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every spilled tensor's bytes loaded into the protobuf (``model`` itself if none is
    spilled), for code that reads initializers with onnx's own helpers."""
    if not has_spilled(model):
        return model
    out = onnx.ModelProto()
    _copy_fields(model, out, skip=("graph",))
    _copy_fields(model.graph, out.graph, skip=("initializer",))
    for t in model.graph.initializer:
        out.graph.initializer.add().CopyFrom(_inline(t) if spilled(t) else t)
    return out


def _inline(t: onnx.TensorProto) -> onnx.TensorProto:
    ref = onnx.TensorProto()
    _copy_fields(t, ref, skip=_DATA_FIELDS)
    location, offset, length = _external_info(t)
    with open(location, "rb") as f:
        f.seek(offset)
        ref.raw_data = f.read(length)
    return ref


def _copy_spilled(t: onnx.TensorProto, data: BinaryIO) -> int:
    location, offset, length = _external_info(t)
    with open(location, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"spill file {location} of tensor {t.name} is shorter than {length} bytes")
            data.write(chunk)
            left -= len(chunk)
    return length


def _linked(t: onnx.TensorProto, folder: Path) -> onnx.TensorProto:
    """A reference to ``t``'s spill file under a relative name in ``folder`` (hard link, or copy)."""
    location, offset, length = _external_info(t)
    name = f"spilled.{next(_SPILL.counter)}.bin"
    try:
        os.link(location, folder / name)
    except OSError:
        shutil.copyfile(location, folder / name)
    ref = onnx.TensorProto()
    _copy_fields(t, ref, skip=_DATA_FIELDS)
    ref.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", name), ("offset", str(offset)), ("length", str(length))):
        ref.external_data.add(key=key, value=value)
    return ref


